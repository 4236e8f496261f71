"""Makers for scheduler tests below gRPC: actions, lease reports, and the embedded
strategy's records (for its queue and store)."""

from __future__ import annotations

import itertools
import time

from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc import code_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.scheduler.embedded.records import JobRecord, OperationRecord, SessionRecord
from buildfleet.scheduler.model import BotStatus, LeaseState, Properties, ReportedLease
from buildfleet.scheduler.protos import ACTION_RESULT_URL

LINUX: Properties = frozenset({("OSFamily", "linux")})
LINUX_X86: Properties = frozenset({("OSFamily", "linux"), ("ISA", "x86-64")})
_seq = itertools.count()


def action(number: int, *, timeout: float | None = None, cacheable: bool = True
           ) -> tuple[Digest, re_pb2.Action]:
    """A distinct Action and its digest."""
    message = re_pb2.Action(
        command_digest=re_pb2.Digest(hash=f"{number:064x}", size_bytes=number),
        input_root_digest=re_pb2.Digest(hash="0" * 64, size_bytes=0),
        do_not_cache=not cacheable)
    if timeout is not None:
        message.timeout.FromSeconds(int(timeout))
    return Digest.of(message.SerializeToString()), message


def packed(result: re_pb2.ActionResult) -> AnyProto:
    return AnyProto(type_url=ACTION_RESULT_URL, value=result.SerializeToString())


def completed(lease_id: str, exit_code: int = 0, *, code: int = code_pb2.OK,
              message: str = "") -> ReportedLease:
    """A lease reported COMPLETED: with a result of `exit_code` when `code` is OK."""
    result = packed(re_pb2.ActionResult(exit_code=exit_code)) if code == code_pb2.OK else None
    return ReportedLease(id=lease_id, state=LeaseState.COMPLETED, status_code=code,
                         status_message=message, result=result)


def active(lease_id: str) -> ReportedLease:
    return ReportedLease(id=lease_id, state=LeaseState.ACTIVE)


def make_job(priority: int = 0, requirements: Properties = frozenset(), *,
             instance: str = "", name: str = "") -> JobRecord:
    seq = next(_seq)
    return JobRecord(id=name or f"job-{seq}", instance=instance,
                     action_digest=Digest.of(f"action {seq}".encode()), action=b"action",
                     requirements=requirements, priority=priority, cacheable=True, timeout=0,
                     run_limit=3630, queued_at=time.time(), seq=seq)


def make_operation(job: JobRecord, name: str) -> OperationRecord:
    return OperationRecord(name=name, instance=job.instance, job=job, created_at=time.time())


def make_session(name: str, instance: str = "") -> SessionRecord:
    return SessionRecord(name=name, instance=instance, bot_id=f"bot-{name}",
                         status=BotStatus.OK, properties=LINUX, capacity=2,
                         created_at=time.time(), last_seen=time.monotonic(), worker=b"worker")
