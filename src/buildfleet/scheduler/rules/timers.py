"""Everything the scheduler decides by the clock.  Times are seconds; callers pass
their own clock's readings (wall clock where times are stored or compared across
processes, monotonic where only one process compares them).

- A bot holding leases calls at least once per busy-poll (the server holds its
  calls no longer).  Silent for `lease-timeout`, it is taken for dead: its leases
  go back to the queue (counted as an attempt, the bot remembered as having
  failed them) while the session lives on.  Silent for `keepalive`, the session
  is closed.  A bot in a call is never silent.
- A running job is ended with DEADLINE_EXCEEDED once it ran `run_limit` seconds:
  its timeout (the instance's default when the Action sets none) plus the grace
  that lets the bot enforce the timeout itself and report the outputs.
- A queued job that no live bot could run (none has its properties, or each that
  has them is terminating) fails once that has lasted `unmatched-timeout` since
  it was queued.
- A finished operation is forgotten `completed-retention` seconds after it ended
  (a cancelled one counts from its creation); a job goes with its last operation.
- A job that succeeded answers identical submissions for `JUST_FINISHED` seconds
  (clients that skip the cache lookup excepted), so that a client retrying an
  Execute that raced the completion does not run the action again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from buildfleet.config import SchedulerConfig
from buildfleet.scheduler.model import Properties

JUST_FINISHED = 10.0
MAX_EVENTS = 100  # bot events (PostBotEventTemp) kept per session


class Silence(enum.Enum):
    """What a session's silence means."""

    NONE = enum.auto()
    LEASES_ABANDONED = enum.auto()  # requeue its leases; the session lives on
    EXPIRED = enum.auto()  # close the session (its leases are requeued with it)


def silence(silent_for: float, *, in_call: bool, holds_leases: bool,
            settings: SchedulerConfig) -> Silence:
    """How a session that has not called for `silent_for` seconds is treated."""
    if in_call:
        return Silence.NONE
    if silent_for > settings.keepalive:
        return Silence.EXPIRED
    if holds_leases and silent_for > settings.lease_timeout:
        return Silence.LEASES_ABANDONED
    return Silence.NONE


def shortest_silence(settings: SchedulerConfig) -> float:
    """Sessions silent for less than this need no look (for indexed scans)."""
    return min(settings.keepalive, settings.lease_timeout)


def abandoned_reason(bot_id: str, settings: SchedulerConfig) -> str:
    return (f"bot {bot_id} went silent for more than {settings.lease_timeout:g}s "
            "while running the action")


def effective_timeout(timeout: float, settings: SchedulerConfig) -> float:
    """An action's timeout: its own, or the instance's default when it sets none (0)."""
    return timeout or settings.default_timeout


def run_limit(timeout: float, settings: SchedulerConfig) -> float:
    """How long a job may run before the scheduler ends it."""
    return effective_timeout(timeout, settings) + settings.timeout_grace


def poll_wait(requested: float, *, holds_leases: bool, settings: SchedulerConfig) -> float:
    """How long to hold an update that found nothing to say.  A bot that keeps one
    call in flight (buildbox-worker) cannot report a finished lease until the call
    returns, so a bot running leases is held only briefly."""
    return min(requested, settings.busy_poll) if holds_leases else requested


def unmatched_groups(groups: Iterable[Properties],
                     live: Iterable[Properties]) -> set[Properties]:
    """The requirement sets among `groups` that no bot with properties in `live` (the
    live bots that may yet work) can run."""
    offered = list(live)
    return {requirements for requirements in groups
            if not any(requirements <= properties for properties in offered)}


def unmatched_expired(*, since: float, queued_at: float, now: float,
                      settings: SchedulerConfig) -> bool:
    """Whether a job unmatched `since` (and queued at `queued_at`) has waited too long."""
    return now - max(since, queued_at) > settings.unmatched_timeout


def retention_cutoff(now: float, settings: SchedulerConfig) -> float:
    """Operations (and jobs) that ended before this are forgotten."""
    return now - settings.completed_retention


def operation_ended(*, created_at: float, own_end: bool,
                    job_completed_at: float | None) -> float | None:
    """When a done operation ended, for retention: its creation when it ended on its
    own (cancelled), else its job's completion; None while it runs."""
    return created_at if own_end else job_completed_at


def answers_resubmission(completed_at: float, now: float, *, skip_cache_lookup: bool) -> bool:
    """Whether a job that succeeded at `completed_at` answers an identical submission."""
    return not skip_cache_lookup and now - completed_at <= JUST_FINISHED
