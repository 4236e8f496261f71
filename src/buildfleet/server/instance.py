"""Instances: the named partitions of a server, each with its own storage.

`build_instances` turns a validated `ServerConfig` into live objects.  Storage
declared once under `storage:` and named by several instances is one object,
shared.  `Instances.get` is how every service resolves a request's instance name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buildfleet.config import (
    DiskStorage,
    InstanceConfig,
    MemoryStorage,
    ServerConfig,
    SizeLimitedStorage,
    StorageRef,
    default_action_cache,
    default_cas,
)
from buildfleet.errors import InvalidArgument
from buildfleet.storage import BlobStore, Cas, DiskStore, MemoryStore, SizeLimitedStore
from buildfleet.storage.action_cache import ActionCache


@dataclass
class Instance:
    """One instance name and the backends behind it."""

    name: str
    cas: Cas
    action_cache: ActionCache
    settings: InstanceConfig
    scheduler: Any = None  # set when the instance executes actions

    @property
    def max_batch_total_size(self) -> int:
        return int(self.settings.max_batch_total_size)


@dataclass
class Instances:
    """The instances a server serves, by name."""

    by_name: dict[str, Instance]
    stores: list[BlobStore] = field(default_factory=list)

    def get(self, name: str) -> Instance:
        """The instance called `name`; InvalidArgument naming it when there is none."""
        instance = self.by_name.get(name)
        if instance is None:
            known = ", ".join(repr(n) for n in sorted(self.by_name))
            raise InvalidArgument(f"unknown instance name {name!r} (this server serves {known})")
        return instance

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.by_name.values())

    async def start(self) -> None:
        for store in self.stores:
            await store.start()

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


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
        store = DiskStore(path if path.is_absolute() else data_dir / path, fsync=ref.fsync)
        if ref.max_size is not None:
            store = SizeLimitedStore(store, int(ref.max_size))
    elif isinstance(ref, MemoryStorage):
        store = SizeLimitedStore(MemoryStore(), int(ref.max_size))
    elif isinstance(ref, SizeLimitedStorage):
        inner = build_store(config, ref.backend, data_dir, named, created)
        if not isinstance(ref.backend, str):
            created.remove(inner)  # the wrapper starts and closes its own backend
        store = SizeLimitedStore(inner, int(ref.max_size))
    else:  # pragma: no cover - the config model admits nothing else
        raise TypeError(f"unknown storage {ref!r}")
    created.append(store)
    return store


def build_instances(config: ServerConfig) -> Instances:
    data_dir = Path(config.data_dir)
    named: dict[str, BlobStore] = {}
    created: list[BlobStore] = []
    instances: dict[str, Instance] = {}
    for name, settings in config.instances.items():
        cas_store = build_store(config, settings.cas or default_cas(name), data_dir,
                                named, created)
        ac_store = build_store(config, settings.action_cache or default_action_cache(name),
                               data_dir, named, created)
        cas = Cas(cas_store)
        instances[name] = Instance(
            name=name,
            cas=cas,
            action_cache=ActionCache(ac_store, cas,
                                     allow_updates=settings.allow_action_cache_updates),
            settings=settings,
        )
    return Instances(instances, created)
