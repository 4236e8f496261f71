"""The credentials of buildfleet's own clients (the bot): TLS with a chosen CA, a
client certificate for mutual TLS, and a bearer token read from a file, re-read
when the file changes (a rotated token is used from the next call on)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from buildfleet.auth.files import Watched

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientCredentials:
    tls_ca: Path | None = None  # PEM roots to verify the server by (default: the system's)
    client_cert: Path | None = None  # PEM certificate chain for mutual TLS
    client_key: Path | None = None
    token_file: Path | None = None  # a file holding the bearer token
    force_tls: bool = False  # TLS even without a CA or client certificate (system roots)

    @property
    def tls(self) -> bool:
        return self.force_tls or self.tls_ca is not None or self.client_cert is not None

    def check(self, prefix: str = "--") -> None:
        """ValueError naming the option (`prefix` + its name) when the files cannot be
        used."""
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(f"{prefix}client-cert and {prefix}client-key go together")
        for option, path in (("tls-ca", self.tls_ca), ("client-cert", self.client_cert),
                             ("client-key", self.client_key),
                             ("token-file", self.token_file)):
            option = prefix + option
            if path is not None and not path.is_file():
                raise ValueError(f"{option} {path}: no such file")
        if self.token_file is not None:
            read_token(self.token_file.read_bytes())

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return None if path is None else path.read_bytes()

        return grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca),
                                            private_key=read(self.client_key),
                                            certificate_chain=read(self.client_cert))

    def interceptors(self) -> list[Any]:
        if self.token_file is None:
            return []
        return bearer_interceptors(Watched(self.token_file, read_token))


def read_token(data: bytes) -> str:
    token = data.decode(errors="replace").strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError("the token file must hold one token (no spaces, not empty)")
    return token


class TokenSource(Protocol):
    def get(self) -> str:
        """The bearer token to send now."""
        ...


class _Bearer:
    """Adds `authorization: Bearer <token>` to a call; the token file is re-read when it
    changes."""

    def __init__(self, token: TokenSource) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata: Sequence[tuple[str, str | bytes]] = tuple(details.metadata or ())
        metadata = (*metadata, ("authorization", f"Bearer {self._token.get()}"))
        return grpc.aio.ClientCallDetails(details.method, details.timeout,
                                          grpc.aio.Metadata(*metadata), details.credentials,
                                          details.wait_for_ready)


# grpc.aio files each interceptor under one kind of call only: one class per kind.
class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any,
                                    request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any,
                                     request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any,
                                     requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any,
                                      requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def bearer_interceptors(token: TokenSource) -> list[Any]:
    """Client interceptors sending `token` with every call (cheaper than call
    credentials, whose plugin runs on a thread for each call)."""
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
