"""Serving a servicer: one place for request decoding, error mapping and metrics.

``add_servicer`` builds the method handlers from the service's descriptor
instead of the generated ``add_*_to_server``, so that for every method of every
service:

- a request that is not a valid message of the method's type becomes
  INVALID_ARGUMENT (grpc would report an unhelpful UNKNOWN/INTERNAL);
- a ``DomainError`` raised anywhere below becomes its canonical status with a
  ``google.rpc.ErrorInfo`` (reason, domain, metadata naming the field) and a
  ``google.rpc.BadRequest`` field violation when a field is named;
- an unexpected exception is logged with its traceback and reported as
  INTERNAL: a bug to fix, never a silent crash;
- RPC counts and latencies go to Prometheus.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.common.errors import ERROR_DOMAIN, DomainError, InvalidArgument, Unavailable
from services.common.metrics import RPC_SECONDS, RPC_TOTAL, STREAMS_OPEN

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# gRFC A6: a negative pushback tells the client not to retry this answer.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class OpenStreams:
    """The tasks serving streaming RPCs, so a draining server can end them
    with UNAVAILABLE (clients reconnect elsewhere) instead of waiting out the
    grace period."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False

    def drain(self) -> None:
        self.draining = True
        for task in list(self.tasks):
            task.cancel()


