"""Blob stores from configuration: the one place that turns `storage:` entries into objects.

A storage declared once under `storage:` and named by several instances is one
object, shared.  A wrapper (size-limited, read-cache) starts and closes the
stores it wraps, so only the outermost stores are listed in `roots`: those are
what a server starts and closes.
"""

from __future__ import annotations

from pathlib import Path

from buildfleet.client.credentials import ClientCredentials
from buildfleet.config import (
    ConfigError,
    DiskStorage,
    MemoryStorage,
    PackedStorage,
    PostgresStorage,
    ReadCacheStorage,
    RemoteStorage,
    S3Storage,
    ServerConfig,
    SizeLimitedStorage,
    SplitStorage,
    StorageRef,
)
from buildfleet.storage.base import BlobStore
from buildfleet.storage.disk import DiskStore
from buildfleet.storage.memory import MemoryStore
from buildfleet.storage.migrating import MigratingStore
from buildfleet.storage.packed import PackedStore
from buildfleet.storage.postgres import PostgresStore
from buildfleet.storage.read_cache import ReadCachingStore
from buildfleet.storage.remote import RemoteStore
from buildfleet.storage.size_limited import SizeLimitedStore
from buildfleet.storage.split import SizeSplitStore


class StoreFactory:
    """Builds (or reuses, for a named storage) the store each reference describes."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.roots: list[BlobStore] = []  # what the server starts and closes
        self._named: dict[str, BlobStore] = {}

    def build(self, ref: StorageRef) -> BlobStore:
        if isinstance(ref, str):
            if ref not in self._named:
                self._named[ref] = self.build(self.config.storage[ref])
            return self._named[ref]
        store = self._create(ref)
        self.roots.append(store)
        return store

    def _part(self, ref: StorageRef) -> BlobStore:
        """A store that a wrapper owns: the wrapper starts and closes it (unless it is
        a named storage, which may have other users)."""
        store = self.build(ref)
        if not isinstance(ref, str):
            self.roots.remove(store)
        return store

    def _create(self, ref: StorageRef) -> BlobStore:
        if isinstance(ref, DiskStorage):
            return self._bounded(DiskStore(self.config.data_path(ref.path), fsync=ref.fsync), ref)
        if isinstance(ref, PackedStorage):
            path = self.config.data_path(ref.path)
            store: BlobStore = PackedStore(path, fsync=ref.fsync)
            marker = path.with_name(path.name + ".moved")
            if (ref.migrate_from is not None and not marker.exists()
                    and (self.config.data_path(ref.migrate_from) / "blobs").is_dir()):
                limit = ref.migrate_max_blob_size
                store = MigratingStore(store, DiskStore(self.config.data_path(ref.migrate_from)),
                                       max_blob_size=None if limit is None else int(limit),
                                       done_marker=marker)
            return self._bounded(store, ref)
        if isinstance(ref, SplitStorage):
            return SizeSplitStore(int(ref.threshold), self._part(ref.small),
                                  self._part(ref.large))
        if isinstance(ref, MemoryStorage):
            return SizeLimitedStore(MemoryStore(), int(ref.max_size))
        if isinstance(ref, SizeLimitedStorage):
            return SizeLimitedStore(self._part(ref.backend), int(ref.max_size))
        if isinstance(ref, RemoteStorage):
            return RemoteStore(ref.address, instance=ref.instance, timeout=ref.timeout,
                               credentials=self._credentials(ref))
        if isinstance(ref, PostgresStorage):
            return self._bounded(PostgresStore(self.config.database, self.config.postgres,
                                               namespace=ref.namespace), ref)
        if isinstance(ref, ReadCacheStorage):
            return ReadCachingStore(self._part(ref.backend), self._part(ref.cache))
        if isinstance(ref, S3Storage):
            return self._s3(ref)
        raise TypeError(f"unknown storage {ref!r}")  # pragma: no cover - config admits no other

    def _s3(self, ref: S3Storage) -> BlobStore:
        try:
            from buildfleet.storage.s3 import S3Store
        except ImportError:
            raise ConfigError("s3 storage needs aiobotocore: pip install 'buildfleet[s3]'"
                              ) from None

        def secret(path: str | None) -> str | None:
            if path is None:
                return None
            try:
                return self.config.data_path(path).read_text().strip()
            except OSError as error:
                raise ConfigError(f"cannot read {path}: {error.strerror}") from None

        return S3Store(ref.bucket, prefix=ref.prefix, endpoint_url=ref.endpoint_url,
                       region=ref.region, access_key_id=secret(ref.access_key_id_file),
                       secret_access_key=secret(ref.secret_access_key_file),
                       addressing_style=ref.addressing_style, timeout=ref.timeout,
                       max_concurrency=ref.max_concurrency)

    def _credentials(self, ref: RemoteStorage) -> ClientCredentials | None:
        if not ref.secure and ref.token_file is None:
            return None

        def path(value: str | None) -> Path | None:
            return None if value is None else self.config.data_path(value)

        credentials = ClientCredentials(tls_ca=path(ref.tls_ca),
                                        client_cert=path(ref.client_cert),
                                        client_key=path(ref.client_key),
                                        token_file=path(ref.token_file),
                                        force_tls=ref.secure)
        try:
            credentials.check(prefix="")
        except ValueError as error:
            raise ConfigError(f"storage remote {ref.address}: {error}") from None
        return credentials

    @staticmethod
    def _bounded(store: BlobStore, ref: DiskStorage | PostgresStorage | PackedStorage
                 ) -> BlobStore:
        """`store` behind the size limit that its storage declares, if any."""
        if ref.max_size is None:
            return store
        return SizeLimitedStore(store, int(ref.max_size), rescan_interval=ref.rescan_interval)
