"""Who a call comes from, whichever kind of credentials it carries."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from buildfleet.auth.certificates import CertificatePrincipals
from buildfleet.auth.jwt_tokens import JwtVerifier
from buildfleet.auth.principal import Principal, Unauthenticated
from buildfleet.auth.tokens import TokenTable
from buildfleet.config.base import ConfigError
from buildfleet.config.security import AuthConfig

T = TypeVar("T")


def _loaded(key: str, load: Callable[[], T]) -> T:
    try:
        return load()
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {error.filename}: {error.strerror}") from None
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("ey")


class Authenticator:
    """Turns a call's metadata and peer into a principal, or refuses it."""

    def __init__(self, config: AuthConfig, resolve: Callable[[str], Path]) -> None:
        """ConfigError naming the key when a file it names cannot be read or parsed."""
        self.config = config
        self._tokens: TokenTable | None = None
        self._jwt: JwtVerifier | None = None
        tokens_file, jwt_config = config.tokens_file, config.jwt
        if tokens_file is not None:
            self._tokens = _loaded("auth.tokens-file",
                                   lambda: TokenTable(resolve(tokens_file)))
        if jwt_config is not None:
            self._jwt = _loaded("auth.jwt", lambda: JwtVerifier(jwt_config, resolve))
        self._certificates = (CertificatePrincipals(config.certificates)
                              if config.certificates else None)

    def accepts(self) -> str:
        return " or ".join(self.config.kinds())

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]],
                     auth_context: Callable[[], Mapping[str, Sequence[bytes]]]) -> Principal:
        """The principal; Unauthenticated (with the reason) when there is none.
        `auth_context` gives the peer's verified certificate, asked for only when the
        call carries no bearer token (it costs a copy out of gRPC on every call)."""
        token = self._bearer(metadata)
        if token is not None:
            if self._jwt is not None and _looks_like_jwt(token):
                return self._jwt.principal(token)
            if self._tokens is not None:
                principal = self._tokens.principal(token)
                if principal is not None:
                    return principal
            raise Unauthenticated("the bearer token is not known to this server")
        if self._certificates is not None:
            principal = self._certificates.principal(auth_context())
            if principal is not None:
                return principal
        raise Unauthenticated("the call carries no credentials")

    @staticmethod
    def _bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        for key, value in metadata:
            if key == "authorization":
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                scheme, _, credentials = text.strip().partition(" ")
                if scheme.lower() != "bearer" or not credentials.strip():
                    raise Unauthenticated("the authorization metadata is not "
                                          "`Bearer <token>`")
                return credentials.strip()
        return None
