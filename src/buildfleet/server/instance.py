"""Instances: the named partitions of a server, each with its own storage.

`build_instances` turns a validated `ServerConfig` into live objects.  Storage
declared once under `storage:` and named by several instances is one object,
shared.  `Instances.get` is how every service resolves a request's instance name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from buildfleet.config import (
    DiskStorage,
    InstanceConfig,
    MemoryStorage,
    PostgresStorage,
    ReadCacheStorage,
    RemoteStorage,
    SchedulerConfig,
    ServerConfig,
    SizeLimitedStorage,
    StorageRef,
    default_action_cache,
    default_cas,
    is_postgres_url,
    postgres_settings,
)
from buildfleet.errors import InvalidArgument
from buildfleet.scheduler.api import SchedulerAPI, Startable
from buildfleet.scheduler.postgres import Database, PostgresSchedulerStore
from buildfleet.scheduler.replicated import ReplicatedGrid, ReplicatedScheduler
from buildfleet.scheduler.scheduler import Scheduler
from buildfleet.scheduler.settings import SchedulerSettings
from buildfleet.scheduler.store import SchedulerStore, SqliteSchedulerStore
from buildfleet.storage import BlobStore, Cas, DiskStore, MemoryStore, SizeLimitedStore
from buildfleet.storage.action_cache import ActionCache
from buildfleet.storage.postgres import PostgresStore
from buildfleet.storage.read_cache import ReadCachingStore
from buildfleet.storage.remote import RemoteStore


@dataclass
class Instance:
    """One instance name and the backends behind it."""

    name: str
    cas: Cas
    action_cache: ActionCache
    settings: InstanceConfig
    scheduler: SchedulerAPI | None = None  # None: a cache-only instance

    @property
    def max_batch_total_size(self) -> int:
        return int(self.settings.max_batch_total_size)


@dataclass
class Instances:
    """The instances a server serves, by name."""

    by_name: dict[str, Instance]
    stores: list[BlobStore] = field(default_factory=list)
    # The schedulers' shared persistence: a SchedulerStore, or the replicated grid.
    scheduler_store: Startable | None = None

    def get(self, name: str) -> Instance:
        """The instance called `name`; InvalidArgument naming it when there is none."""
        instance = self.by_name.get(name)
        if instance is None:
            known = ", ".join(repr(n) for n in sorted(self.by_name))
            raise InvalidArgument(f"unknown instance name {name!r} (this server serves {known})")
        return instance

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.by_name.values())

    def schedulers(self) -> list[SchedulerAPI]:
        return [i.scheduler for i in self.by_name.values() if i.scheduler is not None]

    async def start(self) -> None:
        for store in self.stores:
            await store.start()
        if self.scheduler_store is not None:
            await self.scheduler_store.start()
        for scheduler in self.schedulers():
            await scheduler.start()

    async def close(self) -> None:
        for scheduler in self.schedulers():
            await scheduler.close()
        if self.scheduler_store is not None:
            await self.scheduler_store.close()
        for store in self.stores:
            await store.close()


def _bounded(store: BlobStore, ref: DiskStorage | PostgresStorage) -> BlobStore:
    """`store` behind the size limit that its storage declares, if any."""
    if ref.max_size is None:
        return store
    return SizeLimitedStore(store, int(ref.max_size), rescan_interval=ref.rescan_interval)


def build_store(config: ServerConfig, ref: StorageRef, data_dir: Path,
                named: dict[str, BlobStore], created: list[BlobStore]) -> BlobStore:
    """Create (or reuse, for a named storage) the store a reference describes."""
    if isinstance(ref, str):
        if ref not in named:
            named[ref] = build_store(config, config.storage[ref], data_dir, named, created)
        return named[ref]
    store: BlobStore
    if isinstance(ref, DiskStorage):
        path = Path(ref.path)
        store = _bounded(DiskStore(path if path.is_absolute() else data_dir / path,
                                   fsync=ref.fsync), ref)
    elif isinstance(ref, MemoryStorage):
        store = SizeLimitedStore(MemoryStore(), int(ref.max_size))
    elif isinstance(ref, SizeLimitedStorage):
        inner = build_store(config, ref.backend, data_dir, named, created)
        if not isinstance(ref.backend, str):
            created.remove(inner)  # the wrapper starts and closes its own backend
        store = SizeLimitedStore(inner, int(ref.max_size))
    elif isinstance(ref, RemoteStorage):
        store = RemoteStore(ref.address, instance=ref.instance, timeout=ref.timeout)
    elif isinstance(ref, PostgresStorage):
        store = _bounded(PostgresStore(postgres_settings(config), namespace=ref.namespace), ref)
    elif isinstance(ref, ReadCacheStorage):
        backend = build_store(config, ref.backend, data_dir, named, created)
        cache = build_store(config, ref.cache, data_dir, named, created)
        for part, part_ref in ((backend, ref.backend), (cache, ref.cache)):
            if not isinstance(part_ref, str):
                created.remove(part)  # the wrapper starts and closes its own parts
        store = ReadCachingStore(backend, cache)
    else:  # pragma: no cover - the config model admits nothing else
        raise TypeError(f"unknown storage {ref!r}")
    created.append(store)
    return store


def scheduler_settings(config: SchedulerConfig) -> SchedulerSettings:
    return SchedulerSettings(
        max_attempts=config.max_attempts, keepalive=config.keepalive,
        long_poll=config.long_poll, busy_poll=config.busy_poll,
        default_timeout=config.default_timeout,
        max_timeout=config.max_timeout, timeout_grace=config.timeout_grace,
        unmatched_timeout=config.unmatched_timeout, max_queued=config.max_queued,
        fairness_share=config.fairness_share, offer_pending=config.lease_offer == "pending",
        completed_retention=config.completed_retention,
        cache_failed_results=config.cache_failed_results,
        bot_label_key=config.bot_label_key,
        tick=config.housekeeping_interval,
    )


def build_scheduler_store(config: ServerConfig) -> SchedulerStore | ReplicatedGrid:
    """The schedulers' persistence: a SQLite file, or PostgreSQL (replicated: the
    database holds the state; single-server: written behind like SQLite)."""
    if is_postgres_url(config.database):
        if config.postgres.mode == "replicated":
            return ReplicatedGrid(Database(postgres_settings(config)))
        return PostgresSchedulerStore(postgres_settings(config))
    path = Path(config.database)
    return SqliteSchedulerStore(path if path.is_absolute() else Path(config.data_dir) / path)


def build_instances(config: ServerConfig) -> Instances:
    data_dir = Path(config.data_dir)
    named: dict[str, BlobStore] = {}
    created: list[BlobStore] = []
    instances: dict[str, Instance] = {}
    executing = any(i.scheduler.enabled for i in config.instances.values())
    scheduler_store = build_scheduler_store(config) if executing else None
    for name, settings in config.instances.items():
        cas_store = build_store(config, settings.cas or default_cas(name), data_dir,
                                named, created)
        ac_store = build_store(config, settings.action_cache or default_action_cache(name),
                               data_dir, named, created)
        cas = Cas(cas_store)
        action_cache = ActionCache(ac_store, cas,
                                   allow_updates=settings.allow_action_cache_updates)
        scheduler: SchedulerAPI | None = None
        if settings.scheduler.enabled and isinstance(scheduler_store, ReplicatedGrid):
            scheduler = ReplicatedScheduler(name, scheduler_store, action_cache=action_cache,
                                            settings=scheduler_settings(settings.scheduler))
        elif settings.scheduler.enabled and isinstance(scheduler_store, SchedulerStore):
            scheduler = Scheduler(name, scheduler_store, action_cache=action_cache,
                                  settings=scheduler_settings(settings.scheduler))
        instances[name] = Instance(name=name, cas=cas, action_cache=action_cache,
                                   settings=settings, scheduler=scheduler)
    return Instances(instances, created, scheduler_store)
