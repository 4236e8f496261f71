"""Wrapping a gRPC method handler, whatever its shape, so that something runs when a
call starts and when it ends: the one way the server's interceptors (authorization,
metrics) get around every call.

`wrap(handler, enter)` returns a handler that awaits `enter(request, context)` before
the method runs -- with the request for a unary request, the first request of a
client stream, None for a bidirectional stream -- and, when `enter` returns a
callback, calls it with the call's exception (None when it succeeded) once the call
is over: for a response stream, when the stream ends.  `enter` may end the call
itself (context.abort).  `Interceptor` keeps one wrapped handler per method.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

Finish = Callable[[BaseException | None], None]
Enter = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Finish | None]]


class Interceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps the handler of each method once (the services
    return the same handler object every time) with `self.enter_for(method)`."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def enter_for(self, method: str) -> Enter | None:
        """What to run around calls of `method` (None: leave it alone)."""
        raise NotImplementedError

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None:
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        enter = self.enter_for(method)
        wrapped = handler if enter is None else wrap(handler, enter)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def wrap(handler: grpc.RpcMethodHandler, enter: Enter) -> grpc.RpcMethodHandler:
    options = {"request_deserializer": handler.request_deserializer,
               "response_serializer": handler.response_serializer}

    async def one(request: Any, context: grpc.aio.ServicerContext,
                  call: Callable[[Any], Awaitable[Any]]) -> Any:
        with _ending(await enter(request, context)):
            return await call(request)

    async def many(request: Any, context: grpc.aio.ServicerContext,
                   stream: Callable[[Any], AsyncIterator[Any]]) -> AsyncIterator[Any]:
        with _ending(await enter(request, context)):
            async for response in stream(request):
                yield response

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await one(request, context, lambda r: inner_uu(r, context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, **options)
    if handler.unary_stream is not None and inspect.iscoroutinefunction(
            handler.unary_stream):  # a stream written with context.write()
        inner_uw = handler.unary_stream

        async def unary_writes(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await one(request, context, lambda r: inner_uw(r, context))

        return grpc.unary_stream_rpc_method_handler(unary_writes, **options)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[Any]:
            async for response in many(request, context, lambda r: inner_us(r, context)):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> Any:
            first = await anext(aiter(requests), None)
            return await one(first, context,
                             lambda r: inner_su(_prepend(r, requests), context))

        return grpc.stream_unary_rpc_method_handler(stream_unary, **options)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in many(None, context, lambda _: inner_ss(requests, context)):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, **options)


@contextlib.contextmanager
def _ending(finish: Finish | None) -> Iterator[None]:
    """Tell `finish` how the block ended (its exception, or None)."""
    try:
        yield
    except BaseException as error:
        if finish is not None:
            finish(error)
        raise
    if finish is not None:
        finish(None)


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is None:
        return
    yield first
    async for item in rest:
        yield item
