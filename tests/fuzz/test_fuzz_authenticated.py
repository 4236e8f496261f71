"""Property tests on a secure grid: random requests with random credentials.

A `buildfleet serve` process with TLS, a tokens file and JWTs (verified against a
JWKS file) is seeded by an administrator; then hypothesis sends well-typed random
requests (and raw random bodies) for every method, each with random metadata:
no credentials, valid tokens of every role (some only for some instances or bot
ids), valid JWTs with random claims, JWTs that are expired, for another audience,
unsigned (`alg: none`) or HMAC-signed with the server's public key (algorithm
confusion), random `authorization` values, duplicated headers and binary headers.

Whatever is sent, the answer must be a defined status with a clean message (never
INTERNAL, UNKNOWN or DATA_LOSS, never a traceback), the server must stay up, its log
must hold no traceback, and the administrator's data must read back intact: no
credential may change what another principal stored.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import yaml
from authkit import Keys
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st
from procutil import ServeProcess

from .conftest import BATCH, CACHE_WRITABLE, FUZZ_REQUESTS, INSTANCES, SERVER_CONFIG, fuzzing
from .fuzz_engine import (
    BUG_IN_LOG,
    METHODS,
    Call,
    Harness,
    Pool,
    Protected,
    RequestStrategies,
    _weighted,
    check_protected,
    seed_server,
)

SHARE = 0.2  # of FUZZ_REQUESTS (2,000 by default): four fifths typed, one fifth raw
ISSUER, AUDIENCE = "https://issuer.example", "grid"

pytestmark = pytest.mark.fuzz

# Token holders: every role, some narrowed to instances or bot ids, one that can
# reach no instance of this server.
GRANTS: dict[str, list[Any]] = {
    "admin": ["admin"],
    "developer": ["execute"],
    "reader": ["read"],
    "ci-cache": ["cache-write:mem/inst", "read"],
    "bot-any": ["bot"],
    "bot-mem": [{"role": "bot", "instances": "mem/*", "bot-ids": "fuzz-bot-*"}],
    "elsewhere": ["execute:ci/*", "bot:ci/*"],
}


@dataclass
class SecureTarget:
    server: ServeProcess
    harness: Harness  # TLS only: every call carries its own metadata
    seeder: Harness  # TLS and the administrator's token
    pool: Pool
    protected: Protected
    keys: Keys
    tokens: dict[str, str]  # principal -> token


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand: unsigned, or HMAC-signed with whatever key an attacker has."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(),
                                                 hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@pytest.fixture(scope="module")
def secure_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureTarget]:
    workdir: Path = tmp_path_factory.mktemp("fuzz-secure")
    keys = Keys(workdir / "keys")
    # Tokens are written before the server starts (it re-reads the file at most once
    # a second, and this test does not want to wait for that).
    tokens = {principal: keys.token(principal, *grants) for principal, grants in GRANTS.items()}
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({**SERVER_CONFIG, "tls": keys.tls(), "auth": keys.auth()}))
    tls = grpc.ssl_channel_credentials(root_certificates=keys.ca_pem)
    admin = grpc.composite_channel_credentials(
        tls, grpc.access_token_call_credentials(tokens["admin"]))
    with ServeProcess.start(workdir, data_dir=workdir / "data", config=config) as server:
        seeder = Harness(server.address, alive=server.running, credentials=admin)
        harness = Harness(server.address, alive=server.running, credentials=tls)
        try:
            pool, protected = seeder.run(seed_server(seeder.channel, INSTANCES,
                                                     cache_writable=CACHE_WRITABLE))
            harness.pool = pool
            yield SecureTarget(server, harness, seeder, pool, protected, keys, tokens)
        finally:
            harness.close()
            seeder.close()


GRANT_TEXT = st.one_of(
    st.sampled_from(["read", "execute", "cache-write", "bot", "admin", "root", ""]),
    st.builds(lambda role, glob: f"{role}:{glob}",
              st.sampled_from(["read", "execute", "bot", "admin", "superuser"]),
              st.sampled_from(["*", "mem/*", "cache-only", "ci/*", "[", "**", ""])))
ANYTHING = st.one_of(st.none(), st.integers(), st.text(max_size=20),
                     st.lists(st.text(max_size=8), max_size=3),
                     st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _good_claims() -> st.SearchStrategy[dict[str, Any]]:
    """What the issuer signs: a principal, its grants, and a current validity."""
    now = int(time.time())
    return st.fixed_dictionaries({
        "sub": st.sampled_from(["developer", "jwt-user", "admin"]),
        "roles": st.lists(GRANT_TEXT, max_size=3),
        "aud": st.just(AUDIENCE), "iss": st.just(ISSUER),
        "exp": st.just(now + 3600), "iat": st.just(now)})


def _odd_claims() -> st.SearchStrategy[dict[str, Any]]:
    """Claims of any shape: missing, mistyped, expired, not yet valid, another audience."""
    now = int(time.time())
    roles = st.one_of(st.lists(GRANT_TEXT, max_size=4), ANYTHING,
                      st.lists(st.fixed_dictionaries({"role": GRANT_TEXT}), max_size=2))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "sub": st.one_of(st.sampled_from(["admin", "developer", "mallory", ""]), ANYTHING),
        "roles": roles,
        "aud": st.one_of(st.just(AUDIENCE), st.sampled_from(["other", ""]), ANYTHING),
        "iss": st.one_of(st.just(ISSUER), st.sampled_from(["https://evil.example"]), ANYTHING),
        "exp": st.one_of(st.integers(now - 10**6, now + 10**6), st.just(now + 300), ANYTHING),
        "nbf": st.one_of(st.integers(now - 100, now + 10**5), ANYTHING),
        "iat": st.integers(0, 2**40),
    }
    return st.fixed_dictionaries({}, optional=optional)


def _jwts(keys: Keys) -> st.SearchStrategy[str]:
    public_pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = _odd_claims()
    kid = st.sampled_from(["key-1", "key-2", "", "../../etc/passwd"])

    def signed(claims: dict[str, Any], kid: str = "key-1") -> str:
        # Signed as the JWS it is: claims of any type, not only those PyJWT would emit.
        return jwt.api_jws.encode(json.dumps(claims).encode(), keys.rsa, algorithm="RS256",
                                  headers={"kid": kid})

    return st.one_of(
        st.builds(signed, _good_claims()),  # valid: the grants decide
        st.builds(signed, _good_claims()),
        st.builds(signed, claims, kid),  # signed by the issuer, odd claims
        st.builds(lambda c: _forged({"alg": "none", "typ": "JWT"}, c, None), _good_claims()),
        st.builds(lambda c: _forged({"alg": "HS256", "kid": "key-1"}, c, public_pem),
                  _good_claims()),
        st.builds(lambda c: _forged({"alg": "HS256"}, c, keys.secret), claims),
        st.builds(lambda t: t.rsplit(".", 1)[0] + "." + _b64(b"x" * 256),
                  st.builds(signed, _good_claims())),  # signature replaced
    )


def _metadata(target: SecureTarget) -> st.SearchStrategy[tuple[tuple[str, str | bytes], ...]]:
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
    valid = st.sampled_from(sorted(target.tokens.values()))
    bearer = _weighted((6, valid), (3, _jwts(target.keys)), (1, printable),
                       (1, valid.map(lambda token: token[:-1])))  # one character short
    authorization = _weighted(
        (8, bearer.map(lambda token: f"Bearer {token}")),
        (1, st.builds(lambda scheme, token: f"{scheme} {token}",
                      st.sampled_from(["bearer", "Basic", "Bearer  ", "Token", ""]), bearer)),
        (1, printable))
    header = st.tuples(st.just("authorization"), authorization)
    other = st.one_of(
        st.tuples(st.sampled_from(["x-forwarded-for", "x-buildfleet-principal", "user",
                                   "x-remote-user"]), printable),
        st.tuples(st.sampled_from(["authorization-bin", "x-junk-bin",
                                   "build.bazel.remote.execution.v2.requestmetadata-bin"]),
                  st.binary(max_size=64)))
    return _weighted(
        (1, st.just(())),
        (6, st.tuples(header)),
        (1, st.tuples(header, header)),  # two authorization headers
        (1, st.tuples(other, header)),
        (1, st.lists(st.one_of(header, other), max_size=4).map(tuple)),
    )


def _with_metadata(calls: st.SearchStrategy[Call], target: SecureTarget
                   ) -> st.SearchStrategy[Call]:
    return st.builds(lambda call, metadata: dataclasses.replace(call, metadata=metadata),
                     calls, _metadata(target))


def _send(target: SecureTarget, calls: list[Call]) -> None:
    problems = target.harness.send_all(calls)
    assert not problems, "\n".join(problems)
    assert target.server.running(), target.server.output()[-3000:]


def test_random_credentials_on_well_typed_requests(secure_target: SecureTarget) -> None:
    requests = RequestStrategies(secure_target.pool)
    typed = _with_metadata(st.one_of([requests.typed(method) for method in METHODS]),
                           secure_target)

    @fuzzing(SHARE * 0.8)
    @given(st.lists(typed, min_size=BATCH, max_size=BATCH))
    def property_(calls: list[Call]) -> None:
        _send(secure_target, calls)

    property_()


def test_random_credentials_on_raw_bodies(secure_target: SecureTarget) -> None:
    requests = RequestStrategies(secure_target.pool)
    junk = _with_metadata(st.one_of([requests.junk(method) for method in METHODS]),
                          secure_target)

    @fuzzing(SHARE * 0.2)
    @given(st.lists(junk, min_size=BATCH, max_size=BATCH))
    def property_(calls: list[Call]) -> None:
        _send(secure_target, calls)

    property_()


def test_secure_server_is_up_and_the_administrators_data_intact(
        secure_target: SecureTarget) -> None:
    harness, seeder = secure_target.harness, secure_target.seeder
    assert secure_target.server.running()
    differences = seeder.run(check_protected(seeder.channel, INSTANCES,
                                             secure_target.protected))
    assert not differences, differences
    assert harness.sent >= int(FUZZ_REQUESTS * SHARE) - BATCH, (harness.sent, harness.counts)
    # The credentials were good enough to get through, and bad enough to be refused.
    for code in ("OK", "UNAUTHENTICATED", "PERMISSION_DENIED"):
        assert harness.counts[code] > 0, (code, harness.counts)
    log = secure_target.server.output().splitlines()
    bugs = [index for index, line in enumerate(log) if BUG_IN_LOG.search(line)]
    assert not bugs, "the server logged:\n" + "\n".join(
        "\n".join(log[max(0, index - 2):index + 25]) for index in bugs[:3])
    print(f"secure fuzz: {harness.sent} requests; by status "
          f"{dict(harness.counts.most_common())}")
