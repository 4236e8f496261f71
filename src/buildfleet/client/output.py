"""An operation's output for a terminal (`buildfleet ops logs`): the live log stream
while the action runs (ExecuteOperationMetadata names it), the result's
stdout/stderr once it is done."""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc

SNAPSHOT_WAIT = 1.0  # seconds a read without --follow waits for what is there now


def _metadata(operation: operations_pb2.Operation) -> re_pb2.ExecuteOperationMetadata:
    metadata = re_pb2.ExecuteOperationMetadata()
    operation.metadata.Unpack(metadata)
    return metadata


def _stream_of(operation: operations_pb2.Operation, which: str) -> str:
    metadata = _metadata(operation)
    return metadata.stdout_stream_name if which == "stdout" else metadata.stderr_stream_name


def instance_of(name: str) -> str:
    instance, marker, _ = name.rpartition("/operations/")
    return instance if marker else ""


async def print_output(channel: grpc.aio.Channel, name: str, which: str, follow: bool,
                       out: BinaryIO, note: Callable[[str], None]) -> None:
    """Copy the `which` ("stdout" or "stderr") output of operation `name` to `out`."""
    operations = operations_pb2_grpc.OperationsStub(channel)
    bytestream = bs_grpc.ByteStreamStub(channel)
    operation = await operations.GetOperation(operations_pb2.GetOperationRequest(name=name),
                                              timeout=30)
    stream = _stream_of(operation, which) if not operation.done else ""
    if not operation.done and not stream and follow:  # wait for it to start, or end
        async for update in re_grpc.ExecutionStub(channel).WaitExecution(
                re_pb2.WaitExecutionRequest(name=name)):
            operation = update
            stream = _stream_of(update, which) if not update.done else ""
            if update.done or stream:
                break
    if not operation.done:
        if not stream:
            note(f"operation {name} has not started (or its output is not streamed): "
                 "nothing to show yet" + ("" if follow else "; --follow waits for it"))
            return
        read = bytestream.Read(bs_pb2.ReadRequest(resource_name=stream),
                               timeout=None if follow else SNAPSHOT_WAIT)
        try:
            async for response in read:
                out.write(response.data)
                out.flush()
        except grpc.aio.AioRpcError as error:
            if follow or error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        return
    response = re_pb2.ExecuteResponse()
    operation.response.Unpack(response)
    if not response.HasField("result"):
        note(f"operation {name} ended without a result: {response.status.message}")
        return
    result = response.result
    raw = result.stdout_raw if which == "stdout" else result.stderr_raw
    digest = result.stdout_digest if which == "stdout" else result.stderr_digest
    if raw or not digest.size_bytes:
        out.write(raw)
        out.flush()
        return
    instance = instance_of(name)
    prefix = f"{instance}/" if instance else ""
    async for piece in bytestream.Read(bs_pb2.ReadRequest(
            resource_name=f"{prefix}blobs/{digest.hash}/{digest.size_bytes}"), timeout=60):
        out.write(piece.data)
    out.flush()
