"""A secure grid for tests: a private CA with real certificates (made with the
`cryptography` package through buildfleet.auth.pki), a tokens file, JWT keys, and
channels that present any of them."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from buildfleet.auth.pki import KeyPair, issue, new_ca

SERVER_NAMES = ["localhost", "127.0.0.1"]


@dataclass
class Keys:
    """The files of a secure grid, under `root`."""

    root: Path
    ca: KeyPair = field(default_factory=new_ca)
    tokens: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)  # token -> entry

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.server = issue(self.ca, "buildfleet server", server_names=SERVER_NAMES)
        self.server.write(self.root / "server.pem", self.root / "server.key")
        (self.root / "ca.pem").write_bytes(self.ca.cert_pem)
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        jwk.update({"kid": "key-1", "use": "sig", "alg": "RS256"})
        (self.root / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        self.secret = b"s" * 40
        (self.root / "jwt.secret").write_bytes(self.secret)
        self.write_tokens()

    # -- files the configuration names
    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    def tls(self, *, client_ca: bool = False) -> dict[str, Any]:
        settings = {"cert": str(self.root / "server.pem"), "key": str(self.root / "server.key")}
        if client_ca:
            settings["client-ca"] = str(self.root / "ca.pem")
        return settings

    def token(self, principal: str, *grants: Any) -> str:
        """A new bearer token of `principal` with `grants`, written to the tokens file."""
        token = f"token-{principal}-{len(self.tokens)}-{time.monotonic_ns()}"
        self.tokens[token] = (principal, list(grants))
        self.write_tokens()
        return token

    def revoke(self, token: str) -> None:
        del self.tokens[token]
        self.write_tokens()

    def write_tokens(self) -> None:
        entries = [{"sha256": hashlib.sha256(token.encode()).hexdigest(),
                    "principal": principal, "grants": grants}
                   for token, (principal, grants) in self.tokens.items()]
        path = self.root / "tokens.yaml"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(yaml.safe_dump({"tokens": entries}))
        temporary.replace(path)

    def jwt(self, principal: str, *grants: str, lifetime: float = 300, audience: str = "grid",
            issuer: str = "https://issuer.example", key: Any = None, kid: str = "key-1",
            algorithm: str = "RS256") -> str:
        now = time.time()
        claims = {"sub": principal, "roles": list(grants), "aud": audience, "iss": issuer,
                  "iat": int(now), "exp": int(now + lifetime)}
        signing = key if key is not None else (self.rsa if algorithm == "RS256" else self.secret)
        return jwt.encode(claims, signing, algorithm=algorithm,
                          headers={"kid": kid} if algorithm == "RS256" else None)

    def client(self, name: str, ca: KeyPair | None = None) -> KeyPair:
        return issue(ca or self.ca, name)

    def auth(self, *, jwt_source: str = "jwks", certificates: dict[str, list[Any]] | None = None
             ) -> dict[str, Any]:
        settings: dict[str, Any] = {"tokens-file": str(self.root / "tokens.yaml")}
        key = ({"jwks-file": str(self.root / "jwks.json")} if jwt_source == "jwks"
               else {"secret-file": str(self.root / "jwt.secret")})
        settings["jwt"] = {**key, "issuer": "https://issuer.example", "audience": "grid"}
        if certificates is not None:
            settings["certificates"] = {"grants": certificates}
        return settings


def channel(address: str, keys: Keys, *, token: str | None = None,
            client: KeyPair | None = None, ca_pem: bytes | None = None) -> grpc.aio.Channel:
    """A TLS channel to `address` that trusts the grid's CA (or `ca_pem`), presenting a
    bearer token and/or a client certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_pem or keys.ca_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None)
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    return grpc.aio.secure_channel(address, credentials,
                                   options=[("grpc.ssl_target_name_override", "localhost")])


def metadata(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def channel_with(address: str, ca_pem: bytes, token: str | None) -> grpc.aio.Channel:
    """A TLS channel trusting `ca_pem`, with a bearer token when given."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token))
    return grpc.aio.secure_channel(address, credentials)
