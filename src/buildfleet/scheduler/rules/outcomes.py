"""What the end of a lease means for its job, and the responses clients get.

A lease ends in one of two ways for the job: the bot *ran* the action to an
answer (`Ran`, which becomes a `Completion`: the job is done with that
response), or the job is *taken back* (`Requeue`) and queued again -- unless it
has used up its attempts, when `requeued` turns it into a final failure.

Lease status INTERNAL or UNAVAILABLE means the infrastructure failed: the
action is retried, preferably elsewhere (the bot is remembered as having failed
it).  A bot that stops (BOT_TERMINATING) and gives an action up, or reports it
killed by the stop (exit code 143), is not counted against the action.  Any
other status is the action's final status.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError
from google.rpc import code_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.scheduler.model import Properties, ReportedLease
from buildfleet.scheduler.protos import execute_response
from buildfleet.scheduler.rules.observations import Outcome

INFRASTRUCTURE_CODES = frozenset({code_pb2.INTERNAL, code_pb2.UNAVAILABLE})
SHUTDOWN_EXIT_CODE = 143  # 128 + SIGTERM: the bot was stopped, not the action
_ACTION_RESULT = re_pb2.ActionResult.DESCRIPTOR.full_name


@dataclass(frozen=True, slots=True)
class Requeue:
    """Take the lease back and queue its job again."""

    reason: str
    count_attempt: bool = True  # False: the action is not to blame (its bot stopped)
    code: int = code_pb2.UNAVAILABLE  # the final status should the attempts run out
    failed_by: str = ""  # the bot that failed the action: other bots get it first
    cause: str = "bot_failure"  # why, for metrics: a short fixed word


@dataclass(frozen=True, slots=True)
class Ran:
    """The bot ran the action to an answer (which may be a failure of the action)."""

    code: int
    message: str
    result: re_pb2.ActionResult | None


@dataclass(frozen=True, slots=True)
class Completion:
    """Complete the job with `response`."""

    response: bytes  # the serialized ExecuteResponse
    worker: str  # the bot that ran it
    succeeded: bool  # status OK and exit code 0: it answers identical submissions a moment
    to_cache: re_pb2.ActionResult | None  # what to write to the action cache, if anything
    outcome: Outcome = Outcome.FAILED  # how it ended, for metrics


@dataclass(frozen=True, slots=True)
class Requeued:
    """A job taken back: its attempts and last failure, and `final` when it is over."""

    attempts: int
    last_failure: str
    final: bytes | None  # the ExecuteResponse that ends it when out of attempts


def parse_result(report: ReportedLease) -> re_pb2.ActionResult | None:
    """The ActionResult a bot reported with a lease; ValueError/DecodeError if unusable."""
    if report.result is None or not report.result.type_url:
        return None
    if report.result.type_url.rsplit("/", 1)[-1] != _ACTION_RESULT:
        raise ValueError(f"lease result is a {report.result.type_url}, not an ActionResult")
    return re_pb2.ActionResult.FromString(report.result.value)


def judge(report: ReportedLease, *, bot_id: str, terminating: bool) -> Ran | Requeue:
    """What a lease reported COMPLETED by `bot_id` means (terminating: the bot is stopping)."""
    try:
        result = parse_result(report)
    except (ValueError, DecodeError) as error:
        return Requeue(f"bot {bot_id} sent an unusable result: {error}",
                       code=code_pb2.INTERNAL, failed_by=bot_id, cause="bad_result")
    code = report.status_code
    if code in INFRASTRUCTURE_CODES:
        if terminating:
            return Requeue(f"bot {bot_id} stopped before finishing the action",
                           count_attempt=False, cause="bot_stopping")
        return Requeue(report.status_message or "infrastructure failure", code=code,
                       failed_by=bot_id)
    if code == code_pb2.OK and result is None:
        return Requeue(f"bot {bot_id} reported success without an ActionResult",
                       code=code_pb2.INTERNAL, failed_by=bot_id, cause="bad_result")
    if (code == code_pb2.OK and terminating and result is not None
            and result.exit_code == SHUTDOWN_EXIT_CODE):
        return Requeue(f"bot {bot_id} stopped while running the action", count_attempt=False,
                       cause="bot_stopping")
    return Ran(code=code, message=report.status_message, result=result)


def unstorable(bot_id: str, problem: str) -> Requeue:
    """The bot's result could not be stored (its inline outputs did not fit the CAS)."""
    return Requeue(f"bot {bot_id} sent a result that could not be stored: {problem}",
                   code=code_pb2.INTERNAL, failed_by=bot_id, cause="bad_result")


