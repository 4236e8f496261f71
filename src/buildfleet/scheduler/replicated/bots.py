"""One step of an UpdateBotSession in the replicated strategy, as one transaction.

The step locks the session's row, then its jobs; applies the bot's report as
`rules.reports` reconciles it (completions with the outcomes settled before the
transaction); closes a terminating session that holds nothing more; claims work
with ``FOR UPDATE SKIP LOCKED``, so that two bots on any replicas never get the
same job and neither waits for the other; and, when there is anything to say
(or no waiting is wanted), builds the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from psycopg.rows import dict_row

from buildfleet.scheduler.model import (
    BotSession,
    BotStatus,
    Lease,
    LeaseState,
    Properties,
    ReportedLease,
    Stage,
)
from buildfleet.scheduler.replicated import jobs
from buildfleet.scheduler.replicated.notes import (
    MAX_PAYLOAD,
    SEPARATOR,
    JobNews,
    job_note,
    news_suffix,
)
from buildfleet.scheduler.replicated.sql import (
    ACTIVE,
    CANCELLED,
    EXECUTING,
    JOB_COLUMNS,
    NOW,
    PENDING,
    QUEUED,
    TERMINATING,
    Row,
    digest_of,
    lease_view,
    properties_from,
    properties_json,
    row_lease_id,
)
from buildfleet.scheduler.replicated.transactions import Tx
from buildfleet.scheduler.results import LeasedJob
from buildfleet.scheduler.rules import ownership, reports
from buildfleet.scheduler.rules.drains import drained
from buildfleet.scheduler.rules.matching import Fairness, build_load, takes_work
from buildfleet.scheduler.rules.outcomes import Completion, Requeue
from buildfleet.scheduler.rules.ownership import Caller


@dataclass(frozen=True)
class Report:
    """What a bot said in an UpdateBotSession."""

    bot_id: str
    status: BotStatus
    leases: list[ReportedLease]
    properties: Properties | None
    capacity: int | None
    worker: bytes | None
    caller: Caller | None = None


@dataclass(frozen=True)
class Held:
    """A lease the session holds, as `rules.reports` sees it."""

    state: LeaseState
    delivered: bool


@dataclass(frozen=True)
class Outcome:
    session: BotSession
    answer: list[Lease] | None  # None: nothing to say yet, long-poll
    holds: bool  # the bot runs leases
    closed: bool = False  # the session ended (the bot terminated)
    # What settling each answered lease needs, should the bot report it here.
    leased: dict[str, LeasedJob] = field(default_factory=dict)


async def lock_session(tx: Tx, name: str) -> tuple[Row, list[Row]]:
    """The session's row and its jobs (running or to be told CANCELLED), locked;
    InvalidArgument (register again) when the session is closed or unknown."""
    cursor = tx.conn.cursor(row_factory=dict_row)
    await cursor.execute(
        f"SELECT *, {NOW} AS now, {NOW} - last_seen AS since_seen FROM grid_sessions "
        "WHERE name = %s AND instance = %s FOR UPDATE",
        (name, tx.instance))
    jobs_cursor = tx.conn.cursor(row_factory=dict_row)
    # Sent before the first result is read: in a pipeline, one round trip for both.
    await jobs_cursor.execute(
        f"SELECT {JOB_COLUMNS} FROM grid_jobs j WHERE j.lease_session = %s "
        "ORDER BY j.seq FOR UPDATE", (name,))
    session = await cursor.fetchone()
    if session is None:
        raise reports.reregister(name, await jobs.closed_reason(tx, name))
    return session, await jobs_cursor.fetchall()


async def step(tx: Tx, name: str, report: Report | None,
               settled: Mapping[str, Completion | Requeue], *, may_wait: bool,
               fairness: Fairness, offer_pending: bool) -> Outcome:
    """Apply the report (if any), assign work and, when there is anything to say or no
    waiting is wanted, build the answer."""
    row, rows = await lock_session(tx, name)
    held = {row_lease_id(r): r for r in rows
            if r["stage"] == EXECUTING and r["lease_state"] in (PENDING, ACTIVE)}
    notices = {row_lease_id(r): r for r in rows if r["lease_state"] == CANCELLED}
    status = BotStatus(row["status"])
    properties = properties_from(row["properties"])
    capacity: int = row["capacity"]
    worker = bytes(row["worker"])
    changed = False
    if report is not None:
        ownership.check_session(name, row["owner"], report.caller)
        reports.check_owner(name, row["bot_id"], report.bot_id)
        views = {lease_id: Held(LeaseState(r["lease_state"]), r["lease_delivered"])
                 for lease_id, r in held.items()}
        reports.check_reports(report.leases, views)
        status = reports.status_after(status, report.status)
        if report.properties is not None:
            properties = report.properties
        if report.capacity is not None:
            capacity = report.capacity
        if report.worker is not None:
            worker = report.worker
        changed = await _apply(tx, reports.reconcile(report.leases, views, notices),
                               held, notices, settled)

    def session(version: int, holding: int) -> BotSession:
        return BotSession(name=name, instance=tx.instance, bot_id=row["bot_id"], status=status,
                          properties=properties, capacity=capacity, held=holding,
                          version=version, worker=worker, created_at=row["created_at"],
                          owner=row["owner"])

    if status == BotStatus.BOT_TERMINATING and not held:
        await jobs.close_session(tx, row, "the bot terminated", count_attempt=False)
        return Outcome(session=session(row["version"], 0), answer=await _answer(tx, {}, notices),
                       holds=False, closed=True)
    if takes_work(status) and capacity > len(held) and not drained(
            row["bot_id"], properties, tx.drains):
        for claimed in await _claim(tx, row, properties, capacity - len(held), fairness,
                                    offer_pending):
            held[row_lease_id(claimed)] = claimed
            changed = True
    respond = changed or bool(notices) or not may_wait
    answer = await _answer(tx, held, notices) if respond else None
    # The version a bot echoes: the database's time of the answer in microseconds,
    # which grows from answer to answer whichever replica gives it, with no write.
    version = max(row["version"] + 1, int(row["now"] * 1e6)) if respond else row["version"]
    reported = (int(status), properties, capacity, worker) != (
        row["status"], properties_from(row["properties"]), row["capacity"], bytes(row["worker"]))
    if reported or row["since_seen"] > tx.settings.tick:
        # At most one write of the session per step, only when what the bot reported
        # changed or it was last marked seen a tick ago (a call open on a replica is
        # kept fresh by that replica's housekeeping).
        await tx.execute(
            f"""UPDATE grid_sessions SET status = %s, properties = %s::jsonb, capacity = %s,
                    worker = %s, last_seen = {NOW}, version = %s
                WHERE name = %s""",
            (int(status), properties_json(properties), capacity, worker, version, name))
    leased = {lease_id: LeasedJob(digest_of(r), r["queued_at"], r["cacheable"])
              for lease_id, r in held.items()} if respond else {}
    return Outcome(session=session(version, len(held)), answer=answer, holds=bool(held),
                   leased=leased)


async def _apply(tx: Tx, report: reports.Reconciliation, held: dict[str, Row],
                 notices: dict[str, Row], settled: Mapping[str, Completion | Requeue]) -> bool:
    for completed in report.completed:
        outcome = settled.get(completed.id)
        if outcome is None:  # not held when the update began: nothing was settled
            continue
        await jobs.finish(tx, held.pop(completed.id), outcome)
    for lease_id in report.given_back:
        await jobs.requeue(tx, held.pop(lease_id), Requeue("the bot gave the lease back",
                                                                   cause="given_back"))
    for lease_id in report.started:
        job = held[lease_id]
        await tx.execute(
            f"UPDATE grid_jobs SET lease_state = {ACTIVE}, deadline = {NOW} + run_limit "
            "WHERE id = %s", (job["id"],))
        job["lease_state"] = ACTIVE  # the stage stays EXECUTING: nothing to announce
    for lease_id in report.acknowledged:
        notice = notices.pop(lease_id)
        await tx.execute("UPDATE grid_jobs SET lease_session = NULL WHERE id = %s",
                         (notice["id"],))
    return report.changed


async def _claim(tx: Tx, session: Row, properties: Properties, slots: int,
                 fairness: Fairness, offer_pending: bool) -> list[Row]:
    """Lease up to `slots` queued jobs the session can run, in the order
    `rules.matching` gives (`Fairness` says which picks take the oldest)."""
    claimed: list[Row] = []
    while slots > 0:
        batch, oldest_first = fairness.next_batch(slots, pending=tx.effects.picks)
        if tx.settings.fair_builds:
            batch = 1  # each pick changes the loads the next one compares
        rows = await claim_batch(tx, session, properties, batch, oldest_first,
                                  offer_pending)
        claimed += rows
        tx.effects.picks += len(rows)
        slots -= len(rows)
        if len(rows) < batch:
            break
    tx.effects.queued -= len(claimed)
    tx.effects.stats["assigned"] += len(claimed)
    return claimed


def _builds(job: str) -> str:
    """The builds of the job row `job` waits for: its own, or the anonymous build ""
    (rules.matching's `job.builds or ("",)`)."""
    return (f"(CASE WHEN cardinality({job}.builds) = 0 THEN ARRAY['']::text[] "
            f"ELSE {job}.builds END)")


# The claim: `rules.matching` in SQL (tests/contract/test_claim_agrees.py holds it to
# the core).  A job the bot can run (its properties contain the requirements), that
# it did not fail -- or, when it did, whose back-off is over and that no other live
# bot which may yet work and did not fail it could run.
_ELIGIBLE = f"""
          j.instance = %(instance)s AND j.stage = {QUEUED}
          AND %(properties)s::jsonb @> j.requirements
          AND (NOT j.failed_on ? %(bot)s OR (
               (j.retry_at IS NULL OR j.retry_at <= {NOW})
               AND NOT EXISTS (
                   SELECT 1 FROM grid_sessions s
                   WHERE s.instance = j.instance AND s.name <> %(name)s
                     AND s.last_seen > {NOW} - %(keepalive)s AND s.status <> {TERMINATING}
                     AND s.properties @> j.requirements AND NOT j.failed_on ? s.bot_id)))"""
# Most urgent first (fair-builds off), or oldest first for an age-guard pick (with
# max-running-per-build: only jobs a build under its limit waits for).
_UNDER_LIMIT = f"""
          AND (%(limit)s::int IS NULL OR EXISTS (
               SELECT 1 FROM unnest({_builds("j")}) AS b(build)
               WHERE (SELECT count(*) FROM grid_jobs r
                      WHERE r.instance = j.instance AND r.stage = {EXECUTING}
                        AND b.build = ANY({_builds("r")})) < %(limit)s))"""
_PICK = f"""
        SELECT j.id FROM grid_jobs j WHERE {_ELIGIBLE} {{limit}}
        ORDER BY {{order}} LIMIT %(slots)s FOR UPDATE SKIP LOCKED"""
# The fair order's choice is made before (`_choose_fairly`): the claim takes it.
_CHOSEN = f"""
        SELECT j.id FROM grid_jobs j WHERE j.id = %(chosen)s AND j.stage = {QUEUED}
        FOR UPDATE SKIP LOCKED"""
_CLAIM = f"""
    WITH picked AS ({{pick}})
    UPDATE grid_jobs j SET stage = {EXECUTING}, lease_session = %(name)s,
        lease_state = %(state)s, lease_delivered = true, deadline = {NOW} + j.run_limit,
        unmatched_since = NULL
    FROM picked WHERE j.id = picked.id
    RETURNING {JOB_COLUMNS}, CASE WHEN %(channel)s <> '' THEN pg_notify(%(channel)s, CASE
        WHEN octet_length(%(prefix)s || j.id || %(news)s) <= %(most)s
        THEN %(prefix)s || j.id || %(news)s ELSE %(prefix)s || j.id END) END"""
CLAIM_BY_URGENCY = _CLAIM.format(pick=_PICK.format(limit="", order="j.priority, j.seq"))
CLAIM_BY_AGE = _CLAIM.format(pick=_PICK.format(limit="", order="j.seq"))
CLAIM_OLDEST_FAIRLY = _CLAIM.format(pick=_PICK.format(limit=_UNDER_LIMIT, order="j.seq"))
CLAIM_CHOSEN = _CLAIM.format(pick=_CHOSEN)

# The fair order (`rules.matching.fair_order`) without looking at every queued job.
# grid_queue holds a row per queued job and build waiting for it (a trigger keeps it;
# schema version 10), indexed by build, then urgency.  The running actions per build:
_LOADS = f"""
    SELECT b.build, count(*) AS running
    FROM grid_jobs r CROSS JOIN LATERAL unnest({_builds("r")}) AS b(build)
    WHERE r.instance = %(instance)s AND r.stage = {EXECUTING}
    GROUP BY b.build"""
# Each build's most urgent queued job (whoever can run it), one index probe per
# build (a loose index scan):
_HEADS = """
    WITH RECURSIVE heads AS (
        (SELECT build, priority, seq FROM grid_queue WHERE instance = %(instance)s
         ORDER BY build, priority, seq LIMIT 1)
        UNION ALL
        SELECT next.build, next.priority, next.seq FROM heads h CROSS JOIN LATERAL (
            SELECT q.build, q.priority, q.seq FROM grid_queue q
            WHERE q.instance = %(instance)s AND q.build > h.build
            ORDER BY q.build, q.priority, q.seq LIMIT 1) next)
    SELECT build, priority, seq FROM heads"""
# A build's most urgent job that this bot may take:
_BEST_OF_BUILD = f"""
    SELECT j.id, j.priority, j.seq FROM grid_queue q JOIN grid_jobs j ON j.id = q.job_id
    WHERE q.instance = %(instance)s AND q.build = %(build)s AND {_ELIGIBLE}
    ORDER BY q.priority, q.seq LIMIT 1 FOR UPDATE OF j SKIP LOCKED"""


async def _choose_fairly(tx: Tx, parameters: dict[str, object]) -> str | None:
    """The job `rules.matching.pick_fairly` gives the bot: builds are visited from
    the lowest load their most urgent job could have (their head's: any other job of
    theirs weighs at least as much) until no build left could beat the best job
    found."""
    loads = {row["build"]: int(row["running"]) for row in await tx.rows(_LOADS, parameters)}
    limit = tx.settings.max_running_per_build
    bounds = sorted(
        (build_load(loads.get(row["build"], 0), row["priority"]), row["priority"],
         row["seq"], row["build"])
        for row in await tx.rows(_HEADS, parameters)
        if limit is None or loads.get(row["build"], 0) < limit)
    best: tuple[tuple[float, int, int], str] | None = None
    for bound in bounds:
        if best is not None and bound[:3] >= best[0]:
            break
        build = bound[3]
        row = await tx.row(_BEST_OF_BUILD, {**parameters, "build": build})
        if row is None:
            continue
        key = (build_load(loads.get(build, 0), row["priority"]), row["priority"], row["seq"])
        if best is None or key < best[0]:
            best = (key, row["id"])
    return None if best is None else best[1]


async def claim_batch(tx: Tx, session: Row, properties: Properties, slots: int,
                      oldest_first: bool, offer_pending: bool) -> list[Row]:
    """One claim statement; it announces each job it leases (with its news when they
    fit, as `notes.job_note` writes them).  In the fair order, one job."""
    news = JobNews(Stage.EXECUTING, session["bot_id"])
    parameters: dict[str, object] = {
        "instance": tx.instance, "properties": properties_json(properties),
        "bot": session["bot_id"], "name": session["name"],
        "keepalive": tx.settings.keepalive, "slots": slots,
        "state": PENDING if offer_pending else ACTIVE, "channel": tx.job_channel,
        "prefix": tx.instance + SEPARATOR, "news": news_suffix(news), "most": MAX_PAYLOAD,
        "limit": tx.settings.max_running_per_build}
    if not tx.settings.fair_builds:
        statement = CLAIM_BY_AGE if oldest_first else CLAIM_BY_URGENCY
    elif oldest_first:
        statement = CLAIM_OLDEST_FAIRLY
    else:
        chosen = await _choose_fairly(tx, parameters)
        if chosen is None:
            return []
        statement, parameters["chosen"] = CLAIM_CHOSEN, chosen
    claimed = await tx.rows(statement, parameters)
    for row in claimed:
        if tx.job_channel:
            tx.announced(row["id"], job_note(tx.instance, row["id"], news)[1])
        else:
            tx.effects.job(row["id"], news)
    claimed.sort(key=lambda r: (r["seq"],) if oldest_first else (r["priority"], r["seq"]))
    return claimed


async def _answer(tx: Tx, held: dict[str, Row], notices: dict[str, Row]) -> list[Lease]:
    """The leases to send back; marks them delivered and clears the notices sent."""
    answer = [lease_view(row) for row in held.values()]
    undelivered = [row["id"] for row in held.values() if not row["lease_delivered"]]
    if undelivered:
        await tx.execute("UPDATE grid_jobs SET lease_delivered = true "
                         "WHERE id = ANY(%s::text[])", (undelivered,))
    if notices:
        answer += [lease_view(row, LeaseState.CANCELLED) for row in notices.values()]
        # Told once; afterwards the lease is simply absent.
        await tx.execute("UPDATE grid_jobs SET lease_session = NULL "
                         "WHERE id = ANY(%s::text[])", ([row["id"] for row in notices.values()],))
    return answer

