"""Domain errors and the single place where they become gRPC statuses.

The storage layer, the scheduler and the services raise the exceptions below.
`grpc_error_boundary` (see buildfleet.server.rpc) turns them into a gRPC status
with the message and optional google.rpc details; anything else becomes
INTERNAL with a generic message, and the traceback goes to the server log only.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import Message


class BuildfleetError(Exception):
    """An error that maps onto one gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, details: list[Message] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: list[Message] = details or []


class InvalidArgument(BuildfleetError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BuildfleetError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(BuildfleetError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(BuildfleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(BuildfleetError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(BuildfleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(BuildfleetError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(BuildfleetError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(BuildfleetError):
    code = grpc.StatusCode.ABORTED


class Cancelled(BuildfleetError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(BuildfleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(BuildfleetError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DataCorrupted(BuildfleetError):
    """Stored bytes no longer match their digest; callers treat the blob as missing."""

    code = grpc.StatusCode.DATA_LOSS
