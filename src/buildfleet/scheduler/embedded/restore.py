"""Rebuild the embedded state from the store's rows after a restart.

Sessions come back as if just heard from (their bots get a keepalive window to
call again); a job leased to a session that came back stays leased to it, any
other unfinished job is queued again; operations of jobs that are gone are
dropped.  Back-offs and the just-succeeded answers do not survive a restart.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import OrderedDict

from buildfleet.digest import Digest
from buildfleet.scheduler.embedded.records import (
    JobRecord,
    LeaseRecord,
    OperationRecord,
    SessionRecord,
)
from buildfleet.scheduler.embedded.state import EmbeddedState
from buildfleet.scheduler.embedded.store import Row, StoredState
from buildfleet.scheduler.model import BotStatus, LeaseState, Operation, Properties, Stage
from buildfleet.scheduler.rules import timers
from buildfleet.scheduler.rules.drains import Drain
from buildfleet.scheduler.rules.invocations import build_key
from buildfleet.scheduler.rules.matching import lease_id

log = logging.getLogger(__name__)


def _properties(text: str) -> Properties:
    return frozenset((key, value) for key, value in json.loads(text))


def restore(state: EmbeddedState, stored: StoredState) -> None:
    moment = state.clock()
    for row in stored.sessions:
        session = SessionRecord(
            name=row["name"], instance=state.instance, bot_id=row["bot_id"],
            status=BotStatus(row["status"]), properties=_properties(row["properties"]),
            capacity=row["capacity"], created_at=row["created_at"], last_seen=moment,
            version=row["version"], worker=row["worker"], owner=row.get("owner") or "")
        state.sessions[session.name] = session
        state.by_bot_id[session.bot_id] = session
    for row in stored.drains:
        state.drains[row["pattern"]] = Drain(row["pattern"], row["created_at"])
    max_seq = -1
    running: list[JobRecord] = []
    queued: list[JobRecord] = []  # both filed once their operations say which builds
    for row in sorted(stored.jobs, key=lambda r: r["seq"]):
        job = job_from_row(state, row)
        max_seq = max(max_seq, job.seq)
        state.jobs[job.id] = job
        if job.done:
            continue
        if job.cacheable:
            state.in_flight[job.action_digest] = job
        holder = state.sessions.get(row["lease_session"] or "")
        if holder is not None and row["lease_state"] in (LeaseState.PENDING, LeaseState.ACTIVE):
            lease = LeaseRecord(id=lease_id(state.instance, job.id, job.attempts), job=job,
                                session=holder, state=LeaseState(row["lease_state"]),
                                delivered=True)
            holder.leases[lease.id] = lease
            job.lease = lease
            job.stage = Stage.EXECUTING
            job.started_at = moment
            running.append(job)
        else:
            job.stage = Stage.QUEUED
            queued.append(job)
    state.seq = itertools.count(max_seq + 1)
    for row in stored.operations:
        target = state.jobs.get(row["job_id"])
        if target is None:
            state.store.delete_operation(row["name"])
            continue
        operation = operation_from_row(state, row, target)
        state.operations[operation.name] = operation
        if not operation.cancelled:
            target.operations.add(operation.name)
            target.builds.add(build_key(operation.request_metadata, operation.owner,
                                        state.settings.fair_share_by))
        if operation.done:
            state.expire_later(operation)
    for job in running:
        state.started(job)
    for job in queued:
        state.queue.push(job)
    for job in state.jobs.values():
        if job.done and not job.operations:
            state.expire_job_later(job)
    # Done operations beyond what memory keeps stay in the store (read back there).
    state.finished = OrderedDict(sorted(
        state.finished.items(),
        key=lambda item: _ended(state.operations[item[0]])))
    state.retire(state.settings.completed_in_memory)
    if stored.jobs or stored.sessions:
        log.info("instance %r: restored %d jobs (%d queued), %d operations, %d bot sessions",
                 state.instance, len(state.jobs), len(state.queue), len(state.operations),
                 len(state.sessions))


def _ended(operation: OperationRecord) -> float:
    return timers.operation_ended(created_at=operation.created_at,
                                  own_end=operation.own_response is not None,
                                  job_completed_at=operation.job.completed_at) or 0.0


def operation_from_row(state: EmbeddedState, row: Row, job: JobRecord) -> OperationRecord:
    return OperationRecord(name=row["name"], instance=state.instance, job=job,
                           created_at=row["created_at"], cancelled=bool(row["cancelled"]),
                           own_response=row["own_response"], owner=row.get("owner") or "",
                           request_metadata=bytes(row.get("request_metadata") or b""))


def stored_view(state: EmbeddedState, operation: Row, job: Row) -> Operation:
    """A done operation that is no longer in memory, as its stored rows show it."""
    return operation_from_row(state, operation, job_from_row(state, job)).view()


def job_from_row(state: EmbeddedState, row: Row) -> JobRecord:
    return JobRecord(
        id=row["id"], instance=state.instance,
        action_digest=Digest(row["action_hash"], row["action_size"]), action=row["action"],
        requirements=_properties(row["requirements"]), priority=row["priority"],
        cacheable=bool(row["cacheable"]), timeout=row["timeout"],
        run_limit=timers.run_limit(row["timeout"], state.settings),
        queued_at=row["queued_at"], seq=row["seq"], stage=Stage(row["stage"]),
        attempts=row["attempts"], response=row["response"],
        failed_on=set(json.loads(row["failed_on"])), last_failure=row["last_failure"],
        completed_at=row["completed_at"], worker=row["worker"])
