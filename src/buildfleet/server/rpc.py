"""The one place where domain errors become gRPC statuses.

Every servicer method is wrapped with `@rpc`.  A `BuildfleetError` becomes its
status code, its message and (as ``grpc-status-details-bin``) its google.rpc
details; any other exception is logged with its traceback and answered as
INTERNAL with a generic message, so no traceback ever reaches a client.

Services register with `add_service` rather than the generated
``add_*Servicer_to_server``: request bytes that do not parse as the request
message then reach the method as `Undecodable`, which `@rpc` answers with
INVALID_ARGUMENT.  (gRPC itself would answer UNKNOWN, quoting the parser's
exception, or INTERNAL for a client stream.)
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf import message_factory
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc._cython import cygrpc

from buildfleet.errors import BuildfleetError, InvalidArgument

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


# Left to gRPC: cancellation, aborts, and the end of a call cut short by the server
# stopping (gRPC ends those calls itself).
_SERVER_STOPPED: type[BaseException] = getattr(cygrpc, "_ServerStoppedError",
                                               asyncio.CancelledError)
_PASS_THROUGH = (asyncio.CancelledError, grpc.aio.AbortError, _SERVER_STOPPED)
# What a write into a call raises once the client has gone (cancelled, disconnected).
_CLIENT_GONE = cygrpc.ExecuteBatchError


def _client_gone(name: str) -> NoReturn:
    """End a call whose client has gone as a cancellation: nobody is left to answer,
    and it is no error of the method (gRPC would log it as one with a traceback)."""
    log.debug("%s: the client went away", name)
    raise asyncio.CancelledError


class Undecodable:
    """Stands for a request message whose bytes did not parse (see `add_service`)."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid {self.type_name}: its bytes do "
                               "not parse as that protobuf message")


def _lenient_parser(message_type: type[Message]) -> Callable[[bytes], object]:
    type_name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except Exception:  # DecodeError, or a nesting the parser refuses
            return Undecodable(type_name)

    return parse


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _serializer(response_type: type[Message]) -> Callable[[Message | bytes], bytes]:
    """Serializes responses, passing through those a method already encoded (bytes)."""
    serialize = response_type.SerializeToString

    def serializer(response: Message | bytes) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serializer


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Register `servicer`'s methods for `service` (like the generated
    ``add_*Servicer_to_server``), parsing requests leniently: see the module docstring."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        factory: Any = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=_lenient_parser(request_type),
            response_serializer=_serializer(response_type))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _checked(request: Any) -> Any:
    """The request, with undecodable messages turned into INVALID_ARGUMENT."""
    if isinstance(request, Undecodable):
        raise request.error()
    if not isinstance(request, Message) and hasattr(request, "__aiter__"):
        return _checked_stream(request)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error()
        yield request


def rpc(func: F) -> F:
    """Wrap a servicer method (coroutine or async generator) with the error mapping."""
    name = func.__qualname__
    if inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        async def stream(self: object, request: object,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            try:
                async for item in func(self, _checked(request), context):
                    yield item
            except _PASS_THROUGH:
                raise
            except _CLIENT_GONE:
                _client_gone(name)
            except Exception as error:
                await _handle(context, error, name)

        return cast(F, stream)

    @functools.wraps(func)
    async def unary(self: object, request: object, context: grpc.aio.ServicerContext) -> object:
        try:
            return await func(self, _checked(request), context)
        except _PASS_THROUGH:
            raise
        except _CLIENT_GONE:
            _client_gone(name)
        except Exception as error:
            await _handle(context, error, name)

    return cast(F, unary)
