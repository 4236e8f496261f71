"""Prometheus metrics of one server process (`metrics: {listen: HOST:PORT}`).

Every replica exports its own.  Counters and histograms are what this process
saw (its schedulers' observations, its CAS and action cache, its gRPC calls);
the gauges of bots and queues come from the schedulers' views, which the
replicated strategy refreshes once per housekeeping tick, so that every replica
shows the whole grid.  `NAMES` lists every metric exported; the tests hold the
endpoint to it.
"""

from __future__ import annotations

from buildfleet.server.metrics.exporter import NAMES, MetricsEndpoint, ServerMetrics

__all__ = ["NAMES", "MetricsEndpoint", "ServerMetrics"]
