"""Server configuration: a YAML file validated by pydantic, with embedded defaults.

With no file at all the server listens on 127.0.0.1:50051, keeps its data under
``./buildfleet-data`` and serves one instance named ``""`` whose CAS and action
cache are on disk.  Keys are spelled with dashes (``data-dir``); an unknown key or
a bad value stops start-up with a message that names the key.  Relative paths of
disk storage are relative to ``data-dir``.

Example::

    listen: ["0.0.0.0:50051"]
    data-dir: /var/lib/buildfleet
    storage:
      shared-cas: {type: disk, path: cas, max-size: 200GiB}
    instances:
      "": {cas: shared-cas}
      "ci": {cas: shared-cas, action-cache: {type: memory, max-size: 256MiB}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ByteSize, Field, ValidationError, field_validator, model_validator

from buildfleet.config.base import (
    DEFAULT_DATA_DIR,
    DEFAULT_LISTEN,
    RESERVED_SEGMENTS,
    ConfigError,
    Model,
    check_instance_name,
    parse_listen_address,
)
from buildfleet.config.scheduler import (
    PostgresConfig,
    SchedulerConfig,
    check_database,
    is_postgres_url,
)
from buildfleet.config.security import (
    AuthConfig,
    CertificatesConfig,
    Grant,
    JwtConfig,
    ListenerConfig,
    Role,
    TlsConfig,
)
from buildfleet.config.storage import (
    STORAGE_TYPES,
    DiskStorage,
    MemoryStorage,
    MiB,
    PackedStorage,
    PostgresStorage,
    ReadCacheStorage,
    RemoteStorage,
    S3Storage,
    SizeLimitedStorage,
    SplitStorage,
    StorageRef,
    StorageSpec,
    default_action_cache,
    default_assets,
    default_cas,
    instance_slug,
)

__all__ = [
    "AssetsConfig", "AuthConfig", "CertificatesConfig", "Grant", "JwtConfig", "ListenerConfig",
    "Role", "TlsConfig",
    "DEFAULT_DATA_DIR", "DEFAULT_LISTEN", "RESERVED_SEGMENTS", "STORAGE_TYPES", "ConfigError",
    "DiskStorage", "InstanceConfig", "MemoryStorage", "MetricsConfig", "PackedStorage",
    "PostgresConfig", "SplitStorage",
    "WebConfig",
    "PostgresStorage",
    "ReadCacheStorage", "RemoteStorage", "S3Storage", "SchedulerConfig", "ServerConfig",
    "SizeLimitedStorage", "StorageRef", "StorageSpec", "check_database", "check_instance_name",
    "default_action_cache", "default_assets", "default_cas", "instance_slug", "is_postgres_url",
    "load_config", "parse_config", "parse_listen_address",
]


class HttpEndpointConfig(Model):
    """An HTTP endpoint of the server: `listen` HOST:PORT (port 0 picks a free one);
    off when unset."""

    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, listen: str | None) -> str | None:
        if listen is not None:
            parse_listen_address(listen)
        return listen


class MetricsConfig(HttpEndpointConfig):
    """Prometheus metrics over HTTP.  The endpoint shows counts, never anyone's
    actions or data."""


class WebConfig(HttpEndpointConfig):
    """The fleet's web page over HTTP(S).  It uses the TLS of `tls` (or the server's
    top-level `tls`) unless `plaintext`; with authentication configured it asks for
    the same credentials as the Admin API."""

    tls: TlsConfig | None = None
    plaintext: bool = False

    @model_validator(mode="after")
    def _check(self) -> WebConfig:
        if self.plaintext and self.tls is not None:
            raise ValueError("plaintext and tls exclude each other")
        return self


class InstanceConfig(Model):
    """One REAPI instance: its CAS, its action cache, its scheduler and their limits."""

    cas: StorageRef | None = None
    action_cache: StorageRef | None = None
    # Where the Remote Asset API remembers assets (URI and qualifiers -> digest).
    assets: StorageRef | None = None
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    allow_action_cache_updates: bool = True
    max_batch_total_size: ByteSize = Field(default=ByteSize(4 * MiB), ge=64 * 1024)
    max_inline_size: ByteSize = Field(default=ByteSize(1 * MiB), ge=0)


class LogStreamsConfig(Model):
    """Live output of running actions (the LogStream API), kept in the server's
    memory: each stream at most `max-stream-size`, all together at most
    `max-total-size`, a finished stream `keep-for` seconds; a stream whose writer
    has been silent `idle-timeout` seconds is finished."""

    max_stream_size: ByteSize = Field(default=ByteSize(16 * MiB), gt=0)
    max_total_size: ByteSize = Field(default=ByteSize(256 * MiB), gt=0)
    keep_for: float = Field(default=600.0, gt=0)
    idle_timeout: float = Field(default=3600.0, gt=0)


class AssetsConfig(Model):
    """The Remote Asset API (Fetch and Push).  `download`: FetchBlob downloads an
    http(s) URI it does not know yet, only under one of `allow-uris` (prefixes; empty:
    any http:// or https:// URI), at most `max-download-size` bytes, following at most
    `max-redirects` redirects, within the request's timeout (`download-timeout` when it
    sets none, never more than `max-download-timeout` seconds).  `extra-qualifiers`:
    further qualifier names accepted for pushed assets."""

    enabled: bool = True
    download: bool = True
    allow_uris: list[str] = Field(default_factory=list)
    max_download_size: ByteSize = Field(default=ByteSize(4 * 1024 * MiB), gt=0)
    download_timeout: float = Field(default=300.0, gt=0)
    max_download_timeout: float = Field(default=3600.0, gt=0)
    max_redirects: int = Field(default=5, ge=0, le=50)
    extra_qualifiers: list[str] = Field(default_factory=list)

    @field_validator("allow_uris")
    @classmethod
    def _check_prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            if not prefix.lower().startswith(("http://", "https://")):
                raise ValueError(f"{prefix!r} is not an http:// or https:// URI prefix")
        return prefixes


class ServerConfig(Model):
    """The whole server."""

    listen: list[str | ListenerConfig] = Field(
        default_factory=lambda: list[str | ListenerConfig]([DEFAULT_LISTEN]), min_length=1)
    tls: TlsConfig | None = None  # for every listener that sets none of its own
    auth: AuthConfig = Field(default_factory=AuthConfig)
    # Serve a non-loopback address without authentication (refused unless set).
    insecure: bool = False
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    grace_period: float = Field(default=10.0, ge=0)
    # Where scheduler state lives: a SQLite file (relative to data-dir) by default,
    # or a postgresql:// URL (several replicas can then share it).
    database: str = "scheduler.sqlite3"
    postgres: PostgresConfig = Field(default_factory=PostgresConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    logstreams: LogStreamsConfig = Field(default_factory=LogStreamsConfig)
    assets: AssetsConfig = Field(default_factory=AssetsConfig)
    storage: dict[str, StorageSpec] = Field(default_factory=dict)
    instances: dict[str, InstanceConfig] = Field(default_factory=lambda: {"": InstanceConfig()})

    @field_validator("database")
    @classmethod
    def _check_database(cls, database: str) -> str:
        check_database(database)
        return database

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, listeners: list[str | ListenerConfig]) -> list[str | ListenerConfig]:
        for listener in listeners:
            if isinstance(listener, str):
                parse_listen_address(listener)
        return listeners

    @model_validator(mode="after")
    def _check_certificates(self) -> ServerConfig:
        if self.auth.certificates is not None and not any(
                tls is not None and tls.client_ca for _, tls in self.listeners()):
            raise ValueError("auth.certificates names principals by their client "
                             "certificates: set tls.client-ca (on a listener or for all)")
        return self

    def listeners(self) -> list[tuple[str, TlsConfig | None]]:
        """Each listen address with its TLS settings (None: plaintext)."""
        found: list[tuple[str, TlsConfig | None]] = []
        for listener in self.listen:
            if isinstance(listener, str):
                found.append((listener, self.tls))
            else:
                found.append((listener.address,
                              None if listener.plaintext else listener.tls or self.tls))
        return found

    def web_tls(self) -> TlsConfig | None:
        """The web page's TLS (None: plain HTTP)."""
        return None if self.web.plaintext else self.web.tls or self.tls

    def addresses(self) -> list[str]:
        return [address for address, _ in self.listeners()]

    def data_path(self, path: str) -> Path:
        """A configured file path: relative ones are relative to the data dir."""
        resolved = Path(path)
        return resolved if resolved.is_absolute() else Path(self.data_dir) / resolved

    @field_validator("instances")
    @classmethod
    def _check_instance_names(cls, instances: dict[str, Any]) -> dict[str, Any]:
        if not instances:
            raise ValueError("at least one instance is required")
        for name in instances:
            check_instance_name(name)
        return instances

    @model_validator(mode="after")
    def _check_references(self) -> ServerConfig:
        self.check_storage()
        return self

    def check_storage(self) -> None:
        """ValueError unless every storage reference resolves and fits where it is used."""
        def check(ref: StorageRef | None, where: str) -> None:
            if isinstance(ref, str):
                if ref not in self.storage:
                    known = ", ".join(sorted(self.storage)) or "none declared"
                    raise ValueError(f"{where}: no storage named {ref!r} (storage: {known})")
            elif isinstance(ref, SizeLimitedStorage):
                check(ref.backend, f"{where}.backend")
                unbounded = kinds(ref.backend) & {"remote", "read-cache", "s3"}
                if unbounded:
                    raise ValueError(f"{where}.backend: size-limited cannot bound "
                                     f"{sorted(unbounded)[0]} storage (its blobs cannot be "
                                     "evicted one by one); bound the cache of a read-cache "
                                     "instead")
            elif isinstance(ref, ReadCacheStorage):
                check(ref.backend, f"{where}.backend")
                check(ref.cache, f"{where}.cache")
                if isinstance(ref.cache, str) and ref.cache == ref.backend:
                    raise ValueError(f"{where}: backend and cache are the same storage "
                                     f"{ref.cache!r}")
                remote = kinds(ref.cache) & {"remote", "s3"}
                if remote:
                    raise ValueError(f"{where}.cache: the cache of a read-cache must be local "
                                     f"storage (disk, memory, size-limited), not "
                                     f"{sorted(remote)[0]}")
            elif isinstance(ref, SplitStorage):
                check(ref.small, f"{where}.small")
                check(ref.large, f"{where}.large")

        def kinds(ref: StorageRef, trail: tuple[str, ...] = ()) -> set[str]:
            """The storage types `ref` is built from, following names."""
            if isinstance(ref, str):
                if ref not in self.storage:
                    return set()  # reported by `check`
                if ref in trail:
                    cycle = " -> ".join((*trail, ref))
                    raise ValueError(f"storage {ref!r} refers to itself ({cycle})")
                return kinds(self.storage[ref], (*trail, ref))
            found: set[str] = {ref.type}
            if isinstance(ref, SizeLimitedStorage):
                found |= kinds(ref.backend, trail)
            elif isinstance(ref, ReadCacheStorage):
                found |= kinds(ref.backend, trail) | kinds(ref.cache, trail)
            elif isinstance(ref, SplitStorage):
                found |= kinds(ref.small, trail) | kinds(ref.large, trail)
            return found

        used: set[str] = set()
        for name, spec in self.storage.items():
            check(spec, f"storage.{name}")
            used |= kinds(name)
        for name, instance in self.instances.items():
            check(instance.cas, f"instances.{name!r}.cas")
            check(instance.action_cache, f"instances.{name!r}.action-cache")
            check(instance.assets, f"instances.{name!r}.assets")
            for ref in (instance.cas, instance.action_cache, instance.assets):
                if ref is not None:
                    used |= kinds(ref)
            for key, ref in (("action-cache", instance.action_cache),
                             ("assets", instance.assets)):
                cas_only = sorted(kinds(ref) & {"remote", "read-cache", "split", "s3"}) \
                    if ref is not None else []
                if cas_only:
                    raise ValueError(
                        f"instances.{name!r}.{key}: {cas_only[0]} storage holds CAS blobs "
                        "only (these entries do not match their keys' digests); use disk, "
                        "packed, memory, size-limited or postgres storage")
        if "postgres" in used and not is_postgres_url(self.database):
            raise ValueError("postgres storage keeps blobs in the server's database: "
                             "set `database` to a postgresql:// URL")

    def resolve(self, ref: StorageRef) -> StorageSpec:
        """The storage spec that a reference names."""
        return self.storage[ref] if isinstance(ref, str) else ref

    def with_overrides(self, *, listen: list[str] | None = None,
                       data_dir: Path | None = None,
                       database: str | None = None,
                       insecure: bool | None = None) -> ServerConfig:
        """A copy with command-line overrides applied."""
        update: dict[str, Any] = {}
        if insecure:
            update["insecure"] = True
        if database is not None:
            check_database(database)
            update["database"] = database
        if listen:
            for address in listen:
                parse_listen_address(address)
            update["listen"] = list(listen)
        if data_dir is not None:
            update["data_dir"] = data_dir
        config = self.model_copy(update=update)
        config.check_storage()
        return config


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    skip_tag = False
    for index, part in enumerate(loc):
        text = str(part)
        holder = loc[index - 1] if index else None
        holders = ("cas", "action-cache", "assets", "backend", "cache")
        if text in STORAGE_TYPES and (holder in holders
                                      or (index >= 2 and loc[index - 2] == "storage")):
            continue  # the storage's `type`, which pydantic inserts into the path
        if skip_tag:  # the discriminator value that pydantic puts after a tagged union
            skip_tag = False
            continue
        if text.startswith("tagged-union["):
            skip_tag = True
            continue
        if text.startswith("function-") or text == "str":
            continue
        parts.append('""' if text == "" else text)
    return ".".join(parts) or "(top level)"


def _format(error: ValidationError) -> str:
    items = error.errors()
    # A storage reference may be a name or a mapping; when a mapping was given, the
    # complaint that it is not a string is noise.
    useful = [i for i in items if not (i["type"] == "string_type" and "str" in i["loc"])]
    lines = []
    for item in useful or items:
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(f"  {_location(item['loc'])}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_config(data: Any, source: str = "configuration") -> ServerConfig:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: {_format(error)}") from None


def load_config(path: str | Path | None) -> ServerConfig:
    """Read the YAML file at `path`, or the embedded defaults when None."""
    if path is None:
        return ServerConfig()
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read configuration {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data, str(path))
