"""rules.timers: every decision taken by the clock, with the clock in the test's hands."""

from __future__ import annotations

import pytest

from buildfleet.config import SchedulerConfig
from buildfleet.scheduler.rules import timers
from buildfleet.scheduler.rules.timers import Silence

SETTINGS = SchedulerConfig(keepalive=60, lease_timeout=10, busy_poll=1, default_timeout=3600,
                           timeout_grace=30, unmatched_timeout=300, completed_retention=3600)


@pytest.mark.parametrize(("silent_for", "in_call", "holds", "verdict"), [
    (5, False, True, Silence.NONE),
    (10.5, False, True, Silence.LEASES_ABANDONED),
    (10.5, False, False, Silence.NONE),  # nothing to requeue: the session just waits
    (10.5, True, True, Silence.NONE),  # a bot in a call is never silent
    (61, False, False, Silence.EXPIRED),
    (61, False, True, Silence.EXPIRED),
    (600, True, False, Silence.NONE),
])
def test_silence(silent_for: float, in_call: bool, holds: bool, verdict: Silence) -> None:
    assert timers.silence(silent_for, in_call=in_call, holds_leases=holds,
                          settings=SETTINGS) is verdict


def test_sessions_need_a_look_only_once_silent_for_the_shorter_limit() -> None:
    assert timers.shortest_silence(SETTINGS) == 10
    assert timers.shortest_silence(SchedulerConfig(keepalive=5)) == 5
    assert "silent for more than 10s" in timers.abandoned_reason("b", SETTINGS)


def test_a_job_may_run_its_timeout_and_the_grace() -> None:
    assert timers.effective_timeout(0, SETTINGS) == 3600
    assert timers.effective_timeout(5, SETTINGS) == 5
    assert timers.run_limit(5, SETTINGS) == 35
    assert timers.run_limit(0, SETTINGS) == 3630


def test_a_bot_running_leases_is_held_only_briefly() -> None:
    assert timers.poll_wait(48, holds_leases=False, settings=SETTINGS) == 48
    assert timers.poll_wait(48, holds_leases=True, settings=SETTINGS) == 1
    assert timers.poll_wait(0.3, holds_leases=True, settings=SETTINGS) == 0.3


def test_unmatched_requirements_and_their_deadline() -> None:
    linux = frozenset({("OSFamily", "linux")})
    big = linux | {("pool", "big")}
    windows = frozenset({("OSFamily", "windows")})
    assert timers.unmatched_groups([linux, big, windows], [linux]) == {big, windows}
    assert timers.unmatched_groups([linux], []) == {linux}
    assert timers.unmatched_groups([frozenset()], [linux]) == set()
    # Counted from when no bot matched, or from the queueing when that came later.
    assert not timers.unmatched_expired(since=1000, queued_at=0, now=1300, settings=SETTINGS)
    assert timers.unmatched_expired(since=1000, queued_at=0, now=1300.1, settings=SETTINGS)
    assert not timers.unmatched_expired(since=1000, queued_at=1200, now=1400,
                                        settings=SETTINGS)


def test_retention_and_the_end_of_an_operation() -> None:
    assert timers.retention_cutoff(10_000, SETTINGS) == 6400
    assert timers.operation_ended(created_at=5, own_end=True, job_completed_at=None) == 5
    assert timers.operation_ended(created_at=5, own_end=False, job_completed_at=9) == 9
    assert timers.operation_ended(created_at=5, own_end=False, job_completed_at=None) is None


def test_a_success_answers_identical_submissions_for_a_moment() -> None:
    assert timers.answers_resubmission(100, 100 + timers.JUST_FINISHED,
                                       skip_cache_lookup=False)
    assert not timers.answers_resubmission(100, 100.1 + timers.JUST_FINISHED,
                                           skip_cache_lookup=False)
    assert not timers.answers_resubmission(100, 100, skip_cache_lookup=True)


def test_lease_timeout_must_exceed_the_busy_poll() -> None:
    with pytest.raises(ValueError, match="lease-timeout .* must be longer than busy-poll"):
        SchedulerConfig(lease_timeout=1, busy_poll=1)
