"""Bearer tokens that are JSON Web Tokens (PyJWT with `cryptography`).

Verified against the keys of a JWKS file (the key is chosen by the token's `kid`)
or a shared secret file; the issuer and audience when configured, and the
expiry always (a token without `exp` is refused).  The principal is the
configured claim (`sub` by default); its grants are the strings of the roles
claim (`roles`), written as grants are in the configuration.  The key files are
re-read when they change.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
from pydantic import TypeAdapter, ValidationError

from buildfleet.auth.files import Watched
from buildfleet.auth.principal import Principal, Unauthenticated
from buildfleet.config.security import Grant, JwtConfig

_GRANTS = TypeAdapter(list[Grant])


def _jwks(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
        keys = jwt.PyJWKSet.from_dict(document)
    except (ValueError, jwt.PyJWTError) as error:
        raise ValueError(f"not a JWKS document: {error}") from None
    return {key.key_id or "": key for key in keys.keys}


def _secret(data: bytes) -> bytes:
    secret = data.strip()
    if len(secret) < 32:
        raise ValueError("the secret is shorter than 32 bytes")
    return secret


class JwtVerifier:
    def __init__(self, config: JwtConfig, resolve: Any) -> None:
        self.config = config
        self._algorithms = config.allowed_algorithms()
        self._jwks = Watched(resolve(config.jwks_file), _jwks) if config.jwks_file else None
        self._secret = (Watched(resolve(config.secret_file), _secret)
                        if config.secret_file else None)

    def principal(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token, self._key(header), algorithms=self._algorithms,
                audience=self.config.audience, issuer=self.config.issuer,
                leeway=self.config.leeway,
                options={"require": ["exp"], "verify_aud": self.config.audience is not None})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token is from another issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify") from None
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"the token is not valid: {error}") from None
        name = claims.get(self.config.principal_claim)
        if not isinstance(name, str) or not name:
            raise Unauthenticated(f"the token has no {self.config.principal_claim!r} claim")
        try:
            grants = _GRANTS.validate_python(claims.get(self.config.roles_claim) or [])
        except ValidationError:
            raise Unauthenticated(f"the token's {self.config.roles_claim!r} claim is not a "
                                  "list of grants") from None
        return Principal(name, tuple(grants), "jwt")

    def _key(self, header: dict[str, Any]) -> Any:
        if self._secret is not None:
            return self._secret.get()
        assert self._jwks is not None
        keys = self._jwks.get()
        kid = header.get("kid")
        key = keys.get(kid or "") if kid or len(keys) != 1 else next(iter(keys.values()))
        if key is None:
            raise jwt.InvalidKeyError(f"no key {kid!r} in the JWKS file")
        return key.key
