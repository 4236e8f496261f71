"""Remote Asset qualifiers and configuration, as plain functions: what a checksum
accepts, which headers go to which URI, and what an asset is remembered under."""

from __future__ import annotations

import base64
import hashlib

import pytest

from buildfleet.config import ConfigError, parse_config
from buildfleet.errors import InvalidArgument
from buildfleet.server.asset.qualifiers import CREDENTIALS, Integrity, parse_qualifiers


def sri(data: bytes, algorithm: str) -> str:
    return f"{algorithm}-{base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


def test_the_strongest_algorithm_of_a_checksum_decides() -> None:
    text = f"{sri(b'wrong', 'sha256')} {sri(b'right', 'sha512')} {sri(b'other', 'sha512')}"
    integrity = Integrity.parse(text + " md5-ignored")
    assert integrity.algorithm == "sha512"
    assert integrity.matches(hashlib.sha512(b"right").digest())
    assert integrity.matches(hashlib.sha512(b"other").digest())
    assert not integrity.matches(hashlib.sha256(b"wrong").digest())
    # options after "?" are not part of the hash
    assert Integrity.parse(sri(b"x", "sha256") + "?opt").matches(hashlib.sha256(b"x").digest())
    with pytest.raises(InvalidArgument, match="not a sha256 hash"):
        Integrity.parse("sha256-" + base64.b64encode(b"short").decode())


def test_headers_reach_their_uris_and_never_the_name() -> None:
    uris = ["https://a.example/x", "https://b.example/x"]
    parsed = parse_qualifiers([
        ("http_header:Accept", "*/*"),
        ("http_header_url:1:Authorization", "Bearer b"),
        ("bazel.auth_headers", '{"https://a.example/x": {"Authorization": ["Basic a"]}}'),
        ("bazel.canonical_id", "x-1"),
    ], len(uris))
    assert parsed.name == (("bazel.canonical_id", "x-1"),)
    assert parsed.headers_for(0, uris[0]) == {"Accept": "*/*", "Authorization": "Basic a"}
    assert parsed.headers_for(1, uris[1]) == {"Accept": "*/*", "Authorization": "Bearer b"}
    assert parsed.pushed_only == []


def test_content_fetched_with_credentials_is_named_by_them_unless_a_checksum_pins_it(
        ) -> None:
    def name(*qualifiers: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return parse_qualifiers(qualifiers, 1).download_name(0, "https://a.example/x")

    alice = name(("http_header:Authorization", "Bearer alice"))
    bob = name(("http_header:Authorization", "Bearer bob"))
    assert alice != bob and {n for n, _ in alice} == {CREDENTIALS}
    assert "Bearer alice" not in repr(alice)
    pinned = ("checksum.sri", sri(b"x", "sha256"))
    assert name(pinned, ("http_header:Authorization", "Bearer alice")) == (pinned,)
    assert name() == ()


def test_qualifiers_only_a_push_can_vouch_for_are_named() -> None:
    parsed = parse_qualifiers([("vcs.commit", "abc"), ("resource_type", "x")], 1)
    assert parsed.pushed_only == ["resource_type", "vcs.commit"]
    assert parse_qualifiers([("team.label", "a")], 1, extra=["team.label"]).pushed_only == [
        "team.label"]


def test_the_assets_configuration_is_checked() -> None:
    with pytest.raises(ConfigError, match="not an http:// or https:// URI prefix"):
        parse_config({"assets": {"allow-uris": ["ftp://mirror.example/"]}})
    with pytest.raises(ConfigError, match="assets: remote storage holds CAS blobs only"):
        parse_config({"instances": {"": {"assets": {"type": "remote",
                                                    "address": "127.0.0.1:1"}}}})
    config = parse_config({"instances": {"": {"assets": {"type": "memory"}}},
                           "assets": {"download": False}})
    assert config.assets.download is False
