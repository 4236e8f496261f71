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

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = "./buildfleet-data"
MiB = 1024 * 1024

# Path segments that REAPI resource names use as markers; an instance name
# containing one could not be told apart from the rest of a resource name.
RESERVED_SEGMENTS = frozenset({
    "blobs", "uploads", "actions", "actionResults", "operations", "capabilities",
    "compressed-blobs",
})


class ConfigError(Exception):
    """The configuration is invalid; the message names every offending key."""


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=lambda name: name.replace("_", "-"),
        populate_by_name=True,
        frozen=True,
    )


class DiskStorage(_Model):
    """Files under a directory; survives restarts."""

    type: Literal["disk"]
    path: str
    max_size: ByteSize | None = Field(default=None, gt=0)
    fsync: bool = False
    # With max-size: rescan the directory this often (seconds) to count blobs that
    # other processes sharing it stored or deleted (see storage/size_limited.py).
    rescan_interval: float | None = Field(default=None, gt=0)


class MemoryStorage(_Model):
    """A dict in the server process, bounded with least-recently-used eviction."""

    type: Literal["memory"]
    max_size: ByteSize = Field(default=ByteSize(1024 * MiB), gt=0)


class SizeLimitedStorage(_Model):
    """Any backend, bounded with least-recently-used eviction."""

    type: Literal["size-limited"]
    max_size: ByteSize = Field(gt=0)
    backend: StorageRef


class RemoteStorage(_Model):
    """Another REAPI CAS over gRPC (a buildfleet server serving only CAS, or any other).

    CAS only: blobs there are checked against their digests, which action cache
    entries do not match.  `instance` is the instance name on the remote;
    `timeout` bounds each call (a stream that makes progress is resumed).
    """

    type: Literal["remote"]
    address: str
    instance: str = ""
    timeout: float = Field(default=300.0, gt=0)

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


class ReadCacheStorage(_Model):
    """A local `cache` in front of a slower `backend` (typically `remote`); CAS only."""

    type: Literal["read-cache"]
    backend: StorageRef
    cache: StorageRef


class PostgresStorage(_Model):
    """Rows in the server's PostgreSQL `database`, shared by every replica.

    Meant for the action cache of replicas on several machines.  `namespace`
    keeps storages apart in the one table; `max-size` and `rescan-interval` bound
    it as for disk storage.
    """

    type: Literal["postgres"]
    namespace: str = ""
    max_size: ByteSize | None = Field(default=None, gt=0)
    rescan_interval: float | None = Field(default=None, gt=0)


STORAGE_TYPES = frozenset({"disk", "memory", "size-limited", "remote", "read-cache",
                           "postgres"})
StorageSpec = Annotated[
    DiskStorage | MemoryStorage | SizeLimitedStorage | RemoteStorage | ReadCacheStorage
    | PostgresStorage,
    Field(discriminator="type"),
]
# A storage is either declared inline or named from the top-level `storage` map.
StorageRef = str | StorageSpec
SizeLimitedStorage.model_rebuild()
ReadCacheStorage.model_rebuild()


