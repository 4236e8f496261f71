"""Remembered assets of the Remote Asset API: a name -> content in the CAS.

An asset's name is its kind (a blob or a directory), one URI and the qualifiers
that are part of its identity; what it names is a digest in the CAS (a blob, or
the root Directory of a tree), with the other blobs and trees it needs.  Assets
come from Push (the client vouches for the name) or from a download (FetchBlob).

Entries are kept serialized in any `BlobStore`, keyed by the digest of their
name.  A lookup answers only while the entry has not expired (`expire_at`), is
not older than the client accepts (`oldest_content_accepted`), and everything it
references is still in the CAS -- the way the action cache serves only complete
results.  Expired and unreadable entries are dropped when found.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from buildfleet.digest import Digest
from buildfleet.errors import InvalidArgument
from buildfleet.storage.action_cache import missing_blobs_error
from buildfleet.storage.base import BlobStore
from buildfleet.storage.cas import Cas

log = logging.getLogger(__name__)

Qualifiers = tuple[tuple[str, str], ...]  # (name, value), sorted by name


class AssetKind(enum.StrEnum):
    BLOB = "blob"
    DIRECTORY = "directory"


def asset_key(kind: AssetKind, uri: str, qualifiers: Iterable[tuple[str, str]]) -> Digest:
    """The store key of the asset that `kind`, `uri` and `qualifiers` name."""
    name = json.dumps([kind.value, uri, sorted(qualifiers)], separators=(",", ":"))
    return Digest.of(name.encode())


@dataclass(frozen=True)
class Asset:
    """What one name stands for."""

    kind: AssetKind
    uri: str
    qualifiers: Qualifiers
    digest: Digest  # the blob, or the root Directory
    created: float  # when pushed, or when its download began (seconds since the epoch)
    expire_at: float | None = None  # None: until its content leaves the CAS
    references_blobs: tuple[Digest, ...] = ()
    references_directories: tuple[Digest, ...] = ()

    @property
    def key(self) -> Digest:
        return asset_key(self.kind, self.uri, self.qualifiers)

    def encode(self) -> bytes:
        return json.dumps({
            "kind": self.kind.value, "uri": self.uri, "qualifiers": list(self.qualifiers),
            "digest": list(self.digest), "created": self.created, "expire_at": self.expire_at,
            "references_blobs": [list(d) for d in self.references_blobs],
            "references_directories": [list(d) for d in self.references_directories],
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Asset:
        """ValueError (or KeyError, TypeError) when `data` is not an encoded asset."""
        entry = json.loads(data)
        return cls(kind=AssetKind(entry["kind"]), uri=str(entry["uri"]),
                   qualifiers=tuple((str(n), str(v)) for n, v in entry["qualifiers"]),
                   digest=Digest.parse(*entry["digest"]), created=float(entry["created"]),
                   expire_at=None if entry["expire_at"] is None else float(entry["expire_at"]),
                   references_blobs=tuple(Digest.parse(*d) for d in entry["references_blobs"]),
                   references_directories=tuple(
                       Digest.parse(*d) for d in entry["references_directories"]))


class AssetStore:
    """Remembers assets and answers for them while their content is complete."""

    def __init__(self, store: BlobStore, cas: Cas) -> None:
        self.store = store
        self.cas = cas

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    async def referenced_blobs(self, asset: Asset) -> list[Digest]:
        """Every CAS blob `asset` needs: itself, the trees it names (every Directory
        and file in them) and the blobs it references."""
        blobs: list[Digest] = []
        if asset.kind is AssetKind.DIRECTORY:
            blobs += await self.cas.directory_blobs(asset.digest, f"directory of {asset.uri}")
        else:
            blobs.append(asset.digest)
        blobs += asset.references_blobs
        for root in asset.references_directories:
            blobs += await self.cas.directory_blobs(root, f"directory referenced by {asset.uri}")
        return blobs

    async def remember(self, assets: Sequence[Asset]) -> None:
        """Store `assets`, each under its own name; FAILED_PRECONDITION listing what is
        missing when their content is not all in the CAS (nothing is stored then)."""
        if not assets:
            return
        missing = await self.cas.find_missing(await self.referenced_blobs(assets[0]))
        if missing:
            raise missing_blobs_error(missing, f"the {assets[0].kind.value} asset references "
                                      "blobs that are not in the CAS")
        for asset in assets:
            await self.store.put(asset.key, asset.encode())

    async def forget(self, kind: AssetKind, uri: str, qualifiers: Qualifiers) -> None:
        await self.store.delete(asset_key(kind, uri, qualifiers))

    async def lookup(self, kind: AssetKind, uri: str, qualifiers: Qualifiers, *,
                     now: float, oldest: float | None = None) -> Asset | None:
        """The asset of that name, if it is current, acceptable and complete."""
        key = asset_key(kind, uri, qualifiers)
        data = await self.store.get(key)
        if data is None:
            return None
        try:
            asset = Asset.decode(data)
            if (asset.kind, asset.uri, asset.qualifiers) != (kind, uri, tuple(qualifiers)):
                raise ValueError("the entry names another asset")
        except (ValueError, KeyError, TypeError, InvalidArgument):
            log.error("asset entry %s for %s is unreadable; dropping it", key, uri)
            await self.store.delete(key)
            return None
        if asset.expire_at is not None and asset.expire_at <= now:
            await self.store.delete(key)
            return None
        if oldest is not None and asset.created < oldest:
            return None
        try:
            missing = await self.cas.find_missing(await self.referenced_blobs(asset))
        except InvalidArgument:  # a Directory in its tree does not parse
            missing = [asset.digest]
        if missing:
            log.debug("asset %s is incomplete (%d blobs gone)", uri, len(missing))
            return None
        return asset
