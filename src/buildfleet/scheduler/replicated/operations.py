"""Clients' calls in the replicated strategy: submissions, cache hits, cancellation.

A new job is queued by one statement that also records the operation and
announces the work (no transaction block: one round trip).  A cacheable action
in flight already holds its place in a unique index, whichever replica queued
it; a submission that meets it joins it in a transaction instead (`join`).  A
job that succeeded keeps that place for a moment (`dedup`, cleared by
housekeeping), so that a submission racing its completion finds it and asks
`rules.timers.answers_resubmission` whether it answers.
"""

from __future__ import annotations

from typing import Any

from buildfleet.digest import Digest
from buildfleet.scheduler.model import Operation, Stage
from buildfleet.scheduler.replicated import jobs
from buildfleet.scheduler.replicated.sql import COMPLETED, JOB_COLUMNS, NOW, QUEUED, Row
from buildfleet.scheduler.replicated.transactions import Retry, Tx
from buildfleet.scheduler.rules import outcomes, ownership, submissions, timers
from buildfleet.scheduler.rules.observations import Outcome
from buildfleet.scheduler.rules.ownership import Caller

_INSERT_JOB = f"""
    INSERT INTO grid_jobs (id, instance, action_hash, action_size, action, requirements,
                           priority, cacheable, timeout, run_limit, queued_at, stage, builds)
    VALUES (%(id)s, %(instance)s, %(hash)s, %(size)s, %(action)s, %(requirements)s::jsonb,
            %(priority)s, %(cacheable)s, %(timeout)s, %(run_limit)s, {NOW}, {QUEUED},
            ARRAY[%(build)s]::text[])"""
# A cacheable job yields to one of the same action that holds the unique index.
_INSERT_CACHEABLE = _INSERT_JOB + f"""
    ON CONFLICT (instance, action_hash, action_size)
        WHERE cacheable AND (stage <> {COMPLETED} OR dedup)
    DO NOTHING"""
_WITH_OPERATION = f""",
    operation AS (
        INSERT INTO grid_operations (name, instance, job_id, created_at, owner,
                                     request_metadata)
        SELECT %(operation)s, %(instance)s, id, {NOW}, %(owner)s, %(request_metadata)s
        FROM inserted),
    announced AS (
        SELECT pg_notify(%(channel)s, %(payload)s) FROM inserted)
    SELECT (SELECT id FROM inserted), (SELECT count(*) FROM announced)"""
# The whole of a new submission in one statement; returns (inserted id or NULL,
# notifications sent).  Nothing is written when the action is in flight already.
SUBMIT_AT_ONCE = {
    cacheable: f"WITH inserted AS ({insert} RETURNING id)" + _WITH_OPERATION
    for cacheable, insert in ((True, _INSERT_CACHEABLE), (False, _INSERT_JOB))}
_INSERT_OPERATION = f"""
    INSERT INTO grid_operations (name, instance, job_id, created_at, owner, request_metadata)
    VALUES (%s, %s, %s, {NOW}, %s, %s)"""
CACHE_HIT = f"""
    WITH job AS (
        INSERT INTO grid_jobs (id, instance, action_hash, action_size, action, requirements,
                               priority, cacheable, timeout, queued_at, stage, response,
                               completed_at)
        VALUES (%(id)s, %(instance)s, %(hash)s, %(size)s, ''::bytea, '{{}}'::jsonb, 0, true,
                0, {NOW}, {COMPLETED}, %(response)s, {NOW})
        RETURNING id)
    INSERT INTO grid_operations (name, instance, job_id, created_at, owner, request_metadata)
    SELECT %(operation)s, %(instance)s, id, {NOW}, %(owner)s, %(request_metadata)s FROM job"""


# A deduplicated submission: its build waits for the job too.
_JOIN_BUILD = """
    UPDATE grid_jobs SET builds = array_append(builds, %s)
    WHERE id = %s AND NOT (%s = ANY(builds))"""


def joined_view(name: str, row: Row, *, created_at: float, owner: str,
                request_metadata: bytes = b"") -> Operation:
    """A new operation `name` (of `owner`) on the existing job `row`."""
    done = row["stage"] == COMPLETED
    return Operation(
        name=name, instance=row["instance"], job_id=row["id"],
        action_digest=Digest(row["action_hash"], row["action_size"]), stage=Stage(row["stage"]),
        response=bytes(row["response"]) if done else None, queued_at=row["queued_at"],
        created_at=created_at, worker=row["worker"], attempts=row["attempts"], owner=owner,
        priority=row["priority"], request_metadata=request_metadata)