class SchedulerConfig(_Model):
    """Execution on an instance: how actions are queued and handed to bots.

    The one settings model of the scheduler: both strategies read it as it is.
    Durations are seconds.
    """

    enabled: bool = True
    max_attempts: int = Field(default=5, ge=1)  # leases that may end in infrastructure failure
    keepalive: float = Field(default=60.0, gt=0)  # a silent session lives this long
    # A bot holding leases calls at least once per busy-poll; silent this long, its
    # leases go back to the queue (the session lives on until the keepalive).
    lease_timeout: float = Field(default=10.0, gt=0)
    long_poll: float = Field(default=60.0, gt=0)  # hold bound of an update without deadline
    busy_poll: float = Field(default=1.0, gt=0)  # hold bound while the bot runs leases
    default_timeout: float = Field(default=3600.0, gt=0)  # when the Action sets none
    max_timeout: float = Field(default=86400.0, gt=0)  # larger Action.timeout is refused
    timeout_grace: float = Field(default=30.0, ge=0)  # extra time before a job is ended
    unmatched_timeout: float = Field(default=300.0, gt=0)  # fail jobs no live bot can run
    max_queued: int = Field(default=100_000, ge=1)  # queued jobs before RESOURCE_EXHAUSTED
    fairness_share: float = Field(default=0.1, ge=0, le=1)  # picks that take the oldest job
    lease_offer: Literal["active", "pending"] = "active"
    # The bot that failed an action gets it again only when no other bot could run
    # it, and only after this delay (doubled per attempt, at most retry-backoff-max).
    retry_backoff: float = Field(default=1.0, ge=0)
    retry_backoff_max: float = Field(default=30.0, ge=0)
    completed_retention: float = Field(default=3600.0, gt=0)  # keep finished operations
    cache_failed_results: bool = False  # also cache results with a non-zero exit code
    bot_label_key: str = "OSFamily"  # property that labels bots in metrics
    housekeeping_interval: float = Field(default=1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _check_lease_timeout(self) -> SchedulerConfig:
        if self.lease_timeout <= self.busy_poll:
            raise ValueError(f"lease-timeout ({self.lease_timeout:g}) must be longer than "
                             f"busy-poll ({self.busy_poll:g}): a bot holding leases calls "
                             "once per busy-poll")
        return self

    @property
    def offer_pending(self) -> bool:
        """Offer leases PENDING with Any(Digest) payloads (older bots) instead of ACTIVE."""
        return self.lease_offer == "pending"

    @property
    def tick(self) -> float:
        """Seconds between housekeeping passes."""
        return self.housekeeping_interval


class InstanceConfig(_Model):
    """One REAPI instance: its CAS, its action cache, its scheduler and their limits."""

    cas: StorageRef | None = None
    action_cache: StorageRef | None = None
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    allow_action_cache_updates: bool = True
    max_batch_total_size: ByteSize = Field(default=ByteSize(4 * MiB), ge=64 * 1024)
    max_inline_size: ByteSize = Field(default=ByteSize(1 * MiB), ge=0)


class PostgresConfig(_Model):
    """The PostgreSQL connection pool, when `database` is a postgresql:// URL.

    `mode`: ``replicated`` (the default) keeps the scheduler's state in the
    database, so several `buildfleet serve` replicas can share it;
    ``single-server`` keeps it in the one server's memory and writes it behind to
    the database (the way SQLite is used): faster, but only one server process
    may use the database at a time.
    """

    mode: Literal["replicated", "single-server"] = "replicated"
    pool_min: int = Field(default=1, ge=1)
    pool_max: int = Field(default=10, ge=1)
    statement_timeout: float = Field(default=10.0, gt=0)  # seconds
    connect_timeout: float = Field(default=5.0, gt=0)  # seconds
    retry_after: float = Field(default=1.0, gt=0)  # the retry hint while it is down

    @model_validator(mode="after")
    def _check_pool(self) -> PostgresConfig:
        if self.pool_max < self.pool_min:
            raise ValueError(f"pool-max ({self.pool_max}) is below pool-min ({self.pool_min})")
        return self


class ServerConfig(_Model):
    """The whole server."""

    listen: list[str] = Field(default_factory=lambda: [DEFAULT_LISTEN], min_length=1)
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    grace_period: float = Field(default=10.0, ge=0)
    # Where scheduler state lives: a SQLite file (relative to data-dir) by default,
    # or a postgresql:// URL (several replicas can then share it).
    database: str = "scheduler.sqlite3"
    postgres: PostgresConfig = Field(default_factory=PostgresConfig)
    storage: dict[str, StorageSpec] = Field(default_factory=dict)
    instances: dict[str, InstanceConfig] = Field(default_factory=lambda: {"": InstanceConfig()})

    @field_validator("database")
    @classmethod
    def _check_database(cls, database: str) -> str:
        check_database(database)
        return database

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, addresses: list[str]) -> list[str]:
        for address in addresses:
            parse_listen_address(address)
        return addresses

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
                unbounded = kinds(ref.backend) & {"remote", "read-cache"}
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
                if "remote" in kinds(ref.cache):
                    raise ValueError(f"{where}.cache: the cache of a read-cache must be local "
                                     "storage (disk, memory, size-limited), not remote")

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
            return found

        used: set[str] = set()
        for name, spec in self.storage.items():
            check(spec, f"storage.{name}")
            used |= kinds(name)
        for name, instance in self.instances.items():
            check(instance.cas, f"instances.{name!r}.cas")
            check(instance.action_cache, f"instances.{name!r}.action-cache")
            for ref in (instance.cas, instance.action_cache):
                if ref is not None:
                    used |= kinds(ref)
            if instance.action_cache is not None:
                cas_only = sorted(kinds(instance.action_cache) & {"remote", "read-cache"})
                if cas_only:
                    raise ValueError(
                        f"instances.{name!r}.action-cache: {cas_only[0]} storage holds CAS "
                        "blobs only (action cache entries do not match their keys' digests); "
                        "use disk, memory, size-limited or postgres storage")
        if "postgres" in used and not is_postgres_url(self.database):
            raise ValueError("postgres storage keeps blobs in the server's database: "
                             "set `database` to a postgresql:// URL")

    def resolve(self, ref: StorageRef) -> StorageSpec:
        """The storage spec that a reference names."""
        return self.storage[ref] if isinstance(ref, str) else ref

    def with_overrides(self, *, listen: list[str] | None = None,
                       data_dir: Path | None = None,
                       database: str | None = None) -> ServerConfig:
        """A copy with command-line overrides applied."""
        update: dict[str, Any] = {}
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


