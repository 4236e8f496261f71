"""Assembles the gRPC server: instances, services, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from buildfleet.auth.audit import Audit
from buildfleet.auth.authenticator import Authenticator
from buildfleet.auth.tls import RotatingCredentials
from buildfleet.config import ConfigError, ServerConfig, parse_listen_address
from buildfleet.config.base import shown_host
from buildfleet.config.scheduler import is_postgres_url
from buildfleet.server.actioncache.service import ActionCacheService
from buildfleet.server.admin.service import AdminService
from buildfleet.server.asset.download import DownloadLimits, HttpDownloader, spool_directory
from buildfleet.server.asset.fetcher import AssetFetcher
from buildfleet.server.asset.service import FetchService, PushService
from buildfleet.server.auth import AuthInterceptor
from buildfleet.server.bots.service import BotsService
from buildfleet.server.bytestream.service import ByteStreamService
from buildfleet.server.capabilities.service import CapabilitiesService
from buildfleet.server.cas.service import ContentAddressableStorageService
from buildfleet.server.execution.service import ExecutionService
from buildfleet.server.instance import Instances, build_instances
from buildfleet.server.logstream.service import LogStreamService
from buildfleet.server.logstream.store import LogStreamLimits, LogStreams
from buildfleet.server.metrics import MetricsEndpoint, ServerMetrics
from buildfleet.server.operations.service import OperationsService
from buildfleet.server.web import Pages, WebEndpoint, ssl_context
from buildfleet.server.web.calls import AdminCalls

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_OPEN_CALLS = 100_000  # calls (long-polls, Execute streams) one server may hold


class Service(Protocol):
    @property
    def FULL_NAME(self) -> str: ...  # noqa: N802 - the services' class attribute

    def register(self, server: grpc.aio.Server) -> None: ...


class BuildfleetServer:
    """A configured server.  `start()` binds and serves; `stop()` drains and closes."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.instances: Instances = build_instances(config)
        streams = config.logstreams
        self.logs = LogStreams(LogStreamLimits(
            max_stream_size=streams.max_stream_size, max_total_size=streams.max_total_size,
            keep_for=streams.keep_for, idle_timeout=streams.idle_timeout))
        self.services: list[Service] = [
            ContentAddressableStorageService(self.instances),
            ByteStreamService(self.instances, logs=self.logs),
            LogStreamService(self.instances, self.logs),
            ActionCacheService(self.instances),
            CapabilitiesService(self.instances),
        ]
        assets = config.assets
        if assets.enabled:
            downloader = HttpDownloader(
                DownloadLimits(allow_prefixes=assets.allow_uris,
                               max_size=int(assets.max_download_size),
                               max_redirects=assets.max_redirects),
                spool_directory(config.data_dir))
            self.services += [
                FetchService(self.instances, assets, AssetFetcher(assets, downloader)),
                PushService(self.instances, assets),
            ]
        self.admin = AdminService(self.instances)
        # Output streams live in this process: named in operations only where the
        # bots that write them and the clients that read them meet here.
        self.named_logs = named = None if is_postgres_url(config.database) else self.logs
        if self.instances.schedulers():
            self.bots = BotsService(self.instances, logs=named)
            self.services += [
                ExecutionService(self.instances, named),
                OperationsService(self.instances, named),
                self.bots,
                self.admin,
            ]
        self.health = health.aio.HealthServicer()
        self.metrics = ServerMetrics() if config.metrics.listen is not None else None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self.web_endpoint: WebEndpoint | None = None
        self.ports: list[int] = []
        self._server: grpc.aio.Server | None = None

    def _message_limit(self) -> int:
        # Large enough to receive an over-sized batch and answer it with a clear
        # INVALID_ARGUMENT instead of gRPC's own RESOURCE_EXHAUSTED.
        largest = max(i.max_batch_total_size for i in self.instances)
        return max(16 * MiB, 2 * largest + MiB)

    async def start(self) -> list[int]:
        """Start storage, bind every listen address, serve.  Returns the bound ports."""
        check_exposure(self.config)
        credentials = [(address, None if tls is None else
                        RotatingCredentials(tls, self.config.data_path,
                                            f"tls of listener {address}").credentials())
                       for address, tls in self.config.listeners()]
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.metrics is not None:  # outermost: refused calls are counted too
            interceptors.append(self.metrics.calls)
        guard = None
        if self.config.auth.configured:
            guard = AuthInterceptor(Authenticator(self.config.auth, self.config.data_path),
                                    Audit())
            interceptors.append(guard)
        web_tls = self.config.web_tls()
        web_ssl = None if web_tls is None or self.config.web.listen is None else \
            ssl_context(web_tls, self.config.data_path)
        await self.instances.start()
        limit = self._message_limit()
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            # gRPC's defaults (1,000 soft, 3,000 hard) stop a grpc.aio server from
            # starting new calls once about 2,300 are open: too few for thousands
            # of long-polling bots.
            ("grpc.server.max_pending_requests", MAX_OPEN_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_OPEN_CALLS),
        ])
        for service in self.services:
            service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [s.FULL_NAME for s in self.services]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], server)
        for address, tls in credentials:
            parse_listen_address(address)
            try:
                port = (server.add_insecure_port(address) if tls is None
                        else server.add_secure_port(address, tls))
            except RuntimeError:
                raise OSError(f"cannot listen on {address}: the address is already in use "
                              "or not available on this machine") from None
            self.ports.append(port)
        await server.start()
        self._server = server
        if self.metrics is not None and self.config.metrics.listen is not None:
            self.metrics.watch(self.instances, getattr(self, "bots", None))
            host, port = parse_listen_address(self.config.metrics.listen)
            self.metrics_endpoint = MetricsEndpoint(self.metrics, (host.strip("[]"), port))
            await asyncio.to_thread(self.metrics_endpoint.start)
        if self.config.web.listen is not None:
            host, port = parse_listen_address(self.config.web.listen)
            self.web_endpoint = WebEndpoint(Pages(self.instances, AdminCalls(self.admin, guard),
                                                   self.named_logs),
                                            host.strip("[]"), port, web_ssl)
            await self.web_endpoint.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.ports

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, give running ones `grace` seconds, then cancel them."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        if self.web_endpoint is not None:
            await self.web_endpoint.stop()
            self.web_endpoint = None
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.stop)
            self.metrics_endpoint = None
        await self._server.stop(self.config.grace_period if grace is None else grace)
        self._server = None
        for service in self.services:
            close = getattr(service, "close", None)
            if close is not None:
                await close()
        await self.instances.close()

    def metrics_url(self) -> str | None:
        """Where Prometheus scrapes this server (None: metrics are off)."""
        if self.metrics_endpoint is None:
            return None
        host, _ = self.metrics_endpoint.address
        return f"http://{shown_host(host)}:{self.metrics_endpoint.port}/metrics"

    def web_url(self) -> str | None:
        """The fleet's web page (None: it is off)."""
        return None if self.web_endpoint is None else self.web_endpoint.url

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


