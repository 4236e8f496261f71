"""The credentials of a secure grid, made once in its data directory
(`buildfleet up --secure`): a private CA, a server certificate for the names the
grid is reached by, and three bearer tokens -- the bots' (role `bot`), a client's
(roles `execute` and `cache-write`) and an operator's (role `admin`, for the fleet's
CLI and web page) -- with the tokens file that names their hashes.  Keys and
tokens are readable by their owner only.  Made files are kept: a second start
reuses them (a server certificate that does not cover a name asked for now is
issued again)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from buildfleet.auth import pki
from buildfleet.auth.tokens import add_entries, new_token
from buildfleet.config import ConfigError

CLIENT_GRANTS = ["execute", "cache-write"]


@dataclass(frozen=True)
class SecureGrid:
    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def tokens_file(self) -> Path:
        return self.root / "tokens.yaml"

    @property
    def bot_token_file(self) -> Path:
        return self.root / "bot.token"

    @property
    def client_token_file(self) -> Path:
        return self.root / "client.token"

    @property
    def admin_token_file(self) -> Path:
        return self.root / "admin.token"

    def client_token(self) -> str:
        return self.client_token_file.read_text().strip()


def _load_ca(root: Path) -> pki.KeyPair | None:
    try:
        cert = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), None)
    except (OSError, ValueError):
        return None
    return pki.KeyPair(key, cert)  # type: ignore[arg-type]


def _covers(cert_path: Path, names: Sequence[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have = {str(name) for name in sans.get_values_for_type(x509.DNSName)}
    have |= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return all(name.strip("[]") in have for name in names)


def prepare(root: Path, hosts: Sequence[str]) -> SecureGrid:
    """Make (or reuse) the credentials of a grid reached as any of `hosts`."""
    grid = SecureGrid(root)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    ca = _load_ca(root)
    if ca is None:
        ca = pki.new_ca("buildfleet grid CA")
        ca.write(grid.ca, root / "ca.key")
    names = list(dict.fromkeys(["localhost", "127.0.0.1", socket.gethostname(),
                                *[h for h in hosts if h not in ("0.0.0.0", "[::]")]]))
    if not _covers(grid.server_cert, names):
        pki.issue(ca, "buildfleet server", server_names=names).write(grid.server_cert,
                                                                     grid.server_key)
    entries = []
    for path, principal, grants in ((grid.bot_token_file, "local-bots", ["bot"]),
                                    (grid.client_token_file, "local-client", CLIENT_GRANTS),
                                    (grid.admin_token_file, "local-admin", ["admin"])):
        if not path.exists():
            pki.write_private(path, (new_token() + "\n").encode())
        token = path.read_text().strip()
        entries.append({"sha256": hashlib.sha256(token.encode()).hexdigest(),
                        "principal": principal, "grants": grants})
    # Tokens added by hand (`buildfleet auth token --tokens-file`) are kept.
    try:
        add_entries(grid.tokens_file, entries, replacing=frozenset({
            "local-bots", "local-client", "local-admin"}))
    except ValueError as error:
        raise ConfigError(f"{error}: fix or remove the file") from None
    return grid
