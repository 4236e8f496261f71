"""The replicated strategy's changes to jobs and sessions: the core's decisions
(`buildfleet.scheduler.rules`) applied as UPDATEs on locked rows.

Lock order: a bot session's transactions lock its session row first, then its
jobs; any other transaction locks jobs only (a cancelled or timed-out lease is
marked on the job row, not on the session).  That order rules out deadlocks
between the two; the rare one PostgreSQL still reports is retried.
"""

from __future__ import annotations

import json
import logging

from buildfleet.scheduler.model import Stage
from buildfleet.scheduler.replicated.notes import JobNews
from buildfleet.scheduler.replicated.sql import (
    CANCELLED,
    COMPLETED,
    EXECUTING,
    JOB_COLUMNS,
    LIVE_LEASE,
    NOW,
    QUEUED,
    Row,
    digest_of,
)
from buildfleet.scheduler.replicated.transactions import Tx
from buildfleet.scheduler.rules import outcomes, timers
from buildfleet.scheduler.rules.matching import retry_delay
from buildfleet.scheduler.rules.observations import Outcome
from buildfleet.scheduler.rules.outcomes import Completion, Requeue


async def complete(tx: Tx, row: Row, response: bytes, *, outcome: Outcome,
                   cancel_lease: bool = False, worker: str | None = None,
                   succeeded: bool = False) -> None:
    """Finish a locked job.  With `cancel_lease`, a bot still running it is told
    CANCELLED (the lease stays on the row, marked, until the bot has been told).
    A job that succeeded keeps its action's place in the unique index for a moment
    (`dedup`), so that a submission racing the completion joins it."""
    tx.effects.observations.ended(outcome, response)
    note = tx.announcing(row["id"], JobNews(Stage.COMPLETED, worker or row["worker"], response))
    announce = " RETURNING pg_notify(%s, %s)" if note else ""
    if cancel_lease and row["stage"] == EXECUTING and row["lease_session"] is not None:
        await tx.execute(
            f"""UPDATE grid_jobs SET stage = {COMPLETED}, response = %s, completed_at = {NOW},
                    lease_state = {CANCELLED}, deadline = NULL
                WHERE id = %s""" + announce, (response, row["id"], *(note or ())))
        tx.effects.sessions.add(row["lease_session"])
    else:
        await tx.execute(
            f"""UPDATE grid_jobs SET stage = {COMPLETED}, response = %s, completed_at = {NOW},
                    lease_session = NULL, lease_state = NULL, deadline = NULL,
                    worker = COALESCE(%s, worker), succeeded = %s, dedup = %s AND cacheable
                WHERE id = %s""" + announce,
            (response, worker, succeeded, succeeded, row["id"], *(note or ())))
    if row["stage"] == QUEUED:
        tx.effects.queued -= 1


async def finish(tx: Tx, row: Row, outcome: Completion | Requeue) -> None:
    """Apply the settled outcome of a held lease the bot reported COMPLETED."""
    if isinstance(outcome, Requeue):
        await requeue(tx, row, outcome)
        return
    await complete(tx, row, outcome.response, worker=outcome.worker,
                   succeeded=outcome.succeeded, outcome=outcome.outcome)
    tx.effects.stats["completed"] += 1


async def requeue(tx: Tx, row: Row, decision: Requeue) -> None:
    """Take a locked job's lease back and queue it again (or fail it when out of
    attempts)."""
    failed_on = list(row["failed_on"])
    if decision.failed_by and decision.failed_by not in failed_on:
        failed_on.append(decision.failed_by)
    after = outcomes.requeued(decision, attempts=row["attempts"],
                              last_failure=row["last_failure"],
                              max_attempts=tx.settings.max_attempts)
    if decision.count_attempt:
        tx.effects.stats["retried"] += 1
    tx.effects.observations.requeues[decision.cause] += 1
    if after.final is not None:
        await tx.execute("UPDATE grid_jobs SET attempts = %s, last_failure = %s, "
                         "failed_on = %s::jsonb WHERE id = %s",
                         (after.attempts, after.last_failure, json.dumps(failed_on), row["id"]))
        await complete(tx, row, after.final, outcome=Outcome.FAILED)
        return
    delay = retry_delay(after.attempts, tx.settings) if decision.failed_by else None
    await tx.execute(
        f"""UPDATE grid_jobs SET stage = {QUEUED}, lease_session = NULL, lease_state = NULL,
               lease_delivered = false, deadline = NULL, attempts = %s, last_failure = %s,
               failed_on = %s::jsonb,
               retry_at = CASE WHEN %s::float8 IS NULL THEN retry_at ELSE {NOW} + %s END
           WHERE id = %s""",
        (after.attempts, after.last_failure, json.dumps(failed_on), delay, delay, row["id"]))
    tx.effects.log(logging.INFO, "requeueing %s: %s", digest_of(row), decision.reason)
    tx.effects.job(row["id"], JobNews(Stage.QUEUED, row["worker"]))
    tx.effects.work.add(json.dumps(row["requirements"], sort_keys=True))
    tx.effects.queued += 1


async def held_jobs(tx: Tx, session: str) -> list[Row]:
    """The session's running jobs, locked."""
    return await tx.rows(
        f"SELECT {JOB_COLUMNS} FROM grid_jobs j WHERE j.lease_session = %s "
        f"AND j.stage = {EXECUTING} AND j.{LIVE_LEASE} FOR UPDATE", (session,))


async def abandon_leases(tx: Tx, session: Row) -> None:
    """The bot of a locked session went silent holding leases: requeue them."""
    decision = Requeue(timers.abandoned_reason(session["bot_id"], tx.settings),
                       failed_by=session["bot_id"], cause="lease_timeout")
    for row in await held_jobs(tx, session["name"]):
        tx.effects.stats["abandoned_leases"] += 1
        await requeue(tx, row, decision)
    tx.effects.sessions.add(session["name"])  # its leases changed: replicas look again


async def close_session(tx: Tx, session: Row, reason: str, *, count_attempt: bool) -> None:
    """Close a locked session: its running leases go back to the queue."""
    name = session["name"]
    decision = Requeue(f"bot {session['bot_id']}: {reason}", count_attempt=count_attempt,
                       cause="session_closed")
    for row in await held_jobs(tx, name):
        await requeue(tx, row, decision)
    await tx.execute("UPDATE grid_jobs SET lease_session = NULL WHERE lease_session = %s",
                     (name,))
    await tx.execute("DELETE FROM grid_sessions WHERE name = %s", (name,))
    await tx.execute(
        f"""INSERT INTO grid_closed_sessions (name, instance, reason, closed_at)
            VALUES (%s, %s, %s, {NOW}) ON CONFLICT (name) DO NOTHING""",
        (name, tx.instance, reason))
    tx.effects.sessions.add(name)
    tx.effects.closed.add(name)
    tx.effects.log(logging.INFO, "closed bot session %s of %s: %s", name, session["bot_id"],
                   reason)


async def closed_reason(tx: Tx, name: str) -> str | None:
    reason = await tx.value("SELECT reason FROM grid_closed_sessions WHERE name = %s", (name,))
    return None if reason is None else str(reason)
