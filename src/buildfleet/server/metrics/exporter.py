"""The metrics of a server: a collector that reads the server's state on its event
loop when scraped, a gRPC interceptor that times every call, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from buildfleet.scheduler.model import BotStatus, Properties
from buildfleet.scheduler.rules.observations import DURATION_BUCKETS, Outcome
from buildfleet.scheduler.rules.observations import Histogram as Observed
from buildfleet.server.interception import Enter, Finish, Interceptor

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from buildfleet.server.bots.service import BotsService
    from buildfleet.server.instance import Instances

log = logging.getLogger(__name__)

PREFIX = "buildfleet"
SCRAPE_TIMEOUT = 10.0  # seconds the event loop has to take a snapshot

# Every metric this module exports (names as scraped: counters with _total,
# histograms with their _bucket/_sum/_count series).
NAMES = frozenset({
    "buildfleet_bots",
    "buildfleet_bots_free_capacity",
    "buildfleet_bots_connected",
    "buildfleet_bots_draining",
    "buildfleet_queue_depth",
    "buildfleet_queue_oldest_age_seconds",
    "buildfleet_actions_executing",
    "buildfleet_builds",
    "buildfleet_build_actions",
    "buildfleet_actions_total",
    "buildfleet_requeues_total",
    "buildfleet_deduplicated_submissions_total",
    "buildfleet_lease_reports_refused_total",
    "buildfleet_action_queued_seconds",
    "buildfleet_action_execution_seconds",
    "buildfleet_action_total_seconds",
    "buildfleet_cas_read_bytes_total",
    "buildfleet_cas_written_bytes_total",
    "buildfleet_cas_missing_blobs_total",
    "buildfleet_cas_corrupted_blobs_total",
    "buildfleet_cas_evicted_blobs_total",
    "buildfleet_action_cache_requests_total",
    "buildfleet_grpc_requests_total",
    "buildfleet_grpc_request_duration_seconds",
})


def platform_label(requirements: Properties) -> str:
    """A queue's platform as one label value: `OSFamily=linux,ISA=x86-64` (sorted)."""
    return ",".join(f"{name}={value}" for name, value in sorted(requirements)) or "any"


def _histogram(family: HistogramMetricFamily, labels: list[str], observed: Observed) -> None:
    buckets = [(str(bound) if bound != float("inf") else "+Inf", count)
               for bound, count in observed.cumulative()]
    family.add_metric(labels, buckets, observed.total)


def _evictions(stores: Iterable[Any]) -> int:
    """Blobs evicted by every size-limited store in the trees of `stores`."""
    seen: set[int] = set()
    total = 0
    pending = list(stores)
    while pending:
        store = pending.pop()
        if store is None or id(store) in seen:
            continue
        seen.add(id(store))
        total += int(getattr(store, "evicted_blobs", 0))
        pending += [getattr(store, name, None) for name in ("inner", "backend", "cache")]
    return total


