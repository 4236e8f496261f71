"""Instances: the named partitions of a server, each with its own storage.

`build_instances` turns a validated `ServerConfig` into live objects: the blob
stores (through `storage.factory`), each instance's CAS and action cache, and its
scheduler -- the embedded strategy on SQLite (or single-server PostgreSQL), or
the replicated one on a shared PostgreSQL database.  `Instances.get` is how every
service resolves a request's instance name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from buildfleet.config import (
    InstanceConfig,
    ServerConfig,
    default_action_cache,
    default_assets,
    default_cas,
    is_postgres_url,
)
from buildfleet.errors import InvalidArgument
from buildfleet.postgres import Database
from buildfleet.scheduler.api import SchedulerAPI, Startable
from buildfleet.scheduler.embedded import (
    EmbeddedScheduler,
    PostgresSchedulerStore,
    SchedulerStore,
    SqliteSchedulerStore,
)
from buildfleet.scheduler.replicated import ReplicatedGrid, ReplicatedScheduler
from buildfleet.storage import BlobStore, Cas
from buildfleet.storage.action_cache import ActionCache
from buildfleet.storage.assets import AssetStore
from buildfleet.storage.factory import StoreFactory


@dataclass
class Instance:
    """One instance name and the backends behind it."""

    name: str
    cas: Cas
    action_cache: ActionCache
    settings: InstanceConfig
    assets: AssetStore
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


def build_scheduler_store(config: ServerConfig) -> SchedulerStore | ReplicatedGrid:
    """The schedulers' persistence: a SQLite file, or PostgreSQL (replicated: the
    database holds the state; single-server: written behind like SQLite)."""
    if is_postgres_url(config.database):
        if config.postgres.mode == "replicated":
            return ReplicatedGrid(Database(config.database, config.postgres))
        return PostgresSchedulerStore(config.database, config.postgres)
    path = Path(config.database)
    return SqliteSchedulerStore(path if path.is_absolute() else Path(config.data_dir) / path)


def build_instances(config: ServerConfig) -> Instances:
    stores = StoreFactory(config)
    instances: dict[str, Instance] = {}
    executing = any(i.scheduler.enabled for i in config.instances.values())
    scheduler_store = build_scheduler_store(config) if executing else None
    for name, settings in config.instances.items():
        cas = Cas(stores.build(settings.cas or default_cas(name)))
        entries = stores.build(settings.action_cache or default_action_cache(name))
        action_cache = ActionCache(entries, cas,
                                   allow_updates=settings.allow_action_cache_updates)
        assets = AssetStore(stores.build(settings.assets or default_assets(name)), cas)
        scheduler: SchedulerAPI | None = None
        if settings.scheduler.enabled and isinstance(scheduler_store, ReplicatedGrid):
            scheduler = ReplicatedScheduler(name, scheduler_store, action_cache=action_cache,
                                            settings=settings.scheduler)
        elif settings.scheduler.enabled and isinstance(scheduler_store, SchedulerStore):
            scheduler = EmbeddedScheduler(name, scheduler_store, action_cache=action_cache,
                                          settings=settings.scheduler)
        instances[name] = Instance(name=name, cas=cas, action_cache=action_cache,
                                   settings=settings, assets=assets, scheduler=scheduler)
    return Instances(instances, stores.roots, scheduler_store)
