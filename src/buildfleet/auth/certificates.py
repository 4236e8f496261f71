"""Principals named by a verified client certificate (mutual TLS).

gRPC has verified the certificate against the listener's client CA before any
call is served; its subject's common name (or its first subject alternative
name) names the principal, whose grants are those of every configured name
glob it matches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from buildfleet.auth.principal import Principal
from buildfleet.config.security import CertificatesConfig, Grant

_FIELDS = {"common-name": "x509_common_name", "san": "x509_subject_alternative_name"}


class CertificatePrincipals:
    def __init__(self, config: CertificatesConfig) -> None:
        self._field = _FIELDS[config.principal_from]
        self._grants = config.grants

    def principal(self, auth_context: Mapping[str, Sequence[bytes]]) -> Principal | None:
        """The principal of the call's verified peer certificate, if it presented one."""
        if auth_context.get("transport_security_type") != [b"ssl"]:
            return None
        values = auth_context.get(self._field) or []
        if not values or not auth_context.get("x509_pem_cert"):
            return None
        name = values[0].decode(errors="replace")
        grants: list[Grant] = []
        for pattern, granted in self._grants.items():
            if fnmatchcase(name, pattern):
                grants += granted
        return Principal(name, tuple(grants), "certificate")