class GridCollector(Collector):
    """Reads the server's state at scrape time, on the server's event loop (the HTTP
    endpoint runs on a thread of its own)."""

    def __init__(self, instances: Instances, bots: BotsService | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.instances = instances
        self.bots = bots
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        done: Future[list[Metric]] = Future()

        def snapshot() -> None:
            try:
                done.set_result(self.snapshot())
            except BaseException as error:  # reported to the scrape, not the loop
                done.set_exception(error)

        self.loop.call_soon_threadsafe(snapshot)
        yield from done.result(SCRAPE_TIMEOUT)

    def snapshot(self) -> list[Metric]:
        bots = GaugeMetricFamily(f"{PREFIX}_bots", "Live bot sessions by status and label "
                                 "(the scheduler's bot-label-key property).",
                                 labels=["instance", "status", "label"])
        capacity = GaugeMetricFamily(f"{PREFIX}_bots_free_capacity",
                                     "Free lease slots of live bots by status and label.",
                                     labels=["instance", "status", "label"])
        connected = GaugeMetricFamily(f"{PREFIX}_bots_connected", "Live bot sessions.",
                                      labels=["instance"])
        draining = GaugeMetricFamily(f"{PREFIX}_bots_draining",
                                     "Live bots a drain keeps from new work.",
                                     labels=["instance"])
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Queued actions per platform.",
                                  labels=["instance", "platform"])
        oldest = GaugeMetricFamily(f"{PREFIX}_queue_oldest_age_seconds",
                                   "How long the oldest queued action of each platform has "
                                   "waited.", labels=["instance", "platform"])
        executing = GaugeMetricFamily(f"{PREFIX}_actions_executing",
                                      "Actions a bot is running.", labels=["instance"])
        builds = GaugeMetricFamily(
            f"{PREFIX}_builds", "Builds with queued or running actions, by kind "
            "(correlated invocation, tool invocation, principal, anonymous).",
            labels=["instance", "kind"])
        build_actions = GaugeMetricFamily(
            f"{PREFIX}_build_actions", "Queued and running actions by the kind of build "
            "they count towards (an action two builds wait for counts for each).",
            labels=["instance", "kind", "state"])
        ended = CounterMetricFamily(f"{PREFIX}_actions", "Actions ended, by outcome.",
                                    labels=["instance", "outcome"])
        requeues = CounterMetricFamily(f"{PREFIX}_requeues", "Leases taken back and their "
                                       "actions queued again (or failed), by cause.",
                                       labels=["instance", "cause"])
        deduplicated = CounterMetricFamily(
            f"{PREFIX}_deduplicated_submissions",
            "Submissions that joined an identical action in flight.", labels=["instance"])
        refused = CounterMetricFamily(f"{PREFIX}_lease_reports_refused",
                                      "Bot updates refused (malformed, or not the bot's).",
                                      labels=["instance"])
        durations = {
            name: HistogramMetricFamily(f"{PREFIX}_action_{name}_seconds", text,
                                        labels=["instance"])
            for name, text in (
                ("queued", "From queued to a bot starting the action."),
                ("execution", "The command's run time on the bot."),
                ("total", "From queued to the bot's result."))}
        now = time.time()
        for instance in self.instances:
            scheduler = instance.scheduler
            if scheduler is None:
                continue
            name = instance.name
            if self.bots is not None:
                counts = self.bots.get_bot_status_metrics(name)
                for (status, label), count in counts["bots_per_property_label"].items():
                    bots.add_metric([name, status.name, label], count)
                for (status, label), free in \
                        counts["available_capacity_per_property_label"].items():
                    capacity.add_metric([name, status.name, label], free)
                if not counts["bots_per_property_label"]:
                    for status in BotStatus:
                        bots.add_metric([name, status.name, "unknown"], 0)
                connected.add_metric([name], self.bots.query_connected_bots_for_instance(name))
            draining.add_metric([name], sum(1 for session in scheduler.live_sessions()
                                            if scheduler.is_drained(session)))
            for group in scheduler.queue_groups():
                platform = platform_label(group.requirements)
                depth.add_metric([name, platform], group.queued)
                oldest.add_metric([name, platform], max(0.0, now - group.oldest_queued_at))
            executing.add_metric([name], scheduler.executing())
            for kind in scheduler.build_kinds():
                builds.add_metric([name, kind.kind], kind.builds)
                build_actions.add_metric([name, kind.kind, "queued"], kind.queued)
                build_actions.add_metric([name, kind.kind, "running"], kind.running)
            seen = scheduler.observations
            for outcome in Outcome:
                ended.add_metric([name, outcome.value], seen.outcomes.get(outcome.value, 0))
            for cause, count in sorted(seen.requeues.items()):
                requeues.add_metric([name, cause], count)
            deduplicated.add_metric([name], seen.deduplicated)
            refused.add_metric([name], seen.reports_refused)
            for key, observed in (("queued", seen.queued_seconds),
                                  ("execution", seen.execution_seconds),
                                  ("total", seen.total_seconds)):
                _histogram(durations[key], [name], observed)
        return [bots, capacity, connected, draining, depth, oldest, executing, builds,
                build_actions, ended, requeues,
                deduplicated, refused, *durations.values(), *self._storage()]

    def _storage(self) -> list[Metric]:
        families = {
            key: CounterMetricFamily(f"{PREFIX}_cas_{key}", text, labels=["instance"])
            for key, text in (("read_bytes", "Bytes served from the CAS."),
                              ("written_bytes", "Bytes verified and stored in the CAS."),
                              ("missing_blobs", "Blobs found missing when asked for."),
                              ("corrupted_blobs", "Blobs found corrupted and removed."))}
        cache = CounterMetricFamily(f"{PREFIX}_action_cache_requests",
                                    "Action cache lookups by result.",
                                    labels=["instance", "result"])
        for instance in self.instances:
            counters = instance.cas.counters
            families["read_bytes"].add_metric([instance.name], counters.bytes_read)
            families["written_bytes"].add_metric([instance.name], counters.bytes_written)
            families["missing_blobs"].add_metric([instance.name], counters.missing_blobs)
            families["corrupted_blobs"].add_metric([instance.name], counters.corrupted_blobs)
            cache.add_metric([instance.name, "hit"], instance.action_cache.hits)
            cache.add_metric([instance.name, "miss"], instance.action_cache.misses)
        evicted = CounterMetricFamily(f"{PREFIX}_cas_evicted_blobs",
                                      "Blobs evicted by size-limited stores.")
        evicted.add_metric([], _evictions(self.instances.stores))
        return [*families.values(), cache, evicted]


