"""The replicated strategy's vocabulary: stage numbers, columns, statements, and the
conversions between rows and the scheduler's values.

Numbers in SQL come from the enums of `buildfleet.scheduler.model`; times that
replicas compare come from the database's clock (`NOW`), so the replicas'
clocks need not agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from buildfleet.digest import Digest
from buildfleet.scheduler.model import (
    BotSession,
    BotStatus,
    Lease,
    LeaseState,
    Operation,
    Properties,
    Stage,
)
from buildfleet.scheduler.rules.matching import lease_id

Row = dict[str, Any]

# The database's clock, in seconds since the epoch.
NOW = "(extract(epoch from clock_timestamp())::float8)"
QUEUED, EXECUTING, COMPLETED = int(Stage.QUEUED), int(Stage.EXECUTING), int(Stage.COMPLETED)
PENDING, ACTIVE, CANCELLED = (int(LeaseState.PENDING), int(LeaseState.ACTIVE),
                              int(LeaseState.CANCELLED))
TERMINATING = int(BotStatus.BOT_TERMINATING)
LIVE_LEASE = f"lease_state IN ({PENDING}, {ACTIVE})"

JOB_COLUMNS = (
    "j.id, j.instance, j.action_hash, j.action_size, j.action, j.requirements, j.priority, "
    "j.cacheable, j.timeout, j.run_limit, j.queued_at, j.seq, j.stage, j.attempts, "
    "j.response, j.lease_session, j.lease_state, j.lease_delivered, j.failed_on, "
    "j.retry_at, j.last_failure, j.completed_at, j.worker")

# An operation with its job and the bot holding its lease (if any).
OPERATION_QUERY = f"""
    SELECT o.name AS op_name, o.created_at AS op_created_at, o.cancelled AS op_cancelled,
           o.own_response AS op_own_response, o.owner AS op_owner, s.bot_id AS lease_bot,
           o.request_metadata AS op_request_metadata,
           {JOB_COLUMNS}
    FROM grid_operations o JOIN grid_jobs j ON j.id = o.job_id
    LEFT JOIN grid_sessions s ON s.name = j.lease_session"""


def properties_json(properties: Properties) -> str:
    """`{"key": [values...]}`: the form `@>` (containment) matches requirements with."""
    grouped: dict[str, list[str]] = {}
    for key, value in sorted(properties):
        grouped.setdefault(key, []).append(value)
    return json.dumps(grouped, sort_keys=True)


def properties_from(value: Any) -> Properties:
    document = json.loads(value) if isinstance(value, str) else value
    return frozenset((key, item) for key, items in document.items() for item in items)


def channel(schema: str, kind: str) -> str:
    """A LISTEN channel private to one database schema (tests share a database)."""
    return f"bf_{kind}_{hashlib.sha256(schema.encode()).hexdigest()[:16]}"


def row_lease_id(row: Row) -> str:
    return lease_id(row["instance"], row["id"], row["attempts"])


def digest_of(row: Row) -> Digest:
    return Digest(row["action_hash"], row["action_size"])


def operation_view(row: Row) -> Operation:
    """An OPERATION_QUERY row as the operation stands."""
    own = row["op_own_response"]
    stage = Stage.COMPLETED if own is not None else Stage(row["stage"])
    response = own if own is not None else row["response"]
    worker = row["lease_bot"] if stage == Stage.EXECUTING and row["lease_bot"] else row["worker"]
    return Operation(
        name=row["op_name"], instance=row["instance"], job_id=row["id"],
        action_digest=digest_of(row), stage=stage,
        response=bytes(response) if stage == Stage.COMPLETED and response is not None
        else None,
        queued_at=row["queued_at"], created_at=row["op_created_at"], worker=worker or "",
        cancelled=row["op_cancelled"], attempts=row["attempts"], owner=row["op_owner"],
        priority=row["priority"], request_metadata=bytes(row["op_request_metadata"] or b""))


def lease_view(row: Row, state: LeaseState | None = None) -> Lease:
    return Lease(id=row_lease_id(row),
                 state=LeaseState(row["lease_state"]) if state is None else state,
                 action_digest=digest_of(row), action=bytes(row["action"]),
                 requirements=properties_from(row["requirements"]))


def session_view(row: Row, held: int) -> BotSession:
    return BotSession(name=row["name"], instance=row["instance"], bot_id=row["bot_id"],
                      status=BotStatus(row["status"]),
                      properties=properties_from(row["properties"]),
                      capacity=row["capacity"], held=held, version=row["version"],
                      worker=bytes(row["worker"]), created_at=row["created_at"],
                      owner=row["owner"], silent_for=max(0.0, row.get("since_seen") or 0.0))
