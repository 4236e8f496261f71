"""Bearer tokens from a file, each stored as its SHA-256.

    # tokens.yaml
    tokens:
      - sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        principal: alice
        grants: [execute, "cache-write:ci/*"]

`buildfleet auth token` prints a new token and its entry.  The file is re-read
when it changes (rotation and revocation without a restart).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from buildfleet.auth.files import Watched
from buildfleet.auth.pki import write_private
from buildfleet.auth.principal import Principal
from buildfleet.config.security import Grant

_HEX = re.compile(r"[0-9a-f]{64}")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    principal: str = Field(min_length=1)
    grants: list[Grant] = Field(default_factory=list)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[_Entry] = Field(default_factory=list)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def parse(data: bytes) -> dict[str, Principal]:
    """SHA-256 -> principal; ValueError naming what is wrong."""
    try:
        document = yaml.safe_load(data) or {}
        parsed = _File.model_validate(document)
    except (yaml.YAMLError, ValidationError) as error:
        raise ValueError(str(error).splitlines()[0] if str(error) else "not valid") from None
    table: dict[str, Principal] = {}
    for index, entry in enumerate(parsed.tokens):
        hashed = entry.sha256.strip().lower()
        if not _HEX.fullmatch(hashed):
            raise ValueError(f"tokens[{index}].sha256 is not 64 hex digits")
        table[hashed] = Principal(entry.principal, tuple(entry.grants), "token")
    return table


def add_entries(path: Path, entries: Sequence[Mapping[str, object]], *,
                replacing: frozenset[str] = frozenset()) -> None:
    """Add `entries` to the tokens file at `path` (created if missing), first dropping
    the entries of the principals in `replacing`; every other entry is kept.  The
    file is replaced whole.  ValueError when the existing file does not parse (it is
    left as it is)."""
    document: dict[str, object] = {}
    if path.exists():
        data = path.read_bytes()
        try:
            parse(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        document = yaml.safe_load(data) or {}
    kept = [entry for entry in document.get("tokens") or []  # type: ignore[attr-defined]
            if entry.get("principal") not in replacing]
    document["tokens"] = [*kept, *entries]
    write_private(path, yaml.safe_dump(document, sort_keys=False).encode())


class TokenTable:
    """The principals of the tokens in a file."""

    def __init__(self, path: Path) -> None:
        self._file = Watched(path, parse)

    def principal(self, token: str) -> Principal | None:
        return self._file.get().get(digest(token))
