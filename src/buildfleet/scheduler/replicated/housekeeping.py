"""Housekeeping passes of the replicated strategy, each one transaction body.

Every replica runs them once per tick.  Each pass claims the rows it handles
with ``FOR UPDATE SKIP LOCKED`` (or is idempotent), so that a session expired by
one replica is never expired twice, and asks `rules.timers` what to do with
each: SQL only narrows the candidates cheaply (an index on a time column).
"""

from __future__ import annotations

from buildfleet.scheduler.replicated import jobs
from buildfleet.scheduler.replicated.sql import (
    COMPLETED,
    EXECUTING,
    JOB_COLUMNS,
    LIVE_LEASE,
    NOW,
    QUEUED,
    TERMINATING,
    properties_from,
    properties_json,
)
from buildfleet.scheduler.replicated.transactions import Tx
from buildfleet.scheduler.rules import outcomes, timers
from buildfleet.scheduler.rules.observations import Outcome
from buildfleet.scheduler.rules.timers import JUST_FINISHED, Silence

BATCH = 100  # rows one pass handles at most


async def expire_silent(tx: Tx, open_here: list[str]) -> None:
    """Sessions silent for too long: close them (keepalive) or requeue their leases
    (lease timeout).  Sessions in a call on this replica are not silent; those in a
    call on another one are kept seen by that replica.  The candidates are those
    silent beyond the shorter limit that hold leases or are past the keepalive
    (a silent session holding nothing waits for the keepalive untouched)."""
    holds = (f"EXISTS (SELECT 1 FROM grid_jobs j WHERE j.lease_session = s.name "
             f"AND j.stage = {EXECUTING} AND j.{LIVE_LEASE})")
    sessions = await tx.rows(
        f"""SELECT s.*, {NOW} - s.last_seen AS silent_for, {holds} AS holds
            FROM grid_sessions s
            WHERE s.instance = %(instance)s AND s.last_seen < {NOW} - %(shortest)s
              AND NOT s.name = ANY(%(open)s::text[])
              AND (s.last_seen < {NOW} - %(keepalive)s OR {holds})
            ORDER BY s.last_seen LIMIT {BATCH} FOR UPDATE OF s SKIP LOCKED""",
        {"instance": tx.instance, "shortest": timers.shortest_silence(tx.settings),
         "open": open_here, "keepalive": tx.settings.keepalive})
    for session in sessions:
        verdict = timers.silence(session["silent_for"], in_call=False,
                                 holds_leases=session["holds"], settings=tx.settings)
        if verdict is Silence.EXPIRED:
            tx.effects.stats["expired_sessions"] += 1
            await jobs.close_session(tx, session, "no update within the keepalive window",
                                     count_attempt=True)
        elif verdict is Silence.LEASES_ABANDONED:
            await jobs.abandon_leases(tx, session)


async def end_overdue(tx: Tx) -> None:
    """Jobs running past their deadline end with DEADLINE_EXCEEDED; the bot is told."""
    for row in await tx.rows(
            f"""SELECT {JOB_COLUMNS} FROM grid_jobs j
                WHERE j.instance = %s AND j.stage = {EXECUTING} AND j.deadline < {NOW}
                LIMIT {BATCH} FOR UPDATE SKIP LOCKED""", (tx.instance,)):
        await jobs.complete(tx, row, outcomes.timed_out(
            timers.effective_timeout(row["timeout"], tx.settings)), cancel_lease=True,
            outcome=Outcome.TIMEOUT)


async def queued_requirements(tx: Tx) -> list[str]:
    """The distinct requirement sets of the queued jobs (as stored)."""
    rows = await tx.rows(
        f"SELECT DISTINCT requirements::text AS r FROM grid_jobs "
        f"WHERE instance = %s AND stage = {QUEUED}", (tx.instance,))
    return [row["r"] for row in rows]


async def fail_unmatched(tx: Tx) -> None:
    """Queued jobs no live bot could run: noted when that starts, failed once it has
    lasted the unmatched timeout (`rules.timers`)."""
    groups = {text: properties_from(text) for text in await queued_requirements(tx)}
    if not groups:
        return
    live = [properties_from(row["properties"]) for row in await tx.rows(
        f"""SELECT DISTINCT properties FROM grid_sessions
            WHERE instance = %s AND last_seen > {NOW} - %s AND status <> {TERMINATING}""",
        (tx.instance, tx.settings.keepalive))]
    unmatched = timers.unmatched_groups(groups.values(), live)
    matched = [properties_json(p) for p in groups.values() if p not in unmatched]
    if matched:
        await tx.execute(
            f"""UPDATE grid_jobs SET unmatched_since = NULL
                WHERE instance = %s AND stage = {QUEUED} AND unmatched_since IS NOT NULL
                  AND requirements = ANY(%s::jsonb[])""", (tx.instance, matched))
    if not unmatched:
        return
    lacking = [properties_json(p) for p in unmatched]
    await tx.execute(
        f"""UPDATE grid_jobs SET unmatched_since = {NOW}
            WHERE instance = %s AND stage = {QUEUED} AND unmatched_since IS NULL
              AND requirements = ANY(%s::jsonb[])""", (tx.instance, lacking))
    offered = frozenset().union(*live)
    for row in await tx.rows(
            f"""SELECT {JOB_COLUMNS}, j.unmatched_since, {NOW} AS now FROM grid_jobs j
                WHERE j.instance = %s AND j.stage = {QUEUED}
                  AND j.requirements = ANY(%s::jsonb[])
                LIMIT {BATCH * 10} FOR UPDATE SKIP LOCKED""", (tx.instance, lacking)):
        since = row["unmatched_since"]
        if since is not None and timers.unmatched_expired(
                since=since, queued_at=row["queued_at"], now=row["now"], settings=tx.settings):
            await jobs.complete(tx, row, outcomes.unmatched(
                properties_from(row["requirements"]), offered,
                tx.settings.unmatched_timeout), outcome=Outcome.UNMATCHED)


async def forget_old(tx: Tx) -> None:
    """Succeeded jobs stop answering resubmissions; old operations, jobs and closed
    sessions go, and the events of sessions that are gone."""
    retention = tx.settings.completed_retention
    await tx.execute(
        f"""UPDATE grid_jobs SET dedup = false
            WHERE instance = %s AND dedup AND completed_at < {NOW} - %s""",
        (tx.instance, JUST_FINISHED))
    # An operation ended on its own (cancelled) counts from its creation, any other
    # from its job's completion (rules.timers.operation_ended).
    await tx.execute(
        f"""DELETE FROM grid_operations o USING grid_jobs j
            WHERE o.instance = %s AND j.id = o.job_id AND (
                (o.own_response IS NOT NULL AND o.created_at < {NOW} - %s)
                OR (o.own_response IS NULL AND j.stage = {COMPLETED}
                    AND j.completed_at < {NOW} - %s))""",
        (tx.instance, retention, retention))
    await tx.execute(
        f"""DELETE FROM grid_jobs j WHERE j.instance = %s AND j.stage = {COMPLETED}
              AND j.completed_at < {NOW} - %s AND j.lease_session IS NULL
              AND NOT EXISTS (SELECT 1 FROM grid_operations o WHERE o.job_id = j.id)""",
        (tx.instance, retention))
    await tx.execute(
        f"DELETE FROM grid_closed_sessions WHERE instance = %s AND closed_at < {NOW} - %s",
        (tx.instance, max(retention, tx.settings.keepalive)))
    await tx.execute(
        """DELETE FROM grid_bot_events e WHERE NOT EXISTS
               (SELECT 1 FROM grid_sessions s WHERE s.name = e.session)""")
