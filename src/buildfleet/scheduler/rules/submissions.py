"""What a submission may be, and what it joins.

- An Action's timeout must be between 0 and the instance's `max-timeout`.
- A cacheable action (not `do_not_cache`) joins the unfinished job of the same
  action, whoever submitted it: it runs once and every operation gets the result.
  Joining raises the job's priority when the newcomer's is more urgent.  A job
  that succeeded a moment ago answers too (see `timers.answers_resubmission`).
- A submission that would queue a new job beyond `max-queued` is refused with
  RESOURCE_EXHAUSTED; joining a job already queued adds nothing and is accepted.
"""

from __future__ import annotations

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.errors import InvalidArgument, ResourceExhausted


def action_timeout(action: re_pb2.Action, max_timeout: float) -> float:
    """The action's own timeout in seconds (0: none set); InvalidArgument when out of bounds."""
    if not action.HasField("timeout"):
        return 0.0
    seconds = action.timeout.seconds + action.timeout.nanos / 1e9
    if seconds < 0:
        raise InvalidArgument(f"action timeout {seconds}s is negative")
    if seconds > max_timeout:
        raise InvalidArgument(
            f"action timeout {seconds:.0f}s exceeds this instance's maximum of "
            f"{max_timeout:.0f}s")
    return seconds


def check_room(instance: str, queued: int, max_queued: int) -> None:
    """ResourceExhausted when `queued` jobs leave no room for a new one."""
    if queued >= max_queued:
        raise ResourceExhausted(f"instance {instance!r} has {queued} queued actions, its "
                                "limit; retry later")


def joined_priority(current: int, newcomer: int) -> int:
    """A joined job's priority: the more urgent (lower) of the two."""
    return min(current, newcomer)
