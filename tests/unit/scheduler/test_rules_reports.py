"""rules.reports: what a bot may report of its leases, and what a report means."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from schedkit import active, completed

from buildfleet.errors import InvalidArgument
from buildfleet.scheduler.model import BotStatus, LeaseState, ReportedLease
from buildfleet.scheduler.rules import reports


@dataclass
class Held:
    state: LeaseState
    delivered: bool = True


def test_a_lease_reported_twice_or_in_an_unknown_state_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="'a' appears twice"):
        reports.check_reports([active("a"), completed("a")])
    for state in (LeaseState.UNSPECIFIED, 3, 99):
        with pytest.raises(InvalidArgument, match="invalid state"):
            reports.check_reports([ReportedLease(id="a", state=state)])
    reports.check_reports([ReportedLease(id="a", state=s) for s in reports.REPORTABLE][:1])


def test_a_lease_cannot_go_back_from_active_to_pending() -> None:
    pending = [ReportedLease(id="a", state=LeaseState.PENDING)]
    reports.check_reports(pending)  # without knowing what is held: only the shape
    reports.check_reports(pending, {"a": Held(LeaseState.PENDING)})
    with pytest.raises(InvalidArgument, match="from ACTIVE to PENDING"):
        reports.check_reports(pending, {"a": Held(LeaseState.ACTIVE)})


def test_a_bot_may_only_name_its_own_bot_id() -> None:
    reports.check_owner("s", "bot-1", "bot-1")
    reports.check_owner("s", "bot-1", "")  # bots may leave it out
    with pytest.raises(InvalidArgument, match="belongs to bot 'bot-1', not 'bot-2'"):
        reports.check_owner("s", "bot-1", "bot-2")


def test_reregister_names_the_reason_of_a_closed_session() -> None:
    assert "was closed (keepalive)" in reports.reregister("s", "keepalive").message
    assert "does not exist" in reports.reregister("s", None).message


def test_an_unset_status_keeps_the_current_one() -> None:
    assert reports.status_after(BotStatus.BOT_TERMINATING,
                                BotStatus.UNSPECIFIED) == BotStatus.BOT_TERMINATING
    assert reports.status_after(BotStatus.OK, BotStatus.UNHEALTHY) == BotStatus.UNHEALTHY


def test_reconcile_sorts_each_reported_lease() -> None:
    held = {"done": Held(LeaseState.ACTIVE), "back": Held(LeaseState.ACTIVE),
            "start": Held(LeaseState.PENDING), "run": Held(LeaseState.ACTIVE)}
    report = [completed("done"), ReportedLease(id="back", state=LeaseState.CANCELLED),
              active("start"), active("run")]
    outcome = reports.reconcile(report, held, notices=set())
    assert [r.id for r in outcome.completed] == ["done"]
    assert outcome.given_back == ["back"] and outcome.started == ["start"]
    assert outcome.acknowledged == [] and outcome.changed


def test_a_lease_running_as_told_changes_nothing() -> None:
    outcome = reports.reconcile([active("run")], {"run": Held(LeaseState.ACTIVE)}, set())
    assert not outcome.changed and not outcome.completed and not outcome.started


def test_leases_the_session_does_not_hold_are_dropped() -> None:
    # Finished, cancelled, requeued after the bot went silent, or never its own.
    outcome = reports.reconcile([completed("gone"), active("stranger")], {}, set())
    assert outcome.changed and not outcome.completed and not outcome.acknowledged


def test_a_cancelled_lease_is_told_until_the_bot_says_it_ended() -> None:
    still_running = reports.reconcile([active("cancelled")], {}, {"cancelled"})
    assert still_running.changed and still_running.acknowledged == []
    for state in (LeaseState.COMPLETED, LeaseState.CANCELLED):
        ended = reports.reconcile([ReportedLease(id="cancelled", state=state)], {},
                                  {"cancelled"})
        assert ended.acknowledged == ["cancelled"]


def test_a_delivered_lease_the_bot_forgot_is_sent_again() -> None:
    # The bot lost an answer: it does not mention a lease it was told of.
    lost = reports.reconcile([], {"new": Held(LeaseState.ACTIVE, delivered=True)}, set())
    assert lost.changed
    # A lease not yet delivered is no reason to answer early.
    fresh = reports.reconcile([], {"new": Held(LeaseState.ACTIVE, delivered=False)}, set())
    assert not fresh.changed
