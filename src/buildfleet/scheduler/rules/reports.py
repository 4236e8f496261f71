"""A bot's report of its leases: what it may say, and what it means.

A bot sends every lease it holds in each UpdateBotSession.  A report is checked
as a whole before anything is applied (`check_reports`): one bad lease refuses
the update and changes nothing.  `reconcile` then compares the report with what
the scheduler knows the session holds and says what to do with each lease.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from buildfleet.errors import InvalidArgument
from buildfleet.scheduler.model import BotStatus, LeaseState, ReportedLease

# States a bot may report a lease in.
REPORTABLE = frozenset({LeaseState.PENDING, LeaseState.ACTIVE, LeaseState.COMPLETED,
                        LeaseState.CANCELLED})


class HeldLease(Protocol):
    """What `reconcile` needs to know of a lease the session holds."""

    @property
    def state(self) -> LeaseState: ...

    @property
    def delivered(self) -> bool: ...  # a response has carried it to the bot


def check_owner(session: str, owner: str, claimed: str) -> None:
    """InvalidArgument when a bot names a bot id that is not the session's."""
    if claimed and claimed != owner:
        raise InvalidArgument(f"bot session {session!r} belongs to bot {owner!r}, "
                              f"not {claimed!r}")


def reregister(session: str, reason: str | None) -> InvalidArgument:
    """The answer to an update of a session that is closed (with `reason`) or unknown:
    bots treat INVALID_ARGUMENT as "create a new session"."""
    if reason is not None:
        return InvalidArgument(f"bot session {session!r} was closed ({reason}); "
                               "create a new session")
    return InvalidArgument(f"bot session {session!r} does not exist; create a new session")


def status_after(current: BotStatus, reported: BotStatus) -> BotStatus:
    """The session's status once a report is applied: UNSPECIFIED keeps the current one."""
    return current if reported == BotStatus.UNSPECIFIED else reported


def check_reports(reported: Sequence[ReportedLease],
                  held: Mapping[str, HeldLease] | None = None) -> None:
    """InvalidArgument for a lease reported twice, in a state a bot may not report, or
    (when `held` is known) going back from ACTIVE to PENDING."""
    seen: set[str] = set()
    for report in reported:
        if report.id in seen:
            raise InvalidArgument(f"lease {report.id!r} appears twice in the bot session")
        seen.add(report.id)
        if report.state not in REPORTABLE:
            raise InvalidArgument(f"lease {report.id!r} has invalid state {report.state}")
        if held is None or report.state != LeaseState.PENDING:
            continue
        lease = held.get(report.id)
        if lease is not None and lease.state == LeaseState.ACTIVE:
            raise InvalidArgument(f"lease {report.id!r} cannot go back from ACTIVE to PENDING")


@dataclass
class Reconciliation:
    """What a report means for the session's leases."""

    completed: list[ReportedLease] = field(default_factory=list)  # held, now finished
    given_back: list[str] = field(default_factory=list)  # held, the bot returned them
    started: list[str] = field(default_factory=list)  # held PENDING, the bot runs them
    # Cancelled leases the bot reported ended: they need not be told again.
    acknowledged: list[str] = field(default_factory=list)
    changed: bool = False  # the bot must be answered now rather than long-polled


def reconcile(reported: Sequence[ReportedLease], held: Mapping[str, HeldLease],
              notices: Collection[str]) -> Reconciliation:
    """Compare a (checked) report with the leases the session holds (`held`) and the
    cancelled ones it has not been told of yet (`notices`).

    A lease the session does not hold (finished, cancelled, requeued after the bot
    went silent, or never its own) is dropped: leaving it out of the answer tells
    the bot to drop it.  A cancelled lease the bot still runs stays a notice, to be
    answered CANCELLED.  A lease the bot was told of but no longer mentions (it lost
    an answer) is sent again.
    """
    outcome = Reconciliation()
    for report in reported:
        lease = held.get(report.id)
        if lease is None:
            if report.state in (LeaseState.COMPLETED, LeaseState.CANCELLED) \
                    and report.id in notices:
                outcome.acknowledged.append(report.id)
            outcome.changed = True
        elif report.state == LeaseState.COMPLETED:
            outcome.completed.append(report)
            outcome.changed = True
        elif report.state == LeaseState.CANCELLED:
            outcome.given_back.append(report.id)
            outcome.changed = True
        elif report.state == LeaseState.ACTIVE and lease.state == LeaseState.PENDING:
            outcome.started.append(report.id)
            outcome.changed = True
    if not outcome.changed and len(reported) < len(held):
        known = {report.id for report in reported}
        outcome.changed = any(lease.delivered and lease_id not in known
                              for lease_id, lease in held.items())
    return outcome
