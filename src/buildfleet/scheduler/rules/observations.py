"""What a scheduler has seen, for its metrics: how jobs ended, why they went back to
the queue, how long they queued and ran.

Both strategies record the same things at the same decisions (a job ends, a lease is
taken back, a submission joins a job in flight, a bot's report is refused), each on
the process where the decision was applied; the metrics exporter reads them when it
is scraped.  Nothing here knows about Prometheus: counters are plain counts and a
histogram is cumulative bucket counts with a sum.
"""

from __future__ import annotations

import bisect
import enum
from collections import Counter
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

# Upper bounds, seconds: from a no-op action on an idle grid to an hour-long test.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 900.0, 3600.0)


class Outcome(enum.StrEnum):
    SUCCESS = "success"  # ran, exit code 0
    FAILED = "failed"  # ran with a non-zero exit code, or failed on the bots for good
    CACHE_HIT = "cache_hit"  # answered from the action cache
    TIMEOUT = "timeout"  # ran past its timeout
    CANCELLED = "cancelled"
    UNMATCHED = "unmatched"  # no bot could run it


@dataclass
class Histogram:
    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with +Inf."""
        running, found = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            found.append((bound, running))
        return found


def _seconds(start: object, end: object) -> float | None:
    started, ended = start.ToNanoseconds(), end.ToNanoseconds()  # type: ignore[attr-defined]
    if not started or not ended or ended < started:
        return None
    return (ended - started) / 1e9


@dataclass
class Observations:
    outcomes: Counter[str] = field(default_factory=Counter)
    requeues: Counter[str] = field(default_factory=Counter)  # by cause
    deduplicated: int = 0  # submissions that joined an identical job in flight
    reports_refused: int = 0  # bot updates refused as malformed or not the bot's
    queued_seconds: Histogram = field(default_factory=Histogram)  # queued -> bot started
    execution_seconds: Histogram = field(default_factory=Histogram)  # the command ran
    total_seconds: Histogram = field(default_factory=Histogram)  # queued -> result

    def ended(self, outcome: Outcome, response: bytes | None = None) -> None:
        """A job ended; its ExecuteResponse gives the durations when a bot ran it."""
        self.outcomes[outcome.value] += 1
        if outcome is Outcome.CACHE_HIT or not response:
            return
        message = re_pb2.ExecuteResponse()
        try:
            message.ParseFromString(response)
        except DecodeError:
            return
        if not message.HasField("result"):
            return
        metadata = message.result.execution_metadata
        for histogram, start, end in (
                (self.queued_seconds, metadata.queued_timestamp,
                 metadata.worker_start_timestamp),
                (self.execution_seconds, metadata.execution_start_timestamp,
                 metadata.execution_completed_timestamp),
                (self.total_seconds, metadata.queued_timestamp,
                 metadata.worker_completed_timestamp)):
            seconds = _seconds(start, end)
            if seconds is not None:
                histogram.observe(seconds)

    def merge(self, other: Observations) -> None:
        """Add what `other` saw (a committed transaction's observations)."""
        self.outcomes.update(other.outcomes)
        self.requeues.update(other.requeues)
        self.deduplicated += other.deduplicated
        self.reports_refused += other.reports_refused
        for mine, theirs in ((self.queued_seconds, other.queued_seconds),
                             (self.execution_seconds, other.execution_seconds),
                             (self.total_seconds, other.total_seconds)):
            if theirs.count:
                mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts, strict=True)]
                mine.total += theirs.total
                mine.count += theirs.count
