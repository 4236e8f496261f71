"""google.longrunning.Operations over the operations of every executing instance."""

from __future__ import annotations

import asyncio
import base64
import bisect
import json
import re
from collections.abc import Callable

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf.empty_pb2 import Empty

from buildfleet.errors import InvalidArgument
from buildfleet.scheduler.model import Operation, Stage
from buildfleet.scheduler.protos import operation_proto
from buildfleet.scheduler.rules.ownership import Caller
from buildfleet.server import principal
from buildfleet.server.execution.service import (
    executing_scheduler,
    instance_of_operation,
    scheduler_for_operation,
)
from buildfleet.server.instance import Instances
from buildfleet.server.logstream.metadata import with_stream_names
from buildfleet.server.logstream.store import LogStreams
from buildfleet.server.rpc import add_service, rpc

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_WAIT = 300.0  # WaitOperation without a timeout or deadline returns after this long
DEADLINE_MARGIN = 0.2  # seconds WaitOperation keeps in hand before the call's deadline
_FILTER = re.compile(r"\s*(stage|done)\s*=\s*(\w+)\s*", re.IGNORECASE)


def _matcher(text: str) -> Callable[[Operation], bool]:
    """A predicate for ListOperations' filter: `stage=QUEUED|EXECUTING|COMPLETED`, `done=…`."""
    if not text.strip():
        return lambda operation: True
    match = _FILTER.fullmatch(text)
    if match is None:
        raise InvalidArgument(f"filter {text!r} is not understood; use stage=QUEUED, "
                              "stage=EXECUTING, stage=COMPLETED, done=true or done=false")
    field, value = match[1].lower(), match[2].upper()
    if field == "done":
        if value not in ("TRUE", "FALSE"):
            raise InvalidArgument(f"filter {text!r}: done must be true or false")
        wanted = value == "TRUE"
        return lambda operation: operation.done == wanted
    if value not in ("QUEUED", "EXECUTING", "COMPLETED"):
        raise InvalidArgument(f"filter {text!r}: stage must be QUEUED, EXECUTING or COMPLETED")
    stage = Stage[value]

    return lambda operation: operation.stage == stage


def _sort_key(operation: Operation) -> tuple[float, str]:
    return operation.created_at, operation.name


def _page_token(instance: str, last: Operation) -> str:
    """A token naming the last operation of a page: the next page starts after it.

    Keyed on the position in the list, not an offset, so that operations
    added or removed between two pages neither repeat nor skip any.
    """
    payload = json.dumps({"v": 2, "i": instance, "t": last.created_at, "n": last.name})
    return base64.urlsafe_b64encode(payload.encode()).decode()


def _after(token: str, instance: str) -> tuple[float, str] | None:
    """The sort key a page token continues after (None: from the start)."""
    if not token:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode()).decode())
        if (not isinstance(payload, dict) or payload.get("v") != 2
                or payload.get("i") != instance):
            raise ValueError("not ours")
        created_at, name = payload["t"], payload["n"]
        if not isinstance(created_at, int | float) or not isinstance(name, str):
            raise ValueError("malformed")
        return float(created_at), name
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise InvalidArgument(f"page_token {token!r:.60} was not issued by this server for "
                              f"instance {instance!r}") from None


def paged(operations: list[Operation], *, instance: str, page_size: int, page_token: str,
          newest_first: bool = False) -> tuple[list[Operation], str]:
    """One page of `operations` in creation order (or newest first) and the token of the
    next page ("" after the last); InvalidArgument for a bad size or token."""
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = _after(page_token, instance)
    ordered = sorted(operations, key=_sort_key, reverse=newest_first)
    if after is None:
        start = 0
    elif newest_first:
        start = next((i for i, op in enumerate(ordered) if _sort_key(op) < after),
                     len(ordered))
    else:
        start = bisect.bisect_right(ordered, after, key=_sort_key)
    page = ordered[start:start + size]
    return page, _page_token(instance, page[-1]) if start + size < len(ordered) else ""


