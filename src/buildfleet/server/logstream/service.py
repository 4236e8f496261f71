"""The LogStream service (build.bazel.remote.logstream.v1): creates log streams.

The streams themselves are read and written through the ByteStream service
(`buildfleet.server.bytestream.service` hands log stream names to
`buildfleet.server.logstream.store`).  CreateLogStream's `parent` is the name of
one of the server's instances; with authentication on, creating a stream (and
writing to it) needs the `bot` role on that instance.
"""

from __future__ import annotations

import grpc

from buildfleet._proto.build.bazel.remote.logstream.v1 import (
    remote_logstream_pb2 as ls_pb2,
)
from buildfleet._proto.build.bazel.remote.logstream.v1 import (
    remote_logstream_pb2_grpc as ls_grpc,
)
from buildfleet.server.instance import Instances
from buildfleet.server.logstream.store import LogStreams
from buildfleet.server.rpc import add_service, rpc


class LogStreamService(ls_grpc.LogStreamServiceServicer):
    FULL_NAME = "build.bazel.remote.logstream.v1.LogStreamService"

    def __init__(self, instances: Instances, streams: LogStreams) -> None:
        self.instances = instances
        self.streams = streams

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self, ls_pb2.DESCRIPTOR.services_by_name["LogStreamService"])

    @rpc
    async def CreateLogStream(self, request: ls_pb2.CreateLogStreamRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> ls_pb2.LogStream:
        self.instances.get(request.parent)  # an unknown instance is INVALID_ARGUMENT
        name, write_name = self.streams.create(request.parent)
        return ls_pb2.LogStream(name=name, write_resource_name=write_name)
