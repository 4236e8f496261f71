"""The web page's HTTP listener (aiohttp, on the server's event loop)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from buildfleet.config.base import ConfigError, shown_host
from buildfleet.config.security import TlsConfig
from buildfleet.server.web.pages import Pages


def ssl_context(tls: TlsConfig, resolve: Callable[[str], Path]) -> ssl.SSLContext:
    """HTTPS with the listener's certificate; with `client-ca`, browsers must present a
    certificate it signed (as gRPC clients must)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(resolve(tls.cert), resolve(tls.key))
        if tls.client_ca:
            context.load_verify_locations(cafile=str(resolve(tls.client_ca)))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"web tls: cannot load {tls.cert}, {tls.key}"
                          f"{', ' + tls.client_ca if tls.client_ca else ''}: "
                          f"{getattr(error, 'strerror', None) or error}") from None
    return context


class WebEndpoint:
    def __init__(self, pages: Pages, host: str, port: int,
                 tls: ssl.SSLContext | None = None) -> None:
        self.pages = pages
        self.host, self.port = host, port
        self.tls = tls
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Bind and serve; the bound port (port 0 picks a free one)."""
        runner = web.AppRunner(self.pages.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.tls,
                           reuse_address=True)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise OSError(f"cannot serve the web page on {self.host}:{self.port}: "
                          f"{error.strerror or error}") from None
        self._runner = runner
        if self.port == 0:  # the port actually bound
            for address in runner.addresses:
                if isinstance(address, tuple) and len(address) >= 2:
                    self.port = int(address[1])
                    break
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{shown_host(self.host)}:{self.port}/"