def check_database(database: str) -> None:
    """ValueError unless `database` is a SQLite file path or a PostgreSQL URL."""
    if not database.strip():
        raise ValueError("the database must be a SQLite file or a postgresql:// URL, "
                         "not empty")
    if "://" in database and not database.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"the database must be a SQLite file or a postgresql:// URL, not "
                         f"{database.partition('://')[0]}://...")


def is_postgres_url(database: str) -> bool:
    """Whether a `database` setting names PostgreSQL rather than a SQLite file."""
    return database.startswith(("postgresql://", "postgres://"))


def instance_slug(name: str) -> str:
    """A directory name for an instance's default storage."""
    return "default" if name == "" else "instance-" + quote(name, safe="")


def default_cas(name: str) -> DiskStorage:
    return DiskStorage(type="disk", path=f"{instance_slug(name)}/cas")


def default_action_cache(name: str) -> DiskStorage:
    return DiskStorage(type="disk", path=f"{instance_slug(name)}/ac")


def check_instance_name(name: str) -> None:
    if name == "":
        return
    segments = name.split("/")
    if any(segment == "" for segment in segments):
        raise ValueError(f"instance name {name!r}: empty path segment")
    for segment in segments:
        if segment in RESERVED_SEGMENTS or segment in (".", ".."):
            raise ValueError(
                f"instance name {name!r}: segment {segment!r} is reserved in resource names"
            )


_LISTEN = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]+):(?P<port>\d{1,5})")


def parse_listen_address(address: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 hosts in brackets); ValueError when malformed."""
    match = _LISTEN.fullmatch(address)
    if match is None or int(match["port"]) > 65535:
        raise ValueError(f"listen address {address!r} is not HOST:PORT")
    return match["host"], int(match["port"])


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    skip_tag = False
    for index, part in enumerate(loc):
        text = str(part)
        holder = loc[index - 1] if index else None
        if text in STORAGE_TYPES and (holder in ("cas", "action-cache", "backend", "cache")
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
