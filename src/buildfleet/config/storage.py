"""Blob storage backends, as configured (`storage:` and each instance's `cas`,
`action-cache`).  `buildfleet.storage.factory` turns them into stores."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import quote

from pydantic import ByteSize, Field, field_validator, model_validator

from buildfleet.config.base import Model, check_instance_name, parse_listen_address

MiB = 1024 * 1024


class DiskStorage(Model):
    """Files under a directory; survives restarts."""

    type: Literal["disk"]
    path: str
    max_size: ByteSize | None = Field(default=None, gt=0)
    fsync: bool = False
    # With max-size: rescan the directory this often (seconds) to count blobs that
    # other processes sharing it stored or deleted (see storage/size_limited.py).
    rescan_interval: float | None = Field(default=None, gt=0)


class MemoryStorage(Model):
    """A dict in the server process, bounded with least-recently-used eviction."""

    type: Literal["memory"]
    max_size: ByteSize = Field(default=ByteSize(1024 * MiB), gt=0)


class SizeLimitedStorage(Model):
    """Any backend, bounded with least-recently-used eviction."""

    type: Literal["size-limited"]
    max_size: ByteSize = Field(gt=0)
    backend: StorageRef


class RemoteStorage(Model):
    """Another REAPI CAS over gRPC (a buildfleet server serving only CAS, or any other).

    CAS only: blobs there are checked against their digests, which action cache
    entries do not match.  `instance` is the instance name on the remote;
    `timeout` bounds each call (a stream that makes progress is resumed).

    A secure remote: `tls` (implied by `tls-ca` or `client-cert`) verifies it by
    the system's roots or by `tls-ca`; `client-cert` / `client-key` are presented
    for mutual TLS; `token-file` holds a bearer token sent on every call (re-read
    when it changes).  Relative paths are relative to the data dir.
    """

    type: Literal["remote"]
    address: str
    instance: str = ""
    timeout: float = Field(default=300.0, gt=0)
    tls: bool = False
    tls_ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    token_file: str | None = None

    @model_validator(mode="after")
    def _check_credentials(self) -> RemoteStorage:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client-cert and client-key go together")
        return self

    @property
    def secure(self) -> bool:
        return self.tls or self.tls_ca is not None or self.client_cert is not None

    @field_validator("address")
    @classmethod
    def _check_address(cls, address: str) -> str:
        if address.startswith("unix:"):
            return address
        try:
            parse_listen_address(address)
        except ValueError:
            raise ValueError(f"address {address!r} is not HOST:PORT (or unix:PATH)") from None
        return address

    @field_validator("instance")
    @classmethod
    def _check_instance(cls, instance: str) -> str:
        check_instance_name(instance)
        return instance


class ReadCacheStorage(Model):
    """A local `cache` in front of a slower `backend` (typically `remote`); CAS only."""

    type: Literal["read-cache"]
    backend: StorageRef
    cache: StorageRef


class PostgresStorage(Model):
    """Rows in the server's PostgreSQL `database`, shared by every replica.

    Meant for the action cache of replicas on several machines.  `namespace`
    keeps storages apart in the one table; `max-size` and `rescan-interval` bound
    it as for disk storage.
    """

    type: Literal["postgres"]
    namespace: str = ""
    max_size: ByteSize | None = Field(default=None, gt=0)
    rescan_interval: float | None = Field(default=None, gt=0)


class PackedStorage(Model):
    """Many small blobs in one SQLite database file (WAL mode): no file per blob.

    `path` is the database file (relative to the data dir).  `max-size`,
    `rescan-interval` and `fsync` as for disk storage.  `migrate-from` names a disk
    directory of an earlier layout whose blobs (up to `migrate-max-blob-size`, all
    when unset) move into the database in the background at start-up; until they
    have, they are read from there.
    """

    type: Literal["packed"]
    path: str
    max_size: ByteSize | None = Field(default=None, gt=0)
    rescan_interval: float | None = Field(default=None, gt=0)
    fsync: bool = False
    migrate_from: str | None = None
    migrate_max_blob_size: ByteSize | None = Field(default=None, gt=0)


class S3Storage(Model):
    """Objects in an S3 bucket (Amazon S3 or an S3-compatible store); CAS only.

    `endpoint-url` for S3-compatible servers (unset: AWS); `region`;
    `access-key-id-file` and `secret-access-key-file` name files holding the
    credentials (relative to the data dir; unset: the usual AWS sources, such as the
    environment, ~/.aws or an instance role); `addressing-style` auto, path or
    virtual; `timeout` per call; `max-concurrency` calls at once.  Needs
    ``pip install 'buildfleet[s3]'``.
    """

    type: Literal["s3"]
    bucket: str = Field(min_length=3)
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id_file: str | None = None
    secret_access_key_file: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    timeout: float = Field(default=60.0, gt=0)
    max_concurrency: int = Field(default=32, ge=1, le=1000)

    @model_validator(mode="after")
    def _check_credentials(self) -> S3Storage:
        if (self.access_key_id_file is None) != (self.secret_access_key_file is None):
            raise ValueError("access-key-id-file and secret-access-key-file go together")
        return self


class SplitStorage(Model):
    """Blobs up to `threshold` bytes in `small`, larger ones in `large` (CAS only):
    typically a packed store for the small ones and a disk store for the rest."""

    type: Literal["split"]
    threshold: ByteSize = Field(default=ByteSize(64 * 1024), gt=0)
    small: StorageRef
    large: StorageRef


STORAGE_TYPES = frozenset({"disk", "memory", "size-limited", "remote", "read-cache",
                           "postgres", "packed", "split", "s3"})
StorageSpec = Annotated[
    DiskStorage | MemoryStorage | SizeLimitedStorage | RemoteStorage | ReadCacheStorage
    | PostgresStorage | PackedStorage | SplitStorage | S3Storage,
    Field(discriminator="type"),
]
# A storage is either declared inline or named from the top-level `storage` map.
StorageRef = str | StorageSpec
SizeLimitedStorage.model_rebuild()
ReadCacheStorage.model_rebuild()
SplitStorage.model_rebuild()


def instance_slug(name: str) -> str:
    """A directory name for an instance's default storage."""
    return "default" if name == "" else "instance-" + quote(name, safe="")


SMALL_BLOB = 64 * 1024  # the default CAS's largest packed blob


def default_cas(name: str) -> SplitStorage:
    """Small blobs packed in `<slug>/cas.sqlite3`, larger ones in files under
    `<slug>/cas` (where earlier versions kept every blob: the small ones move)."""
    slug = instance_slug(name)
    return SplitStorage(
        type="split", threshold=ByteSize(SMALL_BLOB),
        small=PackedStorage(type="packed", path=f"{slug}/cas.sqlite3",
                            migrate_from=f"{slug}/cas",
                            migrate_max_blob_size=ByteSize(SMALL_BLOB)),
        large=DiskStorage(type="disk", path=f"{slug}/cas"))


def default_action_cache(name: str) -> PackedStorage:
    """Entries packed in `<slug>/ac.sqlite3` (earlier versions' `<slug>/ac` files move)."""
    slug = instance_slug(name)
    return PackedStorage(type="packed", path=f"{slug}/ac.sqlite3", migrate_from=f"{slug}/ac")




def default_assets(name: str) -> PackedStorage:
    """Remembered assets (Remote Asset API) packed in `<slug>/assets.sqlite3`."""
    return PackedStorage(type="packed", path=f"{instance_slug(name)}/assets.sqlite3")
