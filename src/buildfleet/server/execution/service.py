"""The REAPI Execution service: Execute and WaitExecution.

Execute checks that the Action and Command are in the CAS (FAILED_PRECONDITION
with a PreconditionFailure listing each missing blob otherwise), answers from
the action cache when it can, and otherwise hands the action to the instance's
scheduler and streams the operation until it completes.  The client's
RequestMetadata header (the tool, its invocation, the action's mnemonic and
target) is kept with the operation; a malformed one is INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.longrunning import operations_pb2
from google.protobuf.message import DecodeError

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet.digest import Digest, check_digest_function
from buildfleet.errors import InvalidArgument, NotFound, Unimplemented
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.protos import operation_proto, platform_requirements
from buildfleet.scheduler.rules.invocations import (
    REQUEST_METADATA_HEADER,
    checked_request_metadata,
)
from buildfleet.scheduler.rules.matching import requirements_of
from buildfleet.server import principal
from buildfleet.server.capabilities.service import clamp_priority
from buildfleet.server.instance import Instance, Instances
from buildfleet.server.logstream.metadata import with_stream_names
from buildfleet.server.logstream.store import LogStreams
from buildfleet.server.rpc import add_service, rpc
from buildfleet.storage.action_cache import missing_blobs_error


def parse_command(data: bytes, digest: Digest) -> re_pb2.Command:
    command = re_pb2.Command()
    try:
        command.ParseFromString(data)
    except DecodeError as error:
        raise InvalidArgument(f"command {digest} is not a valid Command") from error
    return command


def _header(context: grpc.aio.ServicerContext, key: str) -> bytes:
    """The value of a binary request header (b"" when absent)."""
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, bytes) else value.encode()
    return b""


def executing_scheduler(instance: Instance) -> SchedulerAPI:
    if instance.scheduler is None:
        raise Unimplemented(f"instance {instance.name!r} is a cache only: it does not "
                            "execute actions")
    return instance.scheduler


def instance_of_operation(name: str) -> str:
    """The instance part of an operation name `<instance>/operations/<id>`."""
    if name.startswith("operations/"):
        return ""
    instance, marker, _ = name.rpartition("/operations/")
    if not marker:
        raise NotFound(f"operation {name!r} does not exist (not an operation name of this "
                       "server)")
    return instance


def scheduler_for_operation(instances: Instances, name: str) -> SchedulerAPI:
    instance_name = instance_of_operation(name)
    instance = instances.by_name.get(instance_name)
    if instance is None or instance.scheduler is None:
        raise NotFound(f"operation {name!r} does not exist (no executing instance "
                       f"{instance_name!r})")
    return instance.scheduler


class ExecutionService(re_grpc.ExecutionServicer):
    FULL_NAME = "build.bazel.remote.execution.v2.Execution"

    def __init__(self, instances: Instances, logs: LogStreams | None = None) -> None:
        self.instances = instances
        self.logs = logs  # names the output streams of executing actions

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self, re_pb2.DESCRIPTOR.services_by_name["Execution"])

    @rpc
    async def Execute(self, request: re_pb2.ExecuteRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> AsyncIterator[operations_pb2.Operation]:
        instance = self.instances.get(request.instance_name)
        scheduler = executing_scheduler(instance)
        check_digest_function(request.digest_function)
        action_digest = Digest.from_proto(request.action_digest, "action_digest")
        metadata = checked_request_metadata(_header(context, REQUEST_METADATA_HEADER))
        action = await instance.cas.get_message(action_digest, re_pb2.Action, "action")
        if action is None:
            raise missing_blobs_error([action_digest], "the action is not in the CAS")
        command_digest = Digest.from_proto(action.command_digest, "action.command_digest")
        input_root = Digest.from_proto(action.input_root_digest, "action.input_root_digest")
        # Reading the command tells whether it is there: one lookup fewer per action.
        command_blob = await instance.cas.get(command_digest)
        missing = [] if command_blob is not None else [command_digest]
        if input_root != command_digest:
            missing += await instance.cas.find_missing([input_root])
        if missing:
            raise missing_blobs_error(missing, "blobs the action needs are not in the CAS")
        assert command_blob is not None
        command = parse_command(command_blob, command_digest)
        if not command.arguments:
            raise InvalidArgument(f"command {command_digest} has no arguments")
        scheduler.check_timeout(action)
        platform = action.platform if action.platform.properties else command.platform
        if not request.skip_cache_lookup and not action.do_not_cache:
            cached = await instance.action_cache.get(action_digest)
            if cached is not None:
                cached = await instance.action_cache.inlined(
                    cached, action_digest, inline_stdout=request.inline_stdout,
                    inline_stderr=request.inline_stderr,
                    inline_paths=request.inline_output_files,
                    limit=int(instance.settings.max_inline_size))
                operation = await scheduler.record_cache_hit(
                    action_digest, cached, owner=principal.owner(), request_metadata=metadata)
                yield operation_proto(operation)
                return
        operation = await scheduler.submit(
            action_digest, action,
            requirements_of(platform_requirements(platform), instance.settings.scheduler),
            priority=clamp_priority(request.execution_policy.priority),
            skip_cache_lookup=request.skip_cache_lookup, owner=principal.owner(),
            request_metadata=metadata)
        async for message in scheduler.watch(operation):
            yield with_stream_names(self.logs, request.instance_name, message)

    @rpc
    async def WaitExecution(self, request: re_pb2.WaitExecutionRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[operations_pb2.Operation]:
        scheduler = scheduler_for_operation(self.instances, request.name)
        instance_name = instance_of_operation(request.name)
        operation = await scheduler.get_operation(request.name,
                                                  principal.caller_on(instance_name))
        async for message in scheduler.watch(operation):
            yield with_stream_names(self.logs, instance_name, message)
