"""The qualifiers of Remote Asset requests: which are supported and what they mean.

* ``checksum.sri``: the content's Subresource Integrity (``sha256-<base64>``; several
  space-separated hashes allowed, the strongest algorithm counts).  A download is
  checked against it.
* ``bazel.canonical_id``: Bazel's identity of a download; part of the name only.
* Request headers for the download (credentials, typically): ``http_header:NAME``
  (for every URI), ``http_header_url:INDEX:NAME`` (for the URI at INDEX), and Bazel's
  older ``bazel.auth_headers`` (JSON: URI -> {NAME: VALUE}).  They are not part of an
  asset's name and never echoed back; but content downloaded with credentials and no
  checksum is remembered under a hash of them, so that it is served again only to a
  client presenting the same credentials.
* ``resource_type``, ``vcs.branch``, ``vcs.commit``, ``directory`` (and the names the
  configuration adds): part of the name; a download cannot vouch for them, so they
  match pushed assets only.

Any other name is INVALID_ARGUMENT with a google.rpc.BadRequest detail naming it, as
the API asks; so are duplicate names and malformed values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from google.rpc import error_details_pb2

from buildfleet.errors import InvalidArgument

CHECKSUM_SRI = "checksum.sri"
CANONICAL_ID = "bazel.canonical_id"
AUTH_HEADERS = "bazel.auth_headers"
HTTP_HEADER = "http_header:"  # a prefix: http_header:NAME
HTTP_HEADER_URL = "http_header_url:"  # a prefix: http_header_url:INDEX:NAME
PUSHED_ONLY = frozenset({"resource_type", "vcs.branch", "vcs.commit", "directory"})
# Content that came with credentials and no checksum is remembered under this one.
CREDENTIALS = "buildfleet.credentials"

# Subresource Integrity algorithms, weakest first.
SRI_ALGORITHMS = ("sha256", "sha384", "sha512")


@dataclass(frozen=True)
class Integrity:
    """A parsed ``checksum.sri``: the accepted hashes of the strongest algorithm."""

    algorithm: str
    digests: frozenset[bytes]
    text: str

    @classmethod
    def parse(cls, text: str) -> Integrity:
        found: dict[str, set[bytes]] = {}
        for token in text.split():
            algorithm, _, value = token.partition("-")
            if algorithm not in SRI_ALGORITHMS:
                continue  # unknown algorithms are ignored, as SRI says
            value = value.split("?", 1)[0]
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument(f"qualifier {CHECKSUM_SRI}: {token!r} is not "
                                      "ALGORITHM-BASE64") from None
            if len(raw) != hashlib.new(algorithm).digest_size:
                raise InvalidArgument(f"qualifier {CHECKSUM_SRI}: {token!r} has "
                                      f"{len(raw)} bytes, not a {algorithm} hash")
            found.setdefault(algorithm, set()).add(raw)
        if not found:
            raise InvalidArgument(f"qualifier {CHECKSUM_SRI}: {text!r} names no hash in "
                                  f"{', '.join(SRI_ALGORITHMS)}")
        strongest = max(found, key=SRI_ALGORITHMS.index)
        return cls(strongest, frozenset(found[strongest]), text)

    def matches(self, raw_digest: bytes) -> bool:
        return raw_digest in self.digests

    @staticmethod
    def describe(algorithm: str, raw_digest: bytes) -> str:
        return f"{algorithm}-{base64.b64encode(raw_digest).decode()}"


@dataclass(frozen=True)
class RequestQualifiers:
    """The qualifiers of one request, sorted out."""

    name: tuple[tuple[str, str], ...]  # part of the asset's name, sorted
    integrity: Integrity | None = None
    headers_all: dict[str, str] = field(default_factory=dict)
    headers_by_index: dict[int, dict[str, str]] = field(default_factory=dict)
    headers_by_uri: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def pushed_only(self) -> list[str]:
        """The names that only pushed assets can satisfy."""
        return [n for n, _ in self.name if n != CHECKSUM_SRI and n != CANONICAL_ID]

    @property
    def has_credentials(self) -> bool:
        return bool(self.headers_all or self.headers_by_index or self.headers_by_uri)

    def headers_for(self, index: int, uri: str) -> dict[str, str]:
        """The request headers for the download of the URI at `index`."""
        headers = dict(self.headers_all)
        headers.update(self.headers_by_uri.get(uri, {}))
        headers.update(self.headers_by_index.get(index, {}))
        return headers

    def download_name(self, index: int, uri: str) -> tuple[tuple[str, str], ...]:
        """The name a download of `uri` is remembered under: with a hash of its
        credentials when the content is not pinned by a checksum."""
        headers = self.headers_for(index, uri)
        if not headers or self.integrity is not None:
            return self.name
        canonical = json.dumps(sorted((k.lower(), v) for k, v in headers.items()))
        return tuple(sorted((*self.name, (CREDENTIALS,
                                          hashlib.sha256(canonical.encode()).hexdigest()))))


def _bad_request(names: Sequence[str]) -> InvalidArgument:
    detail = error_details_pb2.BadRequest()
    for name in names:
        detail.field_violations.add(field="qualifiers.name", description=f'"{name}" not supported')
    return InvalidArgument(
        f"unsupported qualifier{'s' if len(names) > 1 else ''}: "
        f"{', '.join(repr(n) for n in names)} (supported: {CHECKSUM_SRI}, {CANONICAL_ID}, "
        f"{HTTP_HEADER}NAME, {HTTP_HEADER_URL}INDEX:NAME, {AUTH_HEADERS}, "
        f"{', '.join(sorted(PUSHED_ONLY))})", details=[detail])


def parse_qualifiers(qualifiers: Iterable[tuple[str, str]], uri_count: int, *,
                     extra: Iterable[str] = ()) -> RequestQualifiers:
    """Sort a request's qualifiers out; InvalidArgument for an unsupported, duplicate or
    malformed one.  `extra` names further qualifiers accepted as part of the name."""
    accepted = PUSHED_ONLY | frozenset(extra)
    seen: set[str] = set()
    unsupported: list[str] = []
    name: list[tuple[str, str]] = []
    integrity: Integrity | None = None
    headers_all: dict[str, str] = {}
    headers_by_index: dict[int, dict[str, str]] = {}
    headers_by_uri: dict[str, dict[str, str]] = {}
    for qualifier, value in qualifiers:
        if qualifier in seen:
            raise InvalidArgument(f"qualifier {qualifier!r} is given more than once "
                                  "(qualifier names must be unique)")
        seen.add(qualifier)
        if qualifier == CHECKSUM_SRI:
            integrity = Integrity.parse(value)
            name.append((qualifier, value))
        elif qualifier == CANONICAL_ID or qualifier in accepted:
            name.append((qualifier, value))
        elif qualifier.startswith(HTTP_HEADER) and len(qualifier) > len(HTTP_HEADER):
            headers_all[qualifier[len(HTTP_HEADER):]] = value
        elif qualifier.startswith(HTTP_HEADER_URL):
            index_text, _, header = qualifier[len(HTTP_HEADER_URL):].partition(":")
            if not index_text.isdigit() or not header or int(index_text) >= uri_count:
                raise InvalidArgument(f"qualifier {qualifier!r}: expected "
                                      f"{HTTP_HEADER_URL}INDEX:NAME with INDEX below "
                                      f"{uri_count} (the number of URIs)")
            headers_by_index.setdefault(int(index_text), {})[header] = value
        elif qualifier == AUTH_HEADERS:
            headers_by_uri = _auth_headers(value)
        else:
            unsupported.append(qualifier)
    if unsupported:
        raise _bad_request(unsupported)
    return RequestQualifiers(tuple(sorted(name)), integrity, headers_all, headers_by_index,
                             headers_by_uri)


def _auth_headers(value: str) -> dict[str, dict[str, str]]:
    """Bazel's JSON of URI -> {header: value} (from Bazel 7: {header: [values]})."""
    error = InvalidArgument(f"qualifier {AUTH_HEADERS} is not a JSON object of URI -> "
                            "{header: value}")
    try:
        parsed = json.loads(value)
    except ValueError:
        raise error from None
    if not isinstance(parsed, dict):
        raise error
    found: dict[str, dict[str, str]] = {}
    for uri, headers in parsed.items():
        if not isinstance(headers, dict):
            raise error
        found[str(uri)] = {str(header): _header_value(values, error)
                           for header, values in headers.items()}
    return found


def _header_value(values: object, error: InvalidArgument) -> str:
    if isinstance(values, str):
        return values
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return ", ".join(values)
    raise error
