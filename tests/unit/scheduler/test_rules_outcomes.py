"""rules.outcomes: what a finished lease means for its job, and the responses."""

from __future__ import annotations

import pytest
from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc import code_pb2
from schedkit import completed, packed

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.scheduler.model import LeaseState, ReportedLease
from buildfleet.scheduler.rules import outcomes
from buildfleet.scheduler.rules.outcomes import Ran, Requeue


def response(data: bytes) -> re_pb2.ExecuteResponse:
    return re_pb2.ExecuteResponse.FromString(data)


def judged(report: ReportedLease, *, terminating: bool = False) -> Ran | Requeue:
    return outcomes.judge(report, bot_id="bot-7", terminating=terminating)


@pytest.mark.parametrize("result", [
    AnyProto(type_url="type.googleapis.com/google.protobuf.Duration", value=b""),
    AnyProto(type_url="type.googleapis.com/build.bazel.remote.execution.v2.ActionResult",
             value=b"\xff\xff not a message"),
])
def test_an_unusable_result_is_the_bots_failure(result: AnyProto) -> None:
    verdict = judged(ReportedLease(id="l", state=LeaseState.COMPLETED, result=result))
    assert isinstance(verdict, Requeue)
    assert verdict.count_attempt and verdict.failed_by == "bot-7"
    assert verdict.code == code_pb2.INTERNAL and "unusable result" in verdict.reason


@pytest.mark.parametrize("code", [code_pb2.INTERNAL, code_pb2.UNAVAILABLE])
def test_an_infrastructure_failure_is_retried_elsewhere(code: int) -> None:
    verdict = judged(completed("l", code=code, message="runner crashed"))
    assert verdict == Requeue("runner crashed", code=code, failed_by="bot-7")
    # ... unless the bot gave it up because it is stopping: not the action's fault.
    stopping = judged(completed("l", code=code), terminating=True)
    assert isinstance(stopping, Requeue) and not stopping.count_attempt
    assert not stopping.failed_by and "stopped before finishing" in stopping.reason


def test_success_without_a_result_is_the_bots_failure() -> None:
    verdict = judged(ReportedLease(id="l", state=LeaseState.COMPLETED))
    assert isinstance(verdict, Requeue) and verdict.code == code_pb2.INTERNAL
    assert "without an ActionResult" in verdict.reason and verdict.failed_by == "bot-7"


def test_exit_143_is_the_bots_stop_only_while_it_terminates() -> None:
    stopping = judged(completed("l", exit_code=143), terminating=True)
    assert isinstance(stopping, Requeue) and not stopping.count_attempt
    ran = judged(completed("l", exit_code=143))
    assert isinstance(ran, Ran) and ran.result is not None and ran.result.exit_code == 143


def test_any_other_status_is_the_actions_own() -> None:
    verdict = judged(completed("l", code=code_pb2.FAILED_PRECONDITION,
                               message="input blob gone"))
    assert verdict == Ran(code=code_pb2.FAILED_PRECONDITION, message="input blob gone",
                          result=None)
    done = outcomes.completion(verdict, bot_id="bot-7", queued_at=1.0, cacheable=True,
                               cache_failed_results=True)
    assert done.to_cache is None and not done.succeeded and done.worker == "bot-7"
    answer = response(done.response)
    assert answer.status.code == code_pb2.FAILED_PRECONDITION
    assert answer.status.message == "input blob gone"


def test_completion_fills_in_the_metadata_the_bot_left_out() -> None:
    result = re_pb2.ActionResult(exit_code=0)
    done = outcomes.completion(Ran(code_pb2.OK, "", result), bot_id="bot-7",
                               queued_at=1_700_000_000.5, cacheable=True,
                               cache_failed_results=False)
    metadata = response(done.response).result.execution_metadata
    assert metadata.worker == "bot-7"
    assert metadata.queued_timestamp.ToNanoseconds() == 1_700_000_000_500_000_000
    assert done.succeeded and done.to_cache is result
    assert response(done.response).message == "ran on bot-7"
    # What the bot did fill in is kept.
    own = re_pb2.ActionResult()
    own.execution_metadata.worker = "its-own-name"
    own.execution_metadata.queued_timestamp.FromSeconds(5)
    kept = outcomes.completion(Ran(code_pb2.OK, "", own), bot_id="bot-7", queued_at=9.0,
                               cacheable=True, cache_failed_results=False)
    assert response(kept.response).result.execution_metadata.worker == "its-own-name"
    assert response(kept.response).result.execution_metadata.queued_timestamp.seconds == 5


