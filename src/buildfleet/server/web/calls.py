"""The page's calls into the Admin API, made in process with the visitor's
credentials and checked by the same rules as gRPC calls (`server.auth.RULES`).

A page call never crosses the network a second time: the Admin service's method is
called directly, in a task of its own with the visitor's principal set, and its
refusals and errors come back as `CallFailed` with the gRPC status the same call
over gRPC would have ended with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import Message

from buildfleet.auth.principal import Principal, Unauthenticated
from buildfleet.server.admin.service import AdminService
from buildfleet.server.auth import RULES, AuthInterceptor, Refusal
from buildfleet.server.principal import PRINCIPAL

ADMIN = "/buildfleet.admin.v1.Admin/"


class CallFailed(grpc.aio.AbortError):
    """A page call ended with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Credentials:
    """What a visitor presents: a bearer token (from the login cookie) and, on a
    listener that asks for client certificates, the verified certificate."""

    token: str | None = None
    certificate: Mapping[str, Sequence[bytes]] = field(default_factory=dict)
    peer: str = ""

    def metadata(self) -> list[tuple[str, str]]:
        return [] if self.token is None else [("authorization", f"Bearer {self.token}")]


def certificate_context(der: bytes | None) -> dict[str, list[bytes]]:
    """A verified peer certificate (DER) as gRPC's auth context shows one, for the
    certificate principals of `auth.certificates`; empty without one."""
    if not der:
        return {}
    certificate = x509.load_der_x509_certificate(der)
    context: dict[str, list[bytes]] = {
        "transport_security_type": [b"ssl"],
        "x509_pem_cert": [certificate.public_bytes(serialization.Encoding.PEM)],
        "x509_common_name": [str(attribute.value).encode() for attribute in
                             certificate.subject.get_attributes_for_oid(
                                 x509.NameOID.COMMON_NAME)],
    }
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        context["x509_subject_alternative_name"] = [
            str(name).encode() for name in names.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    return context


class _PageContext:
    """What the Admin service and the authentication rules ask of a call's context."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._credentials.metadata()

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        return self._credentials.certificate

    def peer(self) -> str:
        return self._credentials.peer

    def set_trailing_metadata(self, metadata: object) -> None:
        """Status details are not shown on the page: the message says enough."""

    async def abort(self, code: grpc.StatusCode, message: str) -> NoReturn:
        raise CallFailed(code, message)


class AdminCalls:
    """Calls the Admin service as a visitor: `guard` is the server's authentication
    (None when it is not configured: every visitor may do everything)."""

    def __init__(self, admin: AdminService, guard: AuthInterceptor | None) -> None:
        self.admin = admin
        self.guard = guard

    @property
    def authenticating(self) -> bool:
        return self.guard is not None

    def principal(self, credentials: Credentials) -> Principal | None:
        """Who the visitor is (None: authentication is off); CallFailed
        (UNAUTHENTICATED) when the credentials are missing or not valid."""
        if self.guard is None:
            return None
        try:
            return self.guard.authenticator.authenticate(credentials.metadata(),
                                                         lambda: credentials.certificate)
        except Unauthenticated as error:
            raise CallFailed(grpc.StatusCode.UNAUTHENTICATED, str(error)) from None

    def admit(self, method: str, request: Message, credentials: Credentials
              ) -> Principal | None:
        """The visitor's principal if it may make the call `method` (a full method
        name) with `request`; CallFailed with the refusal otherwise."""
        if self.guard is None:
            return None
        try:
            return self.guard.admit(method, RULES.get(method), request,
                                    _PageContext(credentials))  # type: ignore[arg-type]
        except Refusal as refusal:
            raise CallFailed(refusal.code, refusal.message) from None

    async def call(self, method: str, request: Message, credentials: Credentials) -> Any:
        """The Admin service's answer to `request` (method: its short name)."""
        principal = self.admit(ADMIN + method, request, credentials)
        context = _PageContext(credentials)

        async def run() -> Any:
            PRINCIPAL.set(principal)  # in this task's own copy of the context
            return await getattr(self.admin, method)(request, context)

        return await asyncio.create_task(run())