class _Undecodable:
    """Stands in for a request whose bytes did not parse as the method's type."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _safe_deserializer(message_cls: Any) -> Callable[[bytes], Any]:
    parse = message_cls.FromString
    type_name = message_cls.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:
            return _Undecodable(type_name)

    return deserialize


def status_for(error: DomainError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, Any], ...]]:
    """The status code, message and trailing metadata for a domain error."""
    code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    details = [info]
    if error.field:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=error.field, description=error.message
                    )
                ]
            )
        )
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code, code_pb2.UNKNOWN), message=error.message
    )
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    trailers: list[tuple[str, Any]] = [(STATUS_DETAILS_KEY, status.SerializeToString())]
    if isinstance(error, Unavailable):
        trailers.append((RETRY_PUSHBACK_KEY, "-1"))
    return code, error.message, tuple(trailers)


async def abort(context: grpc.aio.ServicerContext, error: DomainError) -> None:
    code, message, trailers = status_for(error)
    await context.abort(code, message, trailing_metadata=trailers)


def _bad_request(req: _Undecodable) -> InvalidArgument:
    return InvalidArgument(
        f"request is not a valid {req.type_name} message",
        field="request",
        reason="UNDECODABLE_REQUEST",
    )


async def _checked_requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise _bad_request(request)
        yield request


class _Counters(dict[str, Any]):
    """Per-code RPC counters of one method, created on first use."""

    def __init__(self, service: str, method: str) -> None:
        super().__init__()
        self.service = service
        self.method = method

    def __missing__(self, code: str) -> Any:
        counter = self[code] = RPC_TOTAL.labels(self.service, self.method, code)
        return counter


class _Observe:
    """Counts one RPC and times it (unary only)."""

    __slots__ = ("_counters", "_histogram", "_start")

    def __init__(self, counters: _Counters, histogram: Any) -> None:
        self._counters = counters
        self._histogram = histogram
        self._start = time.perf_counter()

    def done(self, code: str) -> None:
        if self._histogram is not None:
            self._histogram.observe(time.perf_counter() - self._start)
        self._counters[code].inc()


def _code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:
        return grpc.StatusCode(code).name  # type: ignore[call-arg]
    except Exception:
        return "UNKNOWN"


async def _fail(
    context: grpc.aio.ServicerContext, observed: _Observe, exc: BaseException, label: str
) -> None:
    """Aborts the RPC with the status for ``exc`` (always raises AbortError)."""
    if isinstance(exc, DomainError):
        observed.done(exc.code)
        await abort(context, exc)
    log.exception("unexpected error in %s", label, exc_info=exc)
    observed.done("INTERNAL")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {label}; see the service log")


def _wrap(
    service_label: str,
    method_name: str,
    fn: Callable[..., Any],
    client_streaming: bool,
    server_streaming: bool,
    streams: OpenStreams,
) -> Callable[..., Any]:
    counters = _Counters(service_label, method_name)
    counters["OK"]  # exported from the start, so a scrape shows the method exists
    histogram = (
        None
        if (client_streaming or server_streaming)
        else RPC_SECONDS.labels(service_label, method_name)
    )
    open_streams = STREAMS_OPEN.labels(service_label, method_name)
    where = f"{service_label}/{method_name}"

    if not client_streaming and not server_streaming:

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            observed = _Observe(counters, histogram)
            try:
                if isinstance(request, _Undecodable):
                    raise _bad_request(request)
                response = await fn(request, context)
            except grpc.aio.AbortError:
                observed.done(_code_of(context))
                raise
            except asyncio.CancelledError:
                observed.done("CANCELLED")
                raise
            except Exception as exc:
                await _fail(context, observed, exc, where)
                raise  # unreachable: _fail aborts
            observed.done("OK")
            return response

        return unary_unary

    if client_streaming and not server_streaming:

        async def stream_unary(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> Any:
            async with _StreamGuard(
                context, _Observe(counters, None), streams, open_streams, where
            ):
                return await fn(_checked_requests(requests), context)

        return stream_unary

    if inspect.isasyncgenfunction(fn):

        async def streaming(
            request_or_requests: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async with _StreamGuard(
                context, _Observe(counters, None), streams, open_streams, where
            ):
                if client_streaming:
                    source = fn(_checked_requests(request_or_requests), context)
                else:
                    if isinstance(request_or_requests, _Undecodable):
                        raise _bad_request(request_or_requests)
                    source = fn(request_or_requests, context)
                async for item in source:
                    yield item

        return streaming

    # A coroutine handler drives its stream with context.read()/write() (see
    # read_request): no wrapper layer per message, for the hottest streams.
    async def driven(request_or_requests: Any, context: grpc.aio.ServicerContext) -> None:
        async with _StreamGuard(context, _Observe(counters, None), streams, open_streams, where):
            if not client_streaming and isinstance(request_or_requests, _Undecodable):
                raise _bad_request(request_or_requests)
            await fn(request_or_requests, context)

    return driven


class _StreamGuard:
    """Error mapping and accounting around one streaming RPC."""

    __slots__ = ("_context", "_label", "_observed", "_open_streams", "_streams", "_task")

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        observed: _Observe,
        streams: OpenStreams,
        open_streams: Any,
        label: str,
    ) -> None:
        self._context = context
        self._observed = observed
        self._streams = streams
        self._open_streams = open_streams
        self._label = label
        self._task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> None:
        self._open_streams.inc()
        self._task = asyncio.current_task()
        if self._task is not None:
            self._streams.tasks.add(self._task)

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._open_streams.dec()
        if self._task is not None:
            self._streams.tasks.discard(self._task)
        if exc is None:
            self._observed.done("OK")
        elif isinstance(exc, grpc.aio.AbortError):
            self._observed.done(_code_of(self._context))
        elif isinstance(exc, GeneratorExit):
            self._observed.done("CANCELLED")  # the client went away; nothing to send
        elif isinstance(exc, asyncio.CancelledError):
            if self._streams.draining:
                self._observed.done("UNAVAILABLE")
                service = self._label.split("/", 1)[0]
                await self._context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"{service} is shutting down; reconnect"
                )
            self._observed.done("CANCELLED")
        elif isinstance(exc, Exception):
            await _fail(self._context, self._observed, exc, self._label)
        return False


async def read_request(context: grpc.aio.ServicerContext) -> Any:
    """The next request of a stream driven with context.read(), or None at its
    end; a request that does not decode is INVALID_ARGUMENT."""
    request = await context.read()
    if request is grpc.aio.EOF:
        return None
    if isinstance(request, _Undecodable):
        raise _bad_request(request)
    return request


def add_servicer(
    server: grpc.aio.Server,
    servicer: Any,
    service: ServiceDescriptor,
    *,
    label: str,
    streams: OpenStreams | None = None,
) -> None:
    """Registers every method of ``service`` implemented by ``servicer``."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    streams = streams if streams is not None else OpenStreams()
    for method in service.methods:
        fn = getattr(servicer, method.name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        wrapped = _wrap(
            label, method.name, fn, method.client_streaming, method.server_streaming, streams
        )
        deserializer = _safe_deserializer(request_cls)
        serializer = response_cls.SerializeToString
        if method.client_streaming and method.server_streaming:
            factory = grpc.stream_stream_rpc_method_handler
        elif method.client_streaming:
            factory = grpc.stream_unary_rpc_method_handler
        elif method.server_streaming:
            factory = grpc.unary_stream_rpc_method_handler
        else:
            factory = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = factory(
            wrapped, request_deserializer=deserializer, response_serializer=serializer
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