async def join(tx: Tx, digest: Digest, priority: int, skip_cache_lookup: bool) -> Row | None:
    """The cacheable job holding `digest`'s place in the unique index, locked, when it
    answers this submission: unfinished (its priority raised when the newcomer's is
    more urgent), or succeeded a moment ago.  A succeeded job that does not answer
    gives its place up.  None when there is no job to join."""
    row = await tx.row(
        f"""SELECT {JOB_COLUMNS}, {NOW} AS now FROM grid_jobs j
            WHERE j.instance = %s AND j.action_hash = %s AND j.action_size = %s
              AND j.cacheable AND (j.stage <> {COMPLETED} OR j.dedup) FOR UPDATE""",
        (tx.instance, digest.hash, digest.size_bytes))
    if row is None:
        return None
    if row["stage"] == COMPLETED:
        if timers.answers_resubmission(row["completed_at"], row["now"],
                                       skip_cache_lookup=skip_cache_lookup):
            return row
        await tx.execute("UPDATE grid_jobs SET dedup = false WHERE id = %s", (row["id"],))
        return None
    raised = submissions.joined_priority(row["priority"], priority)
    if raised != row["priority"]:
        await tx.execute("UPDATE grid_jobs SET priority = %s WHERE id = %s", (raised, row["id"]))
        row["priority"] = raised
    return row


async def submit(tx: Tx, job: dict[str, Any], *, name: str, skip_cache_lookup: bool,
                 queued: int) -> Row | None:
    """Join the action's job (returned) or queue a new one (None; `job` holds its
    parameters), and record the operation `name`.  `queued`: the instance's queue
    length as last counted."""
    digest = Digest(job["hash"], job["size"])
    if job["cacheable"]:
        joined = await join(tx, digest, job["priority"], skip_cache_lookup)
        if joined is not None:
            tx.effects.observations.deduplicated += 1
            await tx.execute(_JOIN_BUILD, (job["build"], joined["id"], job["build"]))
            await tx.execute(_INSERT_OPERATION, (name, tx.instance, joined["id"], job["owner"],
                                                 job["request_metadata"]))
            return joined
    submissions.check_room(tx.instance, queued, tx.settings.max_queued)
    inserted = await tx.value((_INSERT_CACHEABLE if job["cacheable"] else _INSERT_JOB)
                              + " RETURNING id", job)
    if inserted is None:
        raise Retry("the identical action was queued meanwhile")
    await tx.execute(_INSERT_OPERATION, (name, tx.instance, job["id"], job["owner"],
                                         job["request_metadata"]))
    tx.effects.work.add(job["requirements"])
    tx.effects.queued += 1
    return None


async def cancel(tx: Tx, name: str, caller: Caller | None) -> None:
    """Cancel one operation; its job stops when no operation still wants it."""
    row = await tx.row(
        f"""SELECT o.own_response AS op_own_response, o.owner AS op_owner, {JOB_COLUMNS}
            FROM grid_operations o JOIN grid_jobs j ON j.id = o.job_id
            WHERE o.name = %s AND o.instance = %s FOR UPDATE""", (name, tx.instance))
    if row is None:
        raise ownership.no_such_operation(name)
    ownership.check_operation(name, row["op_owner"], caller)
    if row["op_own_response"] is not None or row["stage"] == COMPLETED:
        return
    await tx.execute(
        "UPDATE grid_operations SET cancelled = true, own_response = %s WHERE name = %s",
        (outcomes.operation_cancelled(), name))
    tx.effects.job(row["id"])  # this operation ended on its own: its watchers read it
    wanted = await tx.value(
        "SELECT 1 FROM grid_operations WHERE job_id = %s AND NOT cancelled LIMIT 1",
        (row["id"],))
    if wanted is None:
        await jobs.complete(tx, row, outcomes.job_cancelled(), cancel_lease=True,
                            outcome=Outcome.CANCELLED)


async def delete(tx: Tx, name: str, caller: Caller | None) -> None:
    """Forget an operation (the action itself keeps running for other waiters)."""
    row = await tx.row(
        "DELETE FROM grid_operations WHERE name = %s AND instance = %s "
        "RETURNING job_id, owner", (name, tx.instance))
    if row is None:
        raise ownership.no_such_operation(name)
    ownership.check_operation(name, row["owner"], caller)  # rolled back when refused
    job_id = row["job_id"]
    tx.effects.job(job_id)
    await tx.execute(
        f"DELETE FROM grid_jobs WHERE id = %s AND stage = {COMPLETED} AND NOT EXISTS "
        "(SELECT 1 FROM grid_operations WHERE job_id = %s)", (job_id, job_id))
