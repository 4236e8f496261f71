"""Who may do what: TLS on the listeners, the kinds of credentials the server accepts,
and the grants (role, instances) that credentials carry.

Roles (see the README's role table):

- ``read``: Capabilities, CAS and ByteStream reads, FindMissingBlobs, GetTree,
  GetActionResult;
- ``execute``: ``read`` plus CAS writes, Execute, WaitExecution and the Operations
  calls on the principal's own operations;
- ``cache-write``: UpdateActionResult;
- ``bot``: the Bots service and the CAS calls a bot needs (optionally only for bot
  ids matching a pattern);
- ``admin``: everything, including every principal's operations and bot sessions.

A grant is a role on the instances whose names match a glob (``*`` matches every
name, the unnamed instance "" included).  In YAML a grant is a mapping
(``{role: bot, instances: "ci/*", bot-ids: "linux-*"}``) or a string
``role`` or ``role:instance-glob``.  File paths are relative to the data dir.
"""

from __future__ import annotations

import enum
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import Field, model_validator

from buildfleet.config.base import Model


class Role(enum.StrEnum):
    READ = "read"
    EXECUTE = "execute"
    CACHE_WRITE = "cache-write"
    BOT = "bot"
    ADMIN = "admin"


# What holding a role lets a principal do: its own role and the ones it includes.
INCLUDES: dict[Role, frozenset[Role]] = {
    Role.READ: frozenset({Role.READ}),
    Role.EXECUTE: frozenset({Role.EXECUTE, Role.READ}),
    Role.CACHE_WRITE: frozenset({Role.CACHE_WRITE}),
    Role.BOT: frozenset({Role.BOT}),
    Role.ADMIN: frozenset(Role),
}


class Grant(Model):
    """A role on the instances matching `instances` (and, for bots, bot ids)."""

    role: Role
    instances: str = "*"
    bot_ids: str = "*"

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            role, _, instances = value.partition(":")
            return {"role": role.strip(), "instances": instances if _ else "*"}
        return value

    def allows(self, role: Role, instance: str, bot_id: str | None = None) -> bool:
        return (role in INCLUDES[self.role]
                and (self.instances == "*" or fnmatchcase(instance, self.instances))
                and (bot_id is None or self.bot_ids == "*" or fnmatchcase(bot_id, self.bot_ids)))

    def __str__(self) -> str:
        text = f"{self.role.value}:{self.instances}"
        return text if self.bot_ids == "*" else f"{text} (bot ids {self.bot_ids})"


class TlsConfig(Model):
    """A certificate and its key (PEM files); with `client-ca`, clients must present a
    certificate signed by it (mutual TLS).  The files are re-read when they change."""

    cert: str
    key: str
    client_ca: str | None = None


class ListenerConfig(Model):
    """One listen address with settings of its own."""

    address: str
    tls: TlsConfig | None = None  # none: the top-level `tls`, if any
    plaintext: bool = False  # no TLS on this listener even when `tls` is set

    @model_validator(mode="after")
    def _check(self) -> ListenerConfig:
        from buildfleet.config.base import parse_listen_address

        parse_listen_address(self.address)
        if self.plaintext and self.tls is not None:
            raise ValueError(f"listener {self.address}: plaintext and tls exclude each other")
        return self


class JwtConfig(Model):
    """Bearer tokens that are JSON Web Tokens, verified against the keys of a JWKS file
    (RS256, ES256, PS256, EdDSA) or a shared secret file (HS256)."""

    jwks_file: str | None = None
    secret_file: str | None = None
    issuer: str | None = None
    audience: str | None = None
    principal_claim: str = "sub"  # the claim that names the principal
    roles_claim: str = "roles"  # the claim listing its grants (strings as in YAML)
    algorithms: list[str] | None = None
    leeway: float = Field(default=30.0, ge=0)  # seconds of clock skew tolerated

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtConfig:
        if (self.jwks_file is None) == (self.secret_file is None):
            raise ValueError("set exactly one of jwks-file and secret-file")
        return self

    def allowed_algorithms(self) -> list[str]:
        if self.algorithms:
            return list(self.algorithms)
        return ["HS256"] if self.secret_file else ["RS256", "ES256", "PS256", "EdDSA"]


class CertificatesConfig(Model):
    """Principals named by the verified client certificate of mutual TLS."""

    principal_from: Literal["common-name", "san"] = "common-name"
    # principal name glob -> grants; a principal gets the grants of every glob it matches
    grants: dict[str, list[Grant]] = Field(default_factory=dict)


class AuthConfig(Model):
    """The credentials the server accepts, in any combination."""

    tokens_file: str | None = None  # bearer tokens, stored hashed (see the README)
    jwt: JwtConfig | None = None
    certificates: CertificatesConfig | None = None

    @property
    def configured(self) -> bool:
        return (self.tokens_file is not None or self.jwt is not None
                or self.certificates is not None)

    def kinds(self) -> list[str]:
        """What a client may present, for messages."""
        found = []
        if self.tokens_file is not None or self.jwt is not None:
            found.append("a bearer token (metadata `authorization: Bearer <token>`)")
        if self.certificates is not None:
            found.append("a client certificate signed by the server's client CA")
        return found
