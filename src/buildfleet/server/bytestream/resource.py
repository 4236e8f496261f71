"""ByteStream resource names for the CAS, parsed and validated once.

Forms (REAPI, ContentAddressableStorage service comment)::

    reads:  {instance}/blobs/{digest_function/}{hash}/{size}
            {instance}/compressed-blobs/{compressor}/{digest_function/}{hash}/{size}
    writes: {instance}/uploads/{uuid}/blobs/{digest_function/}{hash}/{size}{/metadata}
            {instance}/uploads/{uuid}/compressed-blobs/{compressor}/{digest_function/}...

The instance name may be empty (then the leading slash is omitted) or span several
segments; none of its segments may be one of the reserved keywords, so the first
keyword ends it.  The only digest function is SHA-256 (``sha256`` may be spelled
out, although REAPI says to omit it) and the only compressor is ``zstd``.  Upload
metadata after the size is accepted and ignored.  Anything else is
INVALID_ARGUMENT with a message that quotes the (truncated) name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from buildfleet.config import RESERVED_SEGMENTS
from buildfleet.digest import Digest
from buildfleet.errors import InvalidArgument

SUPPORTED_COMPRESSORS = ("zstd",)
# Lowercase DigestFunction.Value names; a segment spelled like one of these is a
# digest function, anything else in that position is taken as the hash.
_DIGEST_FUNCTIONS = frozenset({
    "sha256", "sha1", "md5", "vso", "sha384", "sha512", "murmur3", "sha256tree", "blake3",
})
_SIZE = re.compile(r"[0-9]{1,19}")
_MAX_SIZE = 2**63 - 1
_QUOTE_LIMIT = 200

READ_FORM = "{instance}/blobs/{hash}/{size} or {instance}/compressed-blobs/zstd/{hash}/{size}"
WRITE_FORM = "{instance}/uploads/{uuid}/blobs/{hash}/{size} or " \
             "{instance}/uploads/{uuid}/compressed-blobs/zstd/{hash}/{size}"


@dataclass(frozen=True, slots=True)
class ResourceName:
    """A parsed CAS resource name."""

    instance_name: str
    digest: Digest
    compressor: str | None = None  # "zstd" for compressed-blobs, None for plain blobs
    upload_id: str | None = None  # the client's uuid, for upload names only

    @property
    def compressed(self) -> bool:
        return self.compressor is not None


def quote(name: str) -> str:
    """The name for an error message, truncated."""
    if len(name) > _QUOTE_LIMIT:
        return repr(name[:_QUOTE_LIMIT]) + "..."
    return repr(name)


def _malformed(name: str, problem: str, form: str) -> InvalidArgument:
    return InvalidArgument(f"resource name {quote(name)}: {problem} (expected {form})")


def _check_segments(name: str, segments: list[str], form: str) -> None:
    for segment in segments:
        if segment in (".", ".."):
            raise _malformed(name, f"path segment {segment!r} is not allowed", form)


def _instance(name: str, segments: list[str], form: str) -> str:
    for segment in segments:
        if segment == "":
            raise _malformed(name, "the instance name has an empty path segment", form)
        if segment in RESERVED_SEGMENTS:
            raise _malformed(name, f"unexpected {segment!r} in the instance name", form)
    return "/".join(segments)


def _blob(name: str, segments: list[str], form: str,
          allow_metadata: bool) -> tuple[str | None, Digest]:
    """Parse what follows a blobs/compressed-blobs keyword: (compressor, digest).

    `segments` starts with the keyword itself.
    """
    keyword, rest = segments[0], segments[1:]
    compressor: str | None = None
    if keyword == "compressed-blobs":
        if not rest or rest[0] == "":
            raise _malformed(name, "the compressor is missing", form)
        compressor, rest = rest[0], rest[1:]
        if compressor not in SUPPORTED_COMPRESSORS:
            supported = ", ".join(SUPPORTED_COMPRESSORS)
            raise _malformed(name, f"compressor {compressor!r:.40} is not supported "
                             f"(supported: {supported})", form)
    if rest and rest[0] in _DIGEST_FUNCTIONS:
        if rest[0] != "sha256":
            raise _malformed(name, f"digest function {rest[0]!r} is not supported "
                             "(this server uses sha256 only)", form)
        rest = rest[1:]
    if len(rest) < 2:
        raise _malformed(name, "the hash or the size is missing", form)
    if len(rest) > 2 and not allow_metadata:
        raise _malformed(name, "unexpected segments after the size", form)
    hash_, size_text = rest[0], rest[1]
    if _SIZE.fullmatch(size_text) is None or int(size_text) > _MAX_SIZE:
        raise _malformed(name, f"size {size_text!r:.40} is not a non-negative integer", form)
    try:
        digest = Digest.parse(hash_, int(size_text))
    except InvalidArgument as error:
        raise _malformed(name, error.message, form) from None
    return compressor, digest


def _find_keyword(segments: list[str], keywords: tuple[str, ...]) -> int:
    for index, segment in enumerate(segments):
        if segment in keywords:
            return index
    return -1


def parse_read(name: str) -> ResourceName:
    """Parse a Read resource name; InvalidArgument when it is malformed."""
    if not name:
        raise _malformed(name, "the resource name is empty", READ_FORM)
    segments = name.split("/")
    _check_segments(name, segments, READ_FORM)
    index = _find_keyword(segments, ("blobs", "compressed-blobs"))
    if index < 0:
        raise _malformed(name, "no 'blobs' or 'compressed-blobs' segment", READ_FORM)
    instance = _instance(name, segments[:index], READ_FORM)
    compressor, digest = _blob(name, segments[index:], READ_FORM, allow_metadata=False)
    return ResourceName(instance, digest, compressor)


def parse_write(name: str) -> ResourceName:
    """Parse a Write / QueryWriteStatus resource name; InvalidArgument when malformed."""
    if not name:
        raise _malformed(name, "the resource name is empty", WRITE_FORM)
    segments = name.split("/")
    _check_segments(name, segments, WRITE_FORM)
    index = _find_keyword(segments, ("uploads",))
    if index < 0:
        raise _malformed(name, "no 'uploads' segment", WRITE_FORM)
    instance = _instance(name, segments[:index], WRITE_FORM)
    rest = segments[index + 1:]
    if not rest or rest[0] == "":
        raise _malformed(name, "the upload uuid is missing", WRITE_FORM)
    upload_id, rest = rest[0], rest[1:]
    if upload_id in RESERVED_SEGMENTS:
        raise _malformed(name, "the upload uuid is missing", WRITE_FORM)
    if not rest or rest[0] not in ("blobs", "compressed-blobs"):
        raise _malformed(name, "'blobs' or 'compressed-blobs' must follow the uuid",
                         WRITE_FORM)
    compressor, digest = _blob(name, rest, WRITE_FORM, allow_metadata=True)
    return ResourceName(instance, digest, compressor, upload_id)
