"""The TLS credentials of a listener, checked at start-up and re-read when the files
change (a rotated certificate is used for new connections without a restart)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from buildfleet.config.base import ConfigError
from buildfleet.config.security import TlsConfig

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0  # seconds between looks at the files (at most once per handshake)


@dataclass(frozen=True)
class Identity:
    cert: bytes
    key: bytes
    client_ca: bytes | None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{what}: cannot read {path}: {error.strerror}") from None


def load_identity(tls: TlsConfig, resolve: Callable[[str], Path], where: str = "tls"
                  ) -> Identity:
    """The PEM files of `tls`; ConfigError naming the key when one is unreadable, not
    PEM, or a key that does not belong to the certificate."""
    cert_path, key_path = resolve(tls.cert), resolve(tls.key)
    cert, key = _read(cert_path, f"{where}.cert"), _read(key_path, f"{where}.key")
    try:
        certificate = x509.load_pem_x509_certificate(cert)
    except ValueError:
        raise ConfigError(f"{where}.cert: {cert_path} is not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}.key: {key_path} is not an unencrypted PEM private "
                          "key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise ConfigError(f"{where}.key: {key_path} does not belong to the certificate "
                          f"{cert_path}")
    client_ca = None
    if tls.client_ca is not None:
        ca_path = resolve(tls.client_ca)
        client_ca = _read(ca_path, f"{where}.client-ca")
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError:
            raise ConfigError(f"{where}.client-ca: {ca_path} holds no PEM "
                              "certificate") from None
    return Identity(cert, key, client_ca)


class RotatingCredentials:
    """gRPC server credentials that follow the files of `tls` as they change."""

    def __init__(self, tls: TlsConfig, resolve: Callable[[str], Path], where: str = "tls"
                 ) -> None:
        self.tls = tls
        self._resolve = resolve
        self._where = where
        self._paths = [resolve(p) for p in (tls.cert, tls.key, tls.client_ca) if p]
        self._lock = threading.Lock()
        self._versions = self._stat()
        self._checked = time.monotonic()
        self.identity = load_identity(tls, resolve, where)

    def _stat(self) -> list[tuple[int, int, int] | None]:
        found: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                info = os.stat(path)
                found.append((info.st_ino, info.st_size, info.st_mtime_ns))
            except OSError:
                found.append(None)
        return found

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self.identity), self._fetch,
            require_client_authentication=self.identity.client_ca is not None)

    @staticmethod
    def _configuration(identity: Identity) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(identity.key, identity.cert)], root_certificates=identity.client_ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: a new configuration when the files changed
        (and still make a valid identity), else None (keep the current one)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < CHECK_EVERY:
                return None
            self._checked = now
            versions = self._stat()
            if versions == self._versions:
                return None
            self._versions = versions
            try:
                identity = load_identity(self.tls, self._resolve, self._where)
            except ConfigError as error:
                log.error("TLS files changed but cannot be used (%s); keeping the previous "
                          "certificate", error)
                return None
            if identity == self.identity:
                return None
            log.info("TLS certificate re-read (%s)", self._where)
            self.identity = identity
            return self._configuration(identity)
