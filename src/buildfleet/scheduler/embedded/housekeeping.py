"""One housekeeping pass of the embedded strategy: the rules of `rules.timers`
applied to the state in memory, once per tick."""

from __future__ import annotations

import heapq

from buildfleet.scheduler.embedded.state import JOB, EmbeddedState
from buildfleet.scheduler.rules import outcomes, timers
from buildfleet.scheduler.rules.matching import may_yet_work
from buildfleet.scheduler.rules.observations import Outcome
from buildfleet.scheduler.rules.timers import Silence


def housekeep(state: EmbeddedState) -> None:
    """Silent sessions, overdue jobs, back-offs that ended, unrunnable jobs, old ones."""
    now, wall = state.clock(), state.wall()
    durable = state.store.durable
    state.done_marks = {key: mark for key, mark in state.done_marks.items() if mark > durable}
    expire_silent(state, now)
    end_overdue(state, now)
    state.redispatch_deferred(now)
    fail_unmatched(state, wall)
    forget_recent(state, wall)
    forget_old(state, wall)


def expire_silent(state: EmbeddedState, now: float) -> None:
    settings = state.settings
    for session in list(state.sessions.values()):
        verdict = timers.silence(now - session.last_seen, in_call=session.open_calls > 0,
                                 holds_leases=bool(session.leases), settings=settings)
        if verdict is Silence.EXPIRED:
            state.stats["expired_sessions"] += 1
            state.close_session(session, "no update within the keepalive window",
                                count_attempt=True)
        elif verdict is Silence.LEASES_ABANDONED:
            state.abandon_leases(session)


def end_overdue(state: EmbeddedState, now: float) -> None:
    for job in list(state.executing):
        if job.lease is None or job.started_at is None or now - job.started_at <= job.run_limit:
            continue
        state.cancel_lease(job.lease)
        state.complete(job, outcomes.timed_out(timers.effective_timeout(job.timeout,
                                                                         state.settings)),
                       outcome=Outcome.TIMEOUT)


def fail_unmatched(state: EmbeddedState, wall: float) -> None:
    live = [session.properties for session in state.live_sessions()
            if may_yet_work(session.status)]
    groups = dict(state.queue.groups())
    unmatched = timers.unmatched_groups(groups, live)
    for requirements in list(state.unmatched_since):
        if requirements not in unmatched:
            del state.unmatched_since[requirements]
    if not unmatched:
        return
    offered = frozenset().union(*live)
    for requirements in unmatched:
        since = state.unmatched_since.setdefault(requirements, wall)
        for job in list(groups[requirements]):
            if timers.unmatched_expired(since=since, queued_at=job.queued_at, now=wall,
                                        settings=state.settings):
                state.complete(job, outcomes.unmatched(requirements, offered,
                                                       state.settings.unmatched_timeout),
                               outcome=Outcome.UNMATCHED)


def forget_recent(state: EmbeddedState, wall: float) -> None:
    """Jobs that succeeded long enough ago no longer answer identical submissions
    (oldest first: the scan stops at the first that still does)."""
    recent = state.recent
    while recent:
        job = next(iter(recent.values()))
        if job.completed_at is not None and timers.answers_resubmission(
                job.completed_at, wall, skip_cache_lookup=False):
            return
        recent.popitem(last=False)
        if job.done and not job.operations:  # its operations left memory (retire)
            state.jobs.pop(job.id, None)


def forget_old(state: EmbeddedState, wall: float) -> None:
    """Forget done operations, and done jobs left without one, that ended before the
    retention cutoff: only what has come due is looked at."""
    cutoff = timers.retention_cutoff(wall, state.settings)
    expiry = state.expiry
    while expiry and expiry[0][0] < cutoff:
        _, kind, key = heapq.heappop(expiry)
        if kind == JOB:
            job = state.jobs.get(key)
            if (job is not None and job.done and not job.operations
                    and (job.completed_at or 0) < cutoff):
                state.forget_job(job)
            continue
        operation = state.operations.get(key)
        if operation is None or not operation.done:
            continue
        ended = timers.operation_ended(created_at=operation.created_at,
                                       own_end=operation.own_response is not None,
                                       job_completed_at=operation.job.completed_at)
        if ended is None:
            continue
        if ended >= cutoff:  # it ended later than noted: wait for that time
            heapq.heappush(expiry, (ended, kind, key))
            continue
        del state.operations[key]
        state.finished.pop(key, None)
        job = operation.job
        job.operations.discard(key)
        state.store.delete_operation(key)
        if job.done and not job.operations:
            if (job.completed_at or 0) < cutoff:
                state.forget_job(job)
            else:
                heapq.heappush(expiry, (job.completed_at or 0.0, JOB, job.id))
