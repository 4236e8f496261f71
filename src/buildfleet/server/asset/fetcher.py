"""Resolving Fetch requests: remembered assets first, then a download.

FetchBlob tries each URI's remembered asset, in the client's order; failing that,
and when downloading is on and every qualifier can be satisfied by a download, it
downloads the URIs in order until one succeeds, stores the content in the CAS and
remembers it under that URI.  FetchDirectory answers from remembered (pushed)
assets only.

Concurrent requests for the same download share it: a fleet of CI machines that
all ask for one archive at once costs the origin one request.  A download runs
on its own, shielded from the calls waiting for it, so one that outlives its
first caller's deadline still completes (within its own timeout) and serves the
retry, as the API suggests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from buildfleet.config import AssetsConfig
from buildfleet.server.asset.download import DownloadFailed, HttpDownloader, is_downloadable
from buildfleet.server.asset.qualifiers import RequestQualifiers
from buildfleet.storage.assets import Asset, AssetKind, AssetStore
from buildfleet.storage.cas import Cas

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetched:
    """The outcome of a Fetch: an asset (status OK), or a status for the response."""

    code: grpc.StatusCode
    message: str
    uri: str
    asset: Asset | None = None


@dataclass(frozen=True)
class FetchRequest:
    instance: str
    kind: AssetKind
    uris: Sequence[str]
    qualifiers: RequestQualifiers
    timeout: float | None  # None: the configured default
    oldest: float | None  # oldest_content_accepted, seconds since the epoch


_DownloadKey = tuple[str, str, tuple[tuple[str, str], ...]]


class AssetFetcher:
    """Answers Fetch requests for every instance of a server."""

    def __init__(self, config: AssetsConfig, downloader: HttpDownloader) -> None:
        self.config = config
        self.downloader = downloader
        self._downloads: dict[_DownloadKey, asyncio.Task[Asset]] = {}
        self.joined = 0  # requests that shared a download already running

    def timeout(self, requested: float | None) -> float:
        wanted = self.config.download_timeout if not requested else requested
        return min(wanted, self.config.max_download_timeout)

    async def fetch(self, request: FetchRequest, cas: Cas, assets: AssetStore) -> Fetched:
        now = time.time()
        name = request.qualifiers.name
        for index, uri in enumerate(request.uris):
            for known_as in dict.fromkeys((name, request.qualifiers.download_name(index, uri))):
                asset = await assets.lookup(request.kind, uri, known_as, now=now,
                                            oldest=request.oldest)
                if asset is not None:
                    return Fetched(grpc.StatusCode.OK, "", uri, asset)
        first = request.uris[0]
        if request.kind is AssetKind.DIRECTORY:
            return Fetched(grpc.StatusCode.NOT_FOUND,
                           f"no directory is known as {_listed(request.uris)} with these "
                           "qualifiers (this server serves directories that were pushed; it "
                           "does not download them)", first)
        pushed_only = request.qualifiers.pushed_only
        if pushed_only:
            return Fetched(grpc.StatusCode.NOT_FOUND,
                           f"no blob is known as {_listed(request.uris)} with these "
                           f"qualifiers, and a download cannot vouch for "
                           f"{', '.join(pushed_only)}", first)
        if not self.config.download:
            return Fetched(grpc.StatusCode.NOT_FOUND,
                           f"no blob is known as {_listed(request.uris)} with these "
                           "qualifiers (downloading is off on this server)", first)
        return await self._download_any(request, cas, assets)

    async def _download_any(self, request: FetchRequest, cas: Cas,
                            assets: AssetStore) -> Fetched:
        timeout = self.timeout(request.timeout)
        deadline = time.monotonic() + timeout
        failures: list[tuple[str, DownloadFailed]] = []
        for index, uri in enumerate(request.uris):
            if not is_downloadable(uri):
                failures.append((uri, DownloadFailed(
                    grpc.StatusCode.NOT_FOUND, f"{uri}: not known, and not an http(s) URI")))
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                failures.append((uri, DownloadFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                     f"{uri}: not tried within {timeout:g} s")))
                break
            task = self._download(request, index, uri, timeout, cas, assets)
            try:
                asset = await asyncio.wait_for(asyncio.shield(task), left)
            except DownloadFailed as failure:
                failures.append((uri, failure))
                continue
            except TimeoutError:
                failures.append((uri, DownloadFailed(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{uri}: no complete download within {timeout:g} s (it goes on in the "
                    "background for a retry)")))
                break
            return Fetched(grpc.StatusCode.OK, "", uri, asset)
        uri, first = failures[0]
        message = "; ".join(failure.message for _, failure in failures)
        return Fetched(first.code, message, uri)

    def _download(self, request: FetchRequest, index: int, uri: str, timeout: float,
                  cas: Cas, assets: AssetStore) -> asyncio.Task[Asset]:
        """The download of `uri` for `request`: one already running, or a new one."""
        name = request.qualifiers.download_name(index, uri)
        key = (request.instance, uri, name)
        task = self._downloads.get(key)
        if task is None:
            task = asyncio.create_task(self._download_and_remember(
                request, index, uri, name, timeout, cas, assets))
            self._downloads[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        else:
            self.joined += 1
        return task

    def _finished(self, key: _DownloadKey, task: asyncio.Task[Asset]) -> None:
        if self._downloads.get(key) is task:
            del self._downloads[key]
        if not task.cancelled() and task.exception() is not None:  # retrieved: no warning
            log.debug("download of %s failed: %s", key[1], task.exception())

    async def _download_and_remember(self, request: FetchRequest, index: int, uri: str,
                                     name: tuple[tuple[str, str], ...], timeout: float,
                                     cas: Cas, assets: AssetStore) -> Asset:
        started = time.time()
        qualifiers = request.qualifiers
        digest = await self.downloader.download(uri, qualifiers.headers_for(index, uri),
                                                timeout, qualifiers.integrity, cas)
        asset = Asset(AssetKind.BLOB, uri, name, digest, created=started)
        await assets.remember([asset])
        log.info("downloaded %s (%d bytes) into the CAS of instance %r", uri,
                 digest.size_bytes, request.instance)
        return asset

    async def close(self) -> None:
        for task in list(self._downloads.values()):
            task.cancel()
        if self._downloads:
            await asyncio.wait(list(self._downloads.values()), timeout=5)
        await self.downloader.close()


def _listed(uris: Sequence[str]) -> str:
    shown = ", ".join(uris[:3])
    return shown + (f" (and {len(uris) - 3} more)" if len(uris) > 3 else "")
