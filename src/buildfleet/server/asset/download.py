"""Downloads over HTTP(S) into the CAS, for FetchBlob.

A download is bounded in every way a hostile or broken origin could stretch it:
only http(s) URIs under the configured prefixes (a redirect is checked like the
first URI, and credentials are not sent on to another host), never to a
link-local address (169.254.0.0/16, fe80::/10: where clouds serve a machine's own
credentials), whether the URI names it or a host name resolves to it, at most
`max_redirects` redirects, at most `max_size` bytes (a larger Content-Length is
refused before reading; a body that grows past it is cut off), all within the
timeout.  The bytes are hashed as they arrive, checked against the request's
``checksum.sri`` and only then stored: a mismatch stores nothing.  Large bodies
are spooled to a file under the server's data directory, not held in memory.

Failures are `DownloadFailed` with the status the API asks FetchBlob to answer
with inline: NOT_FOUND (the origin has no such content), PERMISSION_DENIED (it
refused us, or the URI is not allowed), ABORTED (a checksum mismatch, too many
redirects), RESOURCE_EXHAUSTED (too large), DEADLINE_EXCEEDED, UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urljoin, urlsplit

import aiohttp
import grpc
from aiohttp.abc import ResolveResult
from aiohttp.resolver import ThreadedResolver

from buildfleet import __version__
from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError
from buildfleet.server.asset.qualifiers import Integrity
from buildfleet.storage.cas import Cas

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
IN_MEMORY = 8 * 1024 * 1024  # bodies up to this size are not spooled to a file
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class DownloadFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DownloadLimits:
    allow_prefixes: Sequence[str]  # empty: any http(s) URI
    max_size: int
    max_redirects: int


def is_downloadable(uri: str) -> bool:
    return urlsplit(uri).scheme.lower() in ("http", "https")


def _link_local(host: str) -> bool:
    """Whether `host` is a link-local IP address (of either family)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_link_local
    return address.is_link_local


class BlockedAddress(OSError):
    pass


class _Resolver(ThreadedResolver):
    """The system's resolver, minus link-local addresses."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = [r for r in await super().resolve(host, port, family)
                 if not _link_local(r["host"])]
        if not found:
            raise BlockedAddress(f"{host} resolves only to link-local addresses, which "
                                 "this server does not download from")
        return found


class _Spool:
    """A body being received: in memory, then in a file once it is large."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.chunks: list[bytes] = []
        self.size = 0
        self.file: IO[bytes] | None = None

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.file is None and self.size <= IN_MEMORY:
            self.chunks.append(data)
            return
        file = self.file
        if file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = await asyncio.to_thread(self._new_file)
            self.file = file
            await asyncio.to_thread(file.writelines, self.chunks)
            self.chunks = []
        await asyncio.to_thread(file.write, data)

    def _new_file(self) -> IO[bytes]:
        return tempfile.NamedTemporaryFile(dir=self.directory, prefix="download-")

    async def store(self, cas: Cas, digest: Digest) -> None:
        if self.file is None:
            await cas.put(digest, b"".join(self.chunks))
            return
        file = self.file
        await asyncio.to_thread(file.seek, 0)
        writer = await cas.begin_write(digest)
        try:
            while chunk := await asyncio.to_thread(file.read, CHUNK):
                await writer.write(chunk)
            await writer.commit()
        except BaseException:
            await writer.abort()
            raise

    def close(self) -> None:
        if self.file is not None:
            self.file.close()  # a NamedTemporaryFile: removed on close
            self.file = None
        self.chunks = []


