"""rules.matching and rules.submissions: who runs what, in which order, and what a
submission may be.  Time is a number the test chooses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import SchedulerConfig
from buildfleet.errors import InvalidArgument, ResourceExhausted
from buildfleet.scheduler.model import BotStatus, Properties
from buildfleet.scheduler.rules import matching, submissions

LINUX = frozenset({("OSFamily", "linux")})


@dataclass
class Job:
    priority: int
    seq: int
    requirements: Properties = frozenset()


def test_hint_properties_do_not_restrict_matching() -> None:
    """memory= and pids= tell the bot how to run an action, not which bot may."""
    platform = LINUX | {("memory", "2GiB"), ("pids", "100")}
    assert matching.requirements_of(platform, SchedulerConfig()) == LINUX
    assert matching.satisfies(LINUX, matching.requirements_of(platform, SchedulerConfig()))
    strict = SchedulerConfig(hint_properties=[])
    assert matching.requirements_of(platform, strict) == platform
    assert not matching.satisfies(LINUX, matching.requirements_of(platform, strict))


def test_a_bot_runs_what_its_properties_cover() -> None:
    both = frozenset({("ISA", "x86-64"), ("ISA", "x86-64-v3")})
    assert matching.satisfies(LINUX | both, both)
    assert not matching.satisfies(frozenset({("ISA", "x86-64")}), both)
    assert matching.satisfies(frozenset(), frozenset())


def test_which_statuses_take_work_and_which_may_yet() -> None:
    assert [s for s in BotStatus if matching.takes_work(s)] == [BotStatus.UNSPECIFIED,
                                                                BotStatus.OK]
    assert [s for s in BotStatus if not matching.may_yet_work(s)] == [
        BotStatus.BOT_TERMINATING]


def test_a_bot_that_failed_a_job_waits_for_the_back_off_and_for_the_others() -> None:
    asked: list[bool] = []

    def others(answer: bool) -> bool:
        asked.append(answer)
        return answer

    def may(bot: str, now: float, *, others_could: bool) -> bool:
        return matching.may_take(bot_id=bot, failed_on={"broken"}, retry_at=100.0, now=now,
                                 others_could=lambda: others(others_could))

    assert may("healthy", 0, others_could=True) and not asked  # others are not looked at
    assert not may("broken", 99.9, others_could=False) and not asked  # backing off
    assert not may("broken", 100.0, others_could=True)  # another bot could run it
    assert may("broken", 100.0, others_could=False)  # nobody else: its turn again
    assert matching.may_take(bot_id="broken", failed_on={"broken"}, retry_at=None, now=0,
                             others_could=lambda: False)


def test_the_back_off_doubles_up_to_its_bound() -> None:
    settings = SchedulerConfig(retry_backoff=1.0, retry_backoff_max=6.0)
    assert [matching.retry_delay(n, settings) for n in range(6)] == [0, 1, 2, 4, 6, 6]
    assert matching.retry_delay(10_000, settings) == 6.0
    assert matching.retry_delay(3, SchedulerConfig(retry_backoff=0)) == 0.0


def test_each_counted_attempt_gets_its_own_lease_id() -> None:
    assert matching.lease_id("", "job", 0) == "job"
    assert matching.lease_id("", "job", 2) == "job.2"
    assert matching.lease_id("ci/linux", "job", 1) == "ci/linux/job.1"
    assert matching.qualified("", "operations/x") == "operations/x"


def test_pick_takes_the_most_urgent_then_the_oldest() -> None:
    jobs = [Job(5, 0), Job(-1, 1), Job(3, 2), Job(-1, 3),
            Job(-9, 4, frozenset({("OSFamily", "windows")}))]
    assert matching.pick(jobs, LINUX, oldest_first=False) is jobs[1]
    assert matching.pick(jobs, LINUX, oldest_first=True) is jobs[0]
    assert matching.pick(jobs, LINUX, oldest_first=False,
                         eligible=lambda job: job.seq != 1) is jobs[3]
    assert matching.pick([], LINUX, oldest_first=False) is None


def test_fairness_takes_every_nth_assignment_by_age() -> None:
    fairness = matching.Fairness(0.25)
    plan = []
    for _ in range(8):
        count, oldest = fairness.next_batch(1)
        plan.append(oldest)
        fairness.picked(count)
    assert plan == [False, False, False, True] * 2
    # Batches stop short of the fairness pick; pending picks count.
    fairness = matching.Fairness(0.25)
    assert fairness.next_batch(10) == (3, False)
    assert fairness.next_batch(10, pending=3) == (1, True)
    assert matching.Fairness(0).next_batch(7) == (7, False)
    assert matching.Fairness(1.0).next_batch(7) == (1, True)


def test_an_actions_timeout_must_be_within_bounds() -> None:
    action = re_pb2.Action()
    assert submissions.action_timeout(action, 100) == 0.0
    action.timeout.FromSeconds(30)
    assert submissions.action_timeout(action, 100) == 30.0
    with pytest.raises(InvalidArgument, match="exceeds this instance's maximum of 10s"):
        submissions.action_timeout(action, 10)
    action.timeout.seconds = -1
    with pytest.raises(InvalidArgument, match="negative"):
        submissions.action_timeout(action, 100)


def test_the_queue_bound_and_joined_priority() -> None:
    submissions.check_room("ci", 9, 10)
    with pytest.raises(ResourceExhausted, match="'ci' has 10 queued actions"):
        submissions.check_room("ci", 10, 10)
    assert submissions.joined_priority(5, -2) == -2
    assert submissions.joined_priority(-2, 5) == -2
