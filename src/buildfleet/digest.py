"""Content digests: SHA-256 hash plus size, validated once at the edge."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from buildfleet.errors import InvalidArgument

HASH_LENGTH = 64
_HEX = re.compile(r"[0-9a-f]{64}")
_HEX_LINES = re.compile(r"(?:[0-9a-f]{64}\n)*")  # many hashes checked in one match
EMPTY_HASH = hashlib.sha256(b"").hexdigest()


class _DigestMessage(Protocol):
    hash: str
    size_bytes: int


class Digest(NamedTuple):
    """A validated (hash, size) pair; hashable and cheap, used as a storage key."""

    hash: str
    size_bytes: int

    def __str__(self) -> str:
        return f"{self.hash}/{self.size_bytes}"

    @classmethod
    def parse(cls, hash_: str, size_bytes: int, what: str = "digest") -> Digest:
        """Validate a hash and size that came from a client."""
        if not isinstance(hash_, str) or _HEX.fullmatch(hash_) is None:
            raise InvalidArgument(
                f"{what}: hash {hash_!r:.80} is not {HASH_LENGTH} lowercase hex digits "
                "(only SHA-256 is supported)"
            )
        if size_bytes < 0:
            raise InvalidArgument(f"{what}: size_bytes {size_bytes} is negative")
        return cls(hash_, size_bytes)

    @classmethod
    def from_proto(cls, message: _DigestMessage, what: str = "digest") -> Digest:
        return cls.parse(message.hash, message.size_bytes, what)

    @classmethod
    def from_protos(cls, messages: Sequence[_DigestMessage], what: str = "digests"
                    ) -> list[Digest]:
        """Many digests at once (FindMissingBlobs asks for thousands): validated in one
        pass, with the same errors as `from_proto` naming `what[i]`."""
        pairs = [(message.hash, message.size_bytes) for message in messages]
        if (_HEX_LINES.fullmatch("".join([pair[0] + "\n" for pair in pairs])) is not None
                and (not pairs or min(pair[1] for pair in pairs) >= 0)):
            new = tuple.__new__
            return [new(cls, pair) for pair in pairs]
        return [cls.parse(hash_, size, f"{what}[{i}]") for i, (hash_, size) in enumerate(pairs)]

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """The digest of some bytes."""
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    def is_empty(self) -> bool:
        return self.size_bytes == 0 and self.hash == EMPTY_HASH


EMPTY_DIGEST = Digest(EMPTY_HASH, 0)


def verify(digest: Digest, data: bytes, what: str = "blob") -> None:
    """Raise InvalidArgument unless `data` hashes to `digest`."""
    if len(data) != digest.size_bytes:
        raise InvalidArgument(
            f"{what} {digest}: got {len(data)} bytes, the digest says {digest.size_bytes}"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest.hash:
        raise InvalidArgument(f"{what} {digest}: content hashes to {actual}")


# DigestFunction.Value numbers from remote_execution.proto: UNKNOWN = 0, SHA256 = 1.
_ACCEPTED_DIGEST_FUNCTIONS = (0, 1)


def check_digest_function(value: int) -> None:
    """Refuse a request that asks for a digest function other than SHA-256."""
    if value not in _ACCEPTED_DIGEST_FUNCTIONS:
        raise InvalidArgument(
            f"digest_function {value} is not supported: this server uses SHA256 only"
        )