class CallMetrics(Interceptor):
    """Counts and times every gRPC call by service, method and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.calls = Counter(f"{PREFIX}_grpc_requests", "gRPC calls handled.",
                             ["service", "method", "code"], registry=registry)
        self.latency = Histogram(f"{PREFIX}_grpc_request_duration_seconds",
                                 "Time from a call's start to its end (a stream's whole "
                                 "life).", ["service", "method"], registry=registry,
                                 buckets=DURATION_BUCKETS)

    def enter_for(self, method: str) -> Enter | None:
        service, _, name = method.lstrip("/").rpartition("/")
        calls, latency = self.calls, self.latency.labels(service, name)

        async def enter(_: Any, context: grpc.aio.ServicerContext) -> Finish:
            started = time.perf_counter()

            def finish(error: BaseException | None) -> None:
                calls.labels(service, name, _code(context, error)).inc()
                latency.observe(time.perf_counter() - started)

            return finish

        return enter


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status a call ended with, by name."""
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    status = context.code()  # set by abort() or set_code()
    if status is None:
        return "OK" if error is None else "UNKNOWN"
    return status.name if isinstance(status, grpc.StatusCode) else str(status)


class ServerMetrics:
    """The metrics of one server: its registry, collector and call interceptor."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `_created` series: nothing here needs them
        self.registry = CollectorRegistry(auto_describe=False)
        self.calls = CallMetrics(self.registry)
        self._collector: GridCollector | None = None

    def watch(self, instances: Instances, bots: BotsService | None) -> None:
        """Export the state of `instances` (call on the server's event loop)."""
        self._collector = GridCollector(instances, bots, asyncio.get_running_loop())
        self.registry.register(self._collector)


class MetricsEndpoint:
    """`/metrics` over HTTP on a thread of its own (prometheus-client's server)."""

    def __init__(self, metrics: ServerMetrics, address: tuple[str, int]) -> None:
        self.metrics = metrics
        self.address = address
        self.port = 0
        self._server: WSGIServer | None = None

    def start(self) -> int:
        host, port = self.address
        try:
            self._server, _ = start_http_server(port, host, registry=self.metrics.registry)
        except OSError as error:
            raise OSError(f"metrics: cannot listen on {host}:{port}: {error.strerror}") \
                from None
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