@pytest.mark.parametrize(("exit_code", "cacheable", "cache_failed", "cached"), [
    (0, True, False, True), (1, True, False, False), (1, True, True, True),
    (0, False, False, False),
])
def test_what_reaches_the_action_cache(exit_code: int, cacheable: bool, cache_failed: bool,
                                       cached: bool) -> None:
    done = outcomes.completion(Ran(code_pb2.OK, "", re_pb2.ActionResult(exit_code=exit_code)),
                               bot_id="b", queued_at=0, cacheable=cacheable,
                               cache_failed_results=cache_failed)
    assert (done.to_cache is not None) is cached
    assert done.succeeded is (exit_code == 0)


def test_attempts_run_out_into_a_final_failure() -> None:
    failure = Requeue("sandbox broke", code=code_pb2.INTERNAL, failed_by="b")
    first = outcomes.requeued(failure, attempts=0, last_failure="", max_attempts=3)
    assert (first.attempts, first.last_failure, first.final) == (1, "sandbox broke", None)
    last = outcomes.requeued(failure, attempts=2, last_failure="earlier", max_attempts=3)
    assert last.attempts == 3 and last.final is not None
    final = response(last.final)
    assert final.status.code == code_pb2.INTERNAL
    assert final.status.message == "the action failed on 3 attempts; last failure: sandbox broke"
    # A requeue that does not count changes nothing.
    free = outcomes.requeued(Requeue("stopped", count_attempt=False), attempts=2,
                             last_failure="earlier", max_attempts=3)
    assert (free.attempts, free.last_failure, free.final) == (2, "earlier", None)


def test_responses_of_jobs_that_end_without_a_bot() -> None:
    assert response(outcomes.operation_cancelled()).status.code == code_pb2.CANCELLED
    assert "every operation" in response(outcomes.job_cancelled()).status.message
    late = response(outcomes.timed_out(0.5))
    assert late.status.code == code_pb2.DEADLINE_EXCEEDED and "0.5s" in late.status.message
    hit = response(outcomes.cache_hit(re_pb2.ActionResult(exit_code=3)))
    assert hit.cached_result and hit.result.exit_code == 3


def test_an_unrunnable_action_names_the_properties_no_bot_offers() -> None:
    requirements = frozenset({("OSFamily", "windows"), ("ISA", "x86-64")})
    offered = frozenset({("OSFamily", "linux"), ("ISA", "x86-64")})
    answer = response(outcomes.unmatched(requirements, offered, 300))
    assert answer.status.code == code_pb2.FAILED_PRECONDITION
    assert answer.status.message == ("no bot can run this action: for 300s no connected bot "
                                     "had the platform properties OSFamily=windows")
    # Each offered by some bot, never together: all of them are named.
    split = response(outcomes.unmatched(requirements, requirements, 300))
    assert "ISA=x86-64, OSFamily=windows" in split.status.message
    nothing = response(outcomes.unmatched(frozenset(), frozenset(), 60))
    assert nothing.status.message.endswith("(none)")


def test_a_result_that_cannot_be_stored_is_the_bots_failure() -> None:
    verdict = outcomes.unstorable("bot-7", "blob too large")
    assert verdict.failed_by == "bot-7" and verdict.code == code_pb2.INTERNAL
    assert "could not be stored: blob too large" in verdict.reason


def test_parse_result_takes_only_action_results() -> None:
    assert outcomes.parse_result(ReportedLease(id="l", state=LeaseState.COMPLETED)) is None
    result = outcomes.parse_result(ReportedLease(
        id="l", state=LeaseState.COMPLETED, result=packed(re_pb2.ActionResult(exit_code=4))))
    assert result is not None and result.exit_code == 4