class HttpDownloader:
    """Downloads URIs into a CAS (see the module docstring)."""

    def __init__(self, limits: DownloadLimits, spool_directory: Path) -> None:
        self.limits = limits
        self.spool_directory = spool_directory
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # HTTP requests sent (for metrics and tests)

    def allowed(self, uri: str) -> bool:
        if not is_downloadable(uri):
            return False
        prefixes = self.limits.allow_prefixes
        return not prefixes or any(uri.startswith(p) for p in prefixes)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=_Resolver()),
                auto_decompress=False,  # the bytes as served: an archive stays an archive
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
                headers={"User-Agent": f"buildfleet/{__version__}",
                         "Accept-Encoding": "identity"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def download(self, uri: str, headers: dict[str, str], timeout: float,
                       integrity: Integrity | None, cas: Cas) -> Digest:
        """Download `uri` into `cas` and return its digest; DownloadFailed otherwise."""
        spool = _Spool(self.spool_directory)
        try:
            async with asyncio.timeout(timeout):
                digest = await self._receive(uri, headers, integrity, spool, cas)
                await spool.store(cas, digest)
            return digest
        except TimeoutError:
            raise DownloadFailed(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"{uri}: no complete download within {timeout:g} s") from None
        except BuildfleetError as error:  # from the CAS: too large for it, full...
            raise DownloadFailed(error.code, f"{uri}: {error.message}") from None
        finally:
            spool.close()

    async def _receive(self, uri: str, headers: dict[str, str], integrity: Integrity | None,
                       spool: _Spool, cas: Cas) -> Digest:
        url, origin = uri, urlsplit(uri).netloc
        for _ in range(self.limits.max_redirects + 1):
            if not self.allowed(url) or _link_local(urlsplit(url).hostname or ""):
                raise DownloadFailed(grpc.StatusCode.PERMISSION_DENIED,
                                     f"{url}: not an allowed origin for downloads"
                                     + ("" if url == uri else f" (redirected from {uri})"))
            # credentials stay with the host they were given for
            sent = headers if urlsplit(url).netloc == origin else {}
            try:
                self.requests += 1
                async with self._client().get(url, headers=sent,
                                              allow_redirects=False) as response:
                    if response.status in REDIRECTS and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    _check_status(url, response.status, response.reason)
                    return await self._body(url, response, integrity, spool, cas)
            except aiohttp.ClientConnectorError as error:
                code = grpc.StatusCode.PERMISSION_DENIED \
                    if isinstance(error.os_error, BlockedAddress) else grpc.StatusCode.UNAVAILABLE
                raise DownloadFailed(code, f"{url}: {error.os_error}") from None
            except aiohttp.ClientError as error:
                raise DownloadFailed(grpc.StatusCode.UNAVAILABLE,
                                     f"{url}: {type(error).__name__}: {error}") from None
        raise DownloadFailed(grpc.StatusCode.ABORTED,
                             f"{uri}: more than {self.limits.max_redirects} redirects")

    async def _body(self, url: str, response: aiohttp.ClientResponse,
                    integrity: Integrity | None, spool: _Spool, cas: Cas) -> Digest:
        limit = self.limits.max_size
        if cas.max_blob_size:
            limit = min(limit, cas.max_blob_size)
        if response.content_length is not None and response.content_length > limit:
            raise DownloadFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{url}: {response.content_length} bytes is more than this "
                                 f"server downloads ({limit} bytes)")
        sha256 = hashlib.sha256()
        other = None if integrity is None or integrity.algorithm == "sha256" \
            else hashlib.new(integrity.algorithm)
        async for chunk in response.content.iter_chunked(CHUNK):
            if spool.size + len(chunk) > limit:
                raise DownloadFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"{url}: the body is longer than this server downloads "
                                     f"({limit} bytes)")
            sha256.update(chunk)
            if other is not None:
                other.update(chunk)
            await spool.write(chunk)
        if integrity is not None:
            raw = (other or sha256).digest()
            if not integrity.matches(raw):
                raise DownloadFailed(
                    grpc.StatusCode.ABORTED,
                    f"{url}: checksum.sri mismatch: expected {integrity.text}, the content "
                    f"has {Integrity.describe(integrity.algorithm, raw)}; nothing was stored")
        return Digest(sha256.hexdigest(), spool.size)


def _check_status(url: str, status: int, reason: str | None) -> None:
    if 200 <= status < 300 and status != 206:
        return
    text = f"{url}: HTTP {status} {reason or ''}".rstrip()
    if status in (404, 410):
        raise DownloadFailed(grpc.StatusCode.NOT_FOUND, text)
    if status in (401, 403, 407):
        raise DownloadFailed(grpc.StatusCode.PERMISSION_DENIED, text)
    if status == 429:
        raise DownloadFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, text)
    if status >= 500:
        raise DownloadFailed(grpc.StatusCode.UNAVAILABLE, text)
    raise DownloadFailed(grpc.StatusCode.NOT_FOUND, text)


def spool_directory(data_dir: Path) -> Path:
    """Where downloads too large for memory are spooled (emptied at start-up)."""
    directory = Path(data_dir) / "tmp" / "downloads"
    with contextlib.suppress(FileNotFoundError):
        for leftover in directory.iterdir():
            with contextlib.suppress(OSError):
                os.unlink(leftover)
    return directory
