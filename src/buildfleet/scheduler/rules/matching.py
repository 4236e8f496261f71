"""Who may run what, in which order, and what each attempt's lease is called.

- A bot can run a job when its properties include every (name, value) pair the
  job requires; it takes new work only while its status is OK (or unset).
- Among the jobs a bot can run it takes the one whose build is furthest below its
  share (`fair_order`): the builds (rules.invocations.build_key) with the fewest
  running actions go first, a more urgent one (lower priority value) counting
  its running actions for less, so that it gets proportionally more bots; a
  build that arrives while another holds every bot is served at the next free
  slot.  Inside a build, the most urgent job, then the oldest.  With
  `fair-builds` off, the most urgent job overall (`urgency`).  Every
  1/fairness-share-th assignment takes the oldest job instead, an age guard so
  that no job waits forever (`Fairness`).
- With `max-running-per-build`, a build already running that many actions gets
  no more until one ends.
- A bot that failed a job (an infrastructure failure) gets it again only when no
  other live bot could run it, and only after a back-off that doubles with each
  attempt (`may_take`): a retry goes to the other bots first, and the one bot of
  its kind cannot burn every attempt within milliseconds.

`pick` is the reference statement of the order.  The embedded queue indexes jobs
by the same keys, and the replicated strategy's claim is the same rule in SQL;
tests/contract/test_claim_agrees.py holds both to this module.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Protocol, TypeVar

from buildfleet.config import SchedulerConfig
from buildfleet.scheduler.model import BotStatus, Properties


class Queued(Protocol):
    """What the order needs to know of a queued job."""

    @property
    def requirements(self) -> Properties: ...

    @property
    def priority(self) -> int: ...

    @property
    def seq(self) -> int: ...  # submission order


class FairQueued(Queued, Protocol):
    @property
    def builds(self) -> Collection[str]: ...  # every build waiting for the job


Q = TypeVar("Q", bound=Queued)
F = TypeVar("F", bound=FairQueued)

# Priority points that double what a build's running actions count for: a build
# at priority -100 gets about twice the bots of one at 0, once both have work.
PRIORITY_DOUBLING = 100.0


def requirements_of(platform: Properties, settings: SchedulerConfig) -> Properties:
    """What a bot must have to run an action with these platform properties: all of
    them but the hints (`hint-properties`: memory and process limits, say), which only
    tell the bot how to run it."""
    hints = settings.hint_properties
    if not hints:
        return platform
    return frozenset((name, value) for name, value in platform if name not in hints)


def satisfies(properties: Properties, requirements: Properties) -> bool:
    """Whether a bot with `properties` can run a job that requires `requirements`."""
    return requirements <= properties


def takes_work(status: BotStatus) -> bool:
    """Whether a bot in `status` is given new leases."""
    return status in (BotStatus.OK, BotStatus.UNSPECIFIED)


def may_yet_work(status: BotStatus) -> bool:
    """Whether a live bot in `status` may still run work (now or once it recovers):
    every status but BOT_TERMINATING.  Such bots keep an action from being declared
    unrunnable, and a bot that failed an action waits for them to take it."""
    return status != BotStatus.BOT_TERMINATING


def may_take(*, bot_id: str, failed_on: Collection[str], retry_at: float | None, now: float,
             others_could: Callable[[], bool]) -> bool:
    """Whether the bot `bot_id` may take a job that the bots in `failed_on` failed.

    `others_could()`: whether another live bot that did not fail it could run it
    (asked only when needed, since it looks at other sessions)."""
    if bot_id not in failed_on:
        return True
    if retry_at is not None and now < retry_at:
        return False
    return not others_could()


def retry_delay(attempts: int, settings: SchedulerConfig) -> float:
    """Seconds before a bot that failed a job (now at `attempts`) may get it back."""
    if attempts < 1 or settings.retry_backoff <= 0:
        return 0.0
    return min(settings.retry_backoff * 2.0 ** min(attempts - 1, 30), settings.retry_backoff_max)


def qualified(instance: str, name: str) -> str:
    """`<instance>/<name>`, or just `<name>` for the unnamed instance."""
    return f"{instance}/{name}" if instance else name


def lease_id(instance: str, job_id: str, attempts: int) -> str:
    """The id of a job's lease.  Each counted attempt gets its own, so that a bot
    repeating its report of a failed lease cannot end the retry it was handed."""
    return qualified(instance, f"{job_id}.{attempts}" if attempts else job_id)


def urgency(job: Queued) -> tuple[int, int]:
    """The usual order: most urgent (lowest priority value) first, then oldest."""
    return job.priority, job.seq


def build_load(running: int, priority: int) -> float:
    """How far a build is into its share: its running actions, plus the one it would
    get, weighed by the priority of its most urgent queued job."""
    return (running + 1) * 2.0 ** (priority / PRIORITY_DOUBLING)


def fair_order(job: FairQueued, running: Callable[[str], int]) -> tuple[float, int, int]:
    """The fair order (lowest first): the load of the least loaded build waiting for
    the job, then the usual urgency.  A job no build claims counts as the shared
    anonymous build ""."""
    least = min(running(build) for build in (job.builds or ("",)))
    return build_load(least, job.priority), job.priority, job.seq


def under_limit(job: FairQueued, running: Callable[[str], int], limit: int | None) -> bool:
    """Whether a build waiting for the job may run one more action (always, without
    `max-running-per-build`)."""
    if limit is None:
        return True
    return any(running(build) < limit for build in (job.builds or ("",)))


def age(job: Queued) -> tuple[int]:
    """The fairness order: oldest first, whatever the priority."""
    return (job.seq,)


class Fairness:
    """Which assignments ignore priority: every `round(1 / share)`-th (none at share 0).

    Only assignments count, not polls that found nothing.  `next_batch` plans the
    next run of picks; the caller reports the picks it made with `picked`.
    """

    def __init__(self, share: float) -> None:
        self.every = round(1 / share) if share > 0 else 0
        self.picks = 0

    def next_batch(self, slots: int, pending: int = 0) -> tuple[int, bool]:
        """(how many picks, whether oldest first) for up to `slots` picks, after
        `pending` picks made but not yet reported."""
        if not self.every:
            return slots, False
        position = self.picks + pending
        until_fair = (self.every - (position + 1) % self.every) % self.every
        if until_fair == 0:
            return 1, True
        return min(slots, until_fair), False

    def picked(self, count: int) -> None:
        self.picks += count


def pick(jobs: Iterable[Q], properties: Properties, *, oldest_first: bool,
         eligible: Callable[[Q], bool] = lambda job: True) -> Q | None:
    """The job a bot with `properties` takes next among queued `jobs`, by urgency or
    age alone (reference rule; `pick_fairly` with the builds' running actions)."""
    order = age if oldest_first else urgency
    best: Q | None = None
    for job in jobs:
        if satisfies(properties, job.requirements) and eligible(job) \
                and (best is None or order(job) < order(best)):
            best = job
    return best


def pick_fairly(jobs: Iterable[F], properties: Properties, *, oldest_first: bool,
                running: Callable[[str], int], limit: int | None = None,
                eligible: Callable[[F], bool] = lambda job: True) -> F | None:
    """The job a bot with `properties` takes next among queued `jobs`, given how many
    actions each build runs (reference rule of fair scheduling)."""
    def fair(job: F) -> tuple[float, int, int]:
        return fair_order(job, running)

    order: Callable[[F], tuple[float | int, ...]] = age if oldest_first else fair
    best: F | None = None
    for job in jobs:
        if satisfies(properties, job.requirements) and eligible(job) \
                and under_limit(job, running, limit) \
                and (best is None or order(job) < order(best)):
            best = job
    return best
