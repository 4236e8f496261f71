"""The one place where domain errors become gRPC statuses.

Every servicer method is wrapped with `@rpc`.  A `BuildfleetError` becomes its
status code, its message and (as ``grpc-status-details-bin``) its google.rpc
details; any other exception is logged with its traceback and answered as
INTERNAL with a generic message, so no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc import status_pb2

from buildfleet.errors import BuildfleetError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

DETAILS_KEY = "grpc-status-details-bin"


def status_proto(error: BuildfleetError) -> status_pb2.Status:
    """The google.rpc.Status for a domain error."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    for detail in error.details:
        packed = AnyProto()
        packed.Pack(detail)
        status.details.append(packed)
    return status


async def abort(context: grpc.aio.ServicerContext, error: BuildfleetError) -> NoReturn:
    if error.details:
        context.set_trailing_metadata(((DETAILS_KEY, status_proto(error).SerializeToString()),))
    await context.abort(error.code, error.message)
    raise AssertionError("unreachable")  # context.abort always raises


async def _handle(context: grpc.aio.ServicerContext, error: Exception, name: str) -> NoReturn:
    if isinstance(error, BuildfleetError):
        await abort(context, error)
    log.exception("unexpected error in %s", name, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error in {name}; the server log has the details")
    raise AssertionError("unreachable")


_PASS_THROUGH = (asyncio.CancelledError, grpc.aio.AbortError)


def rpc(func: F) -> F:
    """Wrap a servicer method (coroutine or async generator) with the error mapping."""
    name = func.__qualname__
    if inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        async def stream(self: object, request: object,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            try:
                async for item in func(self, request, context):
                    yield item
            except _PASS_THROUGH:
                raise
            except Exception as error:
                await _handle(context, error, name)

        return cast(F, stream)

    @functools.wraps(func)
    async def unary(self: object, request: object, context: grpc.aio.ServicerContext) -> object:
        try:
            return await func(self, request, context)
        except _PASS_THROUGH:
            raise
        except Exception as error:
            await _handle(context, error, name)

    return cast(F, unary)