def completion(ran: Ran, *, bot_id: str, queued_at: float, cacheable: bool,
               cache_failed_results: bool) -> Completion:
    """The job's end once the bot ran it.  Fills in what the bot left out of the
    result's metadata (the worker, the queued time): `ran.result` is changed."""
    result = ran.result
    if result is not None:
        metadata = result.execution_metadata
        if not metadata.worker:
            metadata.worker = bot_id
        if not metadata.HasField("queued_timestamp"):
            metadata.queued_timestamp.FromNanoseconds(int(queued_at * 1e9))
    if ran.code != code_pb2.OK:
        return Completion(execute_response(code=ran.code, result=result, message=ran.message
                                           or f"the action failed on bot {bot_id}"),
                          worker=bot_id, succeeded=False, to_cache=None,
                          outcome=Outcome.TIMEOUT if ran.code == code_pb2.DEADLINE_EXCEEDED
                          else Outcome.FAILED)
    assert result is not None  # judge() requeues a success without a result
    cache = cacheable and (result.exit_code == 0 or cache_failed_results)
    return Completion(execute_response(result=result, message=f"ran on {bot_id}"),
                      worker=bot_id, succeeded=result.exit_code == 0,
                      to_cache=result if cache else None,
                      outcome=Outcome.SUCCESS if result.exit_code == 0 else Outcome.FAILED)


def requeued(requeue: Requeue, *, attempts: int, last_failure: str,
             max_attempts: int) -> Requeued:
    """Count the attempt (if it counts); out of attempts, the job fails for good."""
    if not requeue.count_attempt:
        return Requeued(attempts, last_failure, None)
    attempts += 1
    if attempts < max_attempts:
        return Requeued(attempts, requeue.reason, None)
    return Requeued(attempts, requeue.reason, execute_response(
        code=requeue.code,
        message=f"the action failed on {attempts} attempts; last failure: {requeue.reason}"))


# -- the responses of jobs that end without a bot's answer ----------------------------

def cache_hit(result: re_pb2.ActionResult) -> bytes:
    return execute_response(result=result, cached=True, message="served from the action cache")


def operation_cancelled() -> bytes:
    """The response of one operation its client cancelled."""
    return execute_response(code=code_pb2.CANCELLED, message="the operation was cancelled")


def job_cancelled() -> bytes:
    """The response of a job nobody waits for any more."""
    return execute_response(code=code_pb2.CANCELLED,
                            message="every operation waiting for the action was cancelled")


def timed_out(timeout: float) -> bytes:
    """The response of a job that ran longer than its (effective) timeout."""
    return execute_response(code=code_pb2.DEADLINE_EXCEEDED,
                            message=f"the action ran longer than its timeout of {timeout:g}s")


def unmatched(requirements: Properties, offered: Properties, waited: float) -> bytes:
    """The response of a job no connected bot could run for `waited` seconds; names
    the required properties that no bot offers (all of them when each is offered
    by some bot, only never together)."""
    lacking = sorted(requirements - offered) or sorted(requirements)
    described = ", ".join(f"{k}={v}" for k, v in lacking) or "(none)"
    return execute_response(
        code=code_pb2.FAILED_PRECONDITION,
        message=f"no bot can run this action: for {waited:g}s no connected bot had the "
        f"platform properties {described}")
