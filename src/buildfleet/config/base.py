"""What every configuration model shares: strictness, dashed keys, clear errors."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = "./buildfleet-data"
MiB = 1024 * 1024

# Path segments that REAPI resource names use as markers; an instance name
# containing one could not be told apart from the rest of a resource name.
RESERVED_SEGMENTS = frozenset({
    "blobs", "uploads", "actions", "actionResults", "operations", "capabilities",
    "compressed-blobs", "logstreams",
})


class ConfigError(Exception):
    """The configuration is invalid; the message names every offending key."""


class Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=lambda name: name.replace("_", "-"),
        populate_by_name=True,
        frozen=True,
    )


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


def shown_host(host: str) -> str:
    """A listen host as a URL names it: a wildcard address becomes this machine's
    loopback, an IPv6 address gets brackets."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown


def parse_listen_address(address: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 hosts in brackets); ValueError when malformed."""
    match = _LISTEN.fullmatch(address)
    if match is None or int(match["port"]) > 65535:
        raise ValueError(f"listen address {address!r} is not HOST:PORT")
    return match["host"], int(match["port"])