def caller_of_operation(name: str) -> Caller | None:
    """The caller as the scheduler of the operation `name`'s instance sees it."""
    return principal.caller_on(instance_of_operation(name))


class OperationsService(operations_pb2_grpc.OperationsServicer):
    FULL_NAME = "google.longrunning.Operations"

    def __init__(self, instances: Instances, logs: LogStreams | None = None) -> None:
        self.instances = instances
        self.logs = logs  # names the output streams of executing actions

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self, operations_pb2.DESCRIPTOR.services_by_name["Operations"])

    @rpc
    async def GetOperation(self, request: operations_pb2.GetOperationRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        scheduler = scheduler_for_operation(self.instances, request.name)
        operation = await scheduler.get_operation(request.name, caller_of_operation(request.name))
        principal.note_admin(f"read operation {request.name!r}", operation.owner)
        return with_stream_names(self.logs, operation.instance, operation_proto(operation))

    @rpc
    async def ListOperations(self, request: operations_pb2.ListOperationsRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext
                             ) -> operations_pb2.ListOperationsResponse:
        """Operations of the instance named by `name`, oldest first, paged."""
        scheduler = executing_scheduler(self.instances.get(request.name))
        caller = principal.caller_on(request.name)
        matches = _matcher(request.filter)
        selected = [op for op in await scheduler.list_operations(caller) if matches(op)]
        page, token = paged(selected, instance=request.name, page_size=request.page_size,
                            page_token=request.page_token)
        if caller is not None and caller.admin:
            principal.note_admin(f"listed the operations of instance {request.name!r}", "*")
        return operations_pb2.ListOperationsResponse(
            operations=[operation_proto(op) for op in page], next_page_token=token)

    @rpc
    async def CancelOperation(self, request: operations_pb2.CancelOperationRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> Empty:
        scheduler = scheduler_for_operation(self.instances, request.name)
        caller = caller_of_operation(request.name)
        owner = (await scheduler.get_operation(request.name, caller)).owner
        await scheduler.cancel_operation(request.name, caller)
        principal.note_admin(f"cancelled operation {request.name!r}", owner)
        return Empty()

    @rpc
    async def DeleteOperation(self, request: operations_pb2.DeleteOperationRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> Empty:
        scheduler = scheduler_for_operation(self.instances, request.name)
        caller = caller_of_operation(request.name)
        owner = (await scheduler.get_operation(request.name, caller)).owner
        await scheduler.delete_operation(request.name, caller)
        principal.note_admin(f"deleted operation {request.name!r}", owner)
        return Empty()

    @rpc
    async def WaitOperation(self, request: operations_pb2.WaitOperationRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        """The operation once done, or as it stands when the timeout or deadline is near."""
        scheduler = scheduler_for_operation(self.instances, request.name)
        caller = caller_of_operation(request.name)
        operation = await scheduler.get_operation(request.name, caller)
        limit = MAX_WAIT
        if request.HasField("timeout"):
            # Plain arithmetic: a Duration beyond what timedelta holds is still valid input.
            seconds = request.timeout.seconds + request.timeout.nanos / 1e9
            if seconds < 0:
                raise InvalidArgument(f"timeout {seconds:g}s is negative")
            limit = min(limit, seconds)
        remaining = context.time_remaining()
        if remaining is not None:
            # Answer before the client gives up, with room for a loaded machine.
            limit = min(limit, remaining - max(remaining * 0.1, DEADLINE_MARGIN))
        try:
            async with asyncio.timeout(max(limit, 0)):
                async for snapshot in scheduler.watch(operation):
                    if snapshot.done:
                        return snapshot
        except TimeoutError:
            pass
        # As it stands now (the scheduler may keep only a snapshot in `operation`).
        return operation_proto(await scheduler.get_operation(request.name, caller))
