"""Settings of one bot (`buildfleet bot` options) and their defaults."""

from __future__ import annotations

import platform
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from buildfleet.client.credentials import ClientCredentials
from buildfleet.worker.limits import Limits
from buildfleet.worker.sandbox import SandboxConfig

MiB = 1024 * 1024
GiB = 1024 * MiB

# platform.machine() -> the ISA names REAPI platforms use.
_ISA_NAMES = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64",
              "i386": "x86-32", "i686": "x86-32"}


def default_bot_id() -> str:
    """The host name plus a suffix unique to this start."""
    return f"{socket.gethostname() or 'bot'}-{uuid.uuid4().hex[:8]}"


def machine_properties() -> list[tuple[str, str]]:
    """OSFamily and ISA of this machine (e.g. linux, x86-64)."""
    machine = platform.machine().lower()
    return [("OSFamily", platform.system().lower() or "unknown"),
            ("ISA", _ISA_NAMES.get(machine, machine or "unknown"))]


def parse_properties(values: Iterable[str]) -> list[tuple[str, str]]:
    """`KEY=VALUE` strings as pairs; ValueError naming a malformed one."""
    pairs: list[tuple[str, str]] = []
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"property {value!r} is not KEY=VALUE")
        pairs.append((key.strip(), rest))
    return pairs


def with_defaults(given: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The given properties, plus OSFamily / ISA of the machine for keys not given."""
    keys = {key for key, _ in given}
    pairs = list(dict.fromkeys(given))
    pairs += [(k, v) for k, v in machine_properties() if k not in keys]
    return pairs


def parse_server(url: str) -> tuple[str, bool]:
    """A `grpc://HOST:PORT` / `grpcs://HOST:PORT` / `HOST:PORT` / `unix:PATH` address as
    (gRPC target, use TLS)."""
    if url.startswith("grpcs://"):
        return url[len("grpcs://"):].rstrip("/"), True
    if url.startswith(("grpc://", "http://")):
        return url.split("://", 1)[1].rstrip("/"), False
    if url.startswith("https://"):
        return url[len("https://"):].rstrip("/"), True
    if "://" in url and not url.startswith("unix:"):
        raise ValueError(f"server address {url!r}: expected grpc://HOST:PORT or "
                         "grpcs://HOST:PORT")
    if not url:
        raise ValueError("server address is empty")
    return url, False


def open_channel(url: str, credentials: ClientCredentials | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to `url` that reconnects quickly once the server is back; TLS
    for grpcs:// (or when a CA or client certificate is given), a bearer token on
    every call when a token file is given."""
    target, secure = parse_server(url)
    credentials = credentials or ClientCredentials()
    options = [
        ("grpc.max_receive_message_length", 64 * MiB),
        ("grpc.max_send_message_length", 64 * MiB),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    interceptors = credentials.interceptors()
    if secure or credentials.tls:
        return grpc.aio.secure_channel(target, credentials.channel_credentials(),
                                       options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


@dataclass
class BotConfig:
    """Everything a bot needs to run."""

    server: str
    cas: str | None = None  # defaults to the server
    instance: str = ""
    bot_id: str = field(default_factory=default_bot_id)
    properties: list[tuple[str, str]] = field(default_factory=lambda: with_defaults([]))
    concurrency: int = 1
    work_dir: Path = Path("buildfleet-bot")
    cache_dir: Path | None = None  # defaults to <work_dir>/cache
    cache_size: int = 10 * GiB
    drain_timeout: float = 60.0  # seconds running actions get after SIGTERM
    default_timeout: float = 3600.0  # action timeout when the Action has none
    poll_timeout: float = 60.0  # deadline of each UpdateBotSession (the server holds 80%)
    min_free_space: int = 0  # bytes; below it the bot reports UNHEALTHY
    health_interval: float = 10.0  # seconds between health checks
    allow_outside_symlinks: bool = False
    reconnect_max_delay: float = 10.0  # cap of the reconnection backoff, seconds
    final_update_timeout: float = 10.0  # how long a stopping bot tries to deliver results
    credentials: ClientCredentials = field(default_factory=ClientCredentials)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # default: none
    limits: Limits = field(default_factory=Limits)  # per action (and the most one may ask)

    @property
    def actions_dir(self) -> Path:
        return self.work_dir / "actions"

    @property
    def cache_path(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.work_dir / "cache"