LOOPBACK = ("127.", "localhost", "[::1]", "::1")


def check_exposure(config: ServerConfig) -> None:
    """ConfigError for a server reachable from other machines with nobody's
    credentials checked, unless `insecure` says so on purpose."""
    if config.insecure or config.auth.configured:
        return
    listeners = config.listeners()
    if config.web.listen is not None:
        listeners.append((config.web.listen, config.web_tls()))
    exposed = [address for address, tls in listeners
               if not parse_listen_address(address)[0].startswith(LOOPBACK)
               and (tls is None or tls.client_ca is None)]
    if exposed:
        raise ConfigError(
            f"refusing to serve {', '.join(exposed)} without authentication: anyone who "
            "can reach it could run commands on the bots and write the cache.  Configure "
            "`auth` (tokens-file, jwt or certificates; see the README's Security section), "
            "require client certificates (tls.client-ca), listen on 127.0.0.1, or pass "
            "--insecure (`insecure: true`) to serve it unauthenticated anyway")


def listen_lines(addresses: Sequence[str], ports: Sequence[int]) -> list[str]:
    """The actual HOST:PORT of each listen address (port 0 resolved)."""
    return [f"{parse_listen_address(a)[0]}:{p}" for a, p in zip(addresses, ports, strict=True)]


async def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully."""
    server = BuildfleetServer(config)
    await server.start()
    for line in listen_lines(config.addresses(), server.ports):
        log.info("listening on %s", line)
    if server.metrics_endpoint is not None:
        log.info("metrics on %s", server.metrics_url())
    if server.web_endpoint is not None:
        log.info("the fleet's web page: %s", server.web_url())
    log.info("instances: %s; data directory: %s",
             ", ".join(repr(i.name) for i in server.instances), config.data_dir)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("shutting down (grace period %.0f s)", config.grace_period)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
    await server.stop()
    # Let the calls cancelled at the end of the grace period finish unwinding
    # before asyncio.run() tears the loop down (gRPC logs them otherwise).
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=2)
    log.info("stopped")
