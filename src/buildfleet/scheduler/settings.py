"""Tunables of one instance's scheduler (set from the `scheduler:` config section)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerSettings:
    max_attempts: int = 5  # leases per job that may end in infrastructure failure
    keepalive: float = 60.0  # seconds a session may stay silent after its last call
    long_poll: float = 60.0  # hold bound for an UpdateBotSession without a deadline
    long_poll_fraction: float = 0.8  # share of a call's deadline a long-poll may use
    busy_poll: float = 1.0  # hold bound while the bot runs leases (it may finish one)
    default_timeout: float = 3600.0  # action timeout when the Action sets none
    max_timeout: float = 86400.0  # larger Action.timeout values are refused
    timeout_grace: float = 30.0  # extra time before the scheduler ends a running job
    unmatched_timeout: float = 300.0  # fail a job no live bot could run for this long
    max_queued: int = 100_000  # queued jobs per instance before RESOURCE_EXHAUSTED
    fairness_share: float = 0.1  # share of assignments that take the oldest job
    offer_pending: bool = False  # offer leases PENDING with Any(Digest) (older bots)
    completed_retention: float = 3600.0  # keep finished operations this long
    cache_failed_results: bool = False  # also cache results with a non-zero exit code
    tick: float = 1.0  # seconds between housekeeping passes
    bot_label_key: str = "OSFamily"  # property that labels bots in metrics
