"""A finished lease's result, made ready before either strategy applies it.

`settle` is the blob I/O of a completion, done before the scheduler records
anything (so the replicated strategy holds no row lock during it): the result's
inline outputs go to the CAS (reccworker sends stdout/stderr as bytes), the
outcome is decided by `rules.outcomes`, and a cacheable success is written to
the action cache.  Only then is the job completed, so no client ever sees an
operation done before its result is in the action cache, and the bot's update
returns once both are durable.  Strategies settle only reports of leases the
session held when the update began; should the lease end meanwhile (cancelled,
timed out), the settled outcome is dropped -- the cached result is still the
real one of the bot that held the lease.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from buildfleet.config import SchedulerConfig
from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError, FailedPrecondition
from buildfleet.scheduler.model import ReportedLease
from buildfleet.scheduler.rules import outcomes
from buildfleet.storage.action_cache import ActionCache

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LeasedJob:
    """What settling a lease needs to know of its job."""

    action_digest: Digest
    queued_at: float  # wall clock
    cacheable: bool


async def settle(report: ReportedLease, job: LeasedJob, *, bot_id: str, terminating: bool,
                 action_cache: ActionCache | None,
                 settings: SchedulerConfig) -> outcomes.Completion | outcomes.Requeue:
    """The decided end of a lease `bot_id` reported COMPLETED, with its blobs stored."""
    verdict = outcomes.judge(report, bot_id=bot_id, terminating=terminating)
    if isinstance(verdict, outcomes.Requeue):
        return verdict
    if verdict.result is not None and action_cache is not None:
        try:
            await action_cache.externalize(verdict.result)
        except BuildfleetError as error:
            return outcomes.unstorable(bot_id, error.message)
    done = outcomes.completion(verdict, bot_id=bot_id, queued_at=job.queued_at,
                               cacheable=job.cacheable,
                               cache_failed_results=settings.cache_failed_results)
    if done.to_cache is not None and action_cache is not None:
        await _cache(action_cache, job.action_digest, done)
    return done


async def _cache(action_cache: ActionCache, digest: Digest, done: outcomes.Completion) -> None:
    """Write a result to the action cache; a failure is logged, never the job's."""
    assert done.to_cache is not None
    try:
        await action_cache.put(digest, done.to_cache, check_blobs=True)
    except FailedPrecondition as error:
        log.warning("not caching the result of %s: %s", digest, error.message)
    except Exception:
        log.exception("could not cache the result of %s", digest)
