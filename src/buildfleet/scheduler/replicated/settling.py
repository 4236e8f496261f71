"""Settling a bot's completed leases before the update's transaction (see
`buildfleet.scheduler.results`): which leases the session holds, and the facts of
their jobs.  The leases this replica last answered to a session are remembered, so
that a report sent back here needs no read; any other is read from the database
without locks.  A session's leases are forgotten when it is notified (a lease of it
was cancelled, timed out or requeued elsewhere, or it closed), and replaced by
every answer; a lease ending on another replica an instant before its report
arrives here is settled as in the embedded strategy when it ends while its result
is being stored: the outcome is dropped, the real result stays cached.
"""

from __future__ import annotations

from collections import OrderedDict

from buildfleet.config import SchedulerConfig
from buildfleet.postgres import Database
from buildfleet.scheduler.model import BotStatus, LeaseState, ReportedLease
from buildfleet.scheduler.replicated import bots
from buildfleet.scheduler.replicated.sql import EXECUTING, LIVE_LEASE, digest_of, row_lease_id
from buildfleet.scheduler.replicated.transactions import Effects, Tx
from buildfleet.scheduler.results import LeasedJob, settle
from buildfleet.scheduler.rules import ownership, reports
from buildfleet.scheduler.rules.outcomes import Completion, Requeue
from buildfleet.scheduler.rules.ownership import Caller
from buildfleet.storage.action_cache import ActionCache

MEMORY = 100_000  # answered leases remembered


class Settler:
    """Settles the completions reported to one instance's scheduler on this replica."""

    def __init__(self, database: Database, instance: str, settings: SchedulerConfig,
                 action_cache: ActionCache | None) -> None:
        self.database = database
        self.instance = instance
        self.settings = settings
        self.action_cache = action_cache
        # lease id -> (session, its bot, its owner, the job's facts), least recently
        # answered first.
        self._delivered: OrderedDict[str, tuple[str, str, str, LeasedJob]] = OrderedDict()
        self._by_session: dict[str, set[str]] = {}  # session -> its remembered leases

    def remember(self, outcome: bots.Outcome) -> None:
        """The leases just answered to a session are what it holds now."""
        session = outcome.session
        self.forget(session.name)
        if outcome.closed or not outcome.leased:
            return
        self._by_session[session.name] = set(outcome.leased)
        for lease_id, job in outcome.leased.items():
            self._delivered[lease_id] = (session.name, session.bot_id, session.owner, job)
            self._delivered.move_to_end(lease_id)
        while len(self._delivered) > MEMORY:
            self._drop(next(iter(self._delivered)))

    def forget(self, session: str) -> None:
        for lease_id in self._by_session.pop(session, ()):
            self._delivered.pop(lease_id, None)

    def _drop(self, lease_id: str) -> None:
        entry = self._delivered.pop(lease_id, None)
        if entry is not None:
            leases = self._by_session.get(entry[0])
            if leases is not None:
                leases.discard(lease_id)

    async def settle(self, name: str, bot_id: str, status: BotStatus,
                     leases: list[ReportedLease], caller: Caller | None = None
                     ) -> dict[str, Completion | Requeue]:
        """The outcomes of the held leases reported COMPLETED, their blobs stored, before
        the update's transaction (see buildfleet.scheduler.results).  The leases this
        replica answered are known; others are read, without locks."""
        completed = [report for report in leases if report.state == LeaseState.COMPLETED]
        if not completed:
            return {}
        held = self._answered(name, status, completed)
        if held is None:
            held = await self._read_held(name, status)
            if held is None:
                return {}  # the update's transaction says why the session is unknown
        bot, owner, terminating, jobs_held = held
        ownership.check_session(name, owner, caller)  # before anything reaches the cache
        reports.check_owner(name, bot, bot_id)
        settled: dict[str, Completion | Requeue] = {}
        for report in completed:
            job = jobs_held.get(report.id)
            if job is not None:
                settled[report.id] = await settle(
                    report, job, bot_id=bot, terminating=terminating,
                    action_cache=self.action_cache, settings=self.settings)
                self._drop(report.id)
        return settled

    def _answered(self, name: str, status: BotStatus, completed: list[ReportedLease]
                  ) -> tuple[str, str, bool, dict[str, LeasedJob]] | None:
        """(bot, owner, terminating, jobs) of reported leases all answered here to this
        session; None when one was not, or the session's status is needed."""
        if status == BotStatus.UNSPECIFIED:
            return None  # whether the bot is terminating depends on the stored status
        bot = owner = ""
        jobs_held: dict[str, LeasedJob] = {}
        for report in completed:
            entry = self._delivered.get(report.id)
            if entry is None or entry[0] != name:
                return None
            bot, owner, jobs_held[report.id] = entry[1], entry[2], entry[3]
        return bot, owner, status == BotStatus.BOT_TERMINATING, jobs_held

    async def _read_held(self, name: str, status: BotStatus
                         ) -> tuple[str, str, bool, dict[str, LeasedJob]] | None:
        async with self.database.connection() as conn:
            rows = await Tx(conn, Effects(), self.instance, self.settings).rows(
                f"""SELECT s.bot_id, s.owner, s.status, j.id, j.instance, j.attempts,
                           j.queued_at, j.cacheable, j.action_hash, j.action_size
                    FROM grid_sessions s LEFT JOIN grid_jobs j ON j.lease_session = s.name
                         AND j.stage = {EXECUTING} AND j.{LIVE_LEASE}
                    WHERE s.name = %s AND s.instance = %s""", (name, self.instance))
        if not rows:
            return None
        terminating = reports.status_after(BotStatus(rows[0]["status"]),
                                           status) == BotStatus.BOT_TERMINATING
        return rows[0]["bot_id"], rows[0]["owner"], terminating, {
            row_lease_id(row): LeasedJob(digest_of(row), row["queued_at"], row["cacheable"])
            for row in rows if row["id"] is not None}
