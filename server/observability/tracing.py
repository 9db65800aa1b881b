"""OpenTelemetry traces (docs/tracing.md), on when OTEL_EXPORTER_OTLP_ENDPOINT (or its _TRACES_
form) is set: a span per RPC on either edge (gRPC's by the official grpc.aio instrumentation,
the HTTP edge's by `asgi` here; both in the caller's trace, from its `traceparent`), tagged with
the request id by the call pipeline; a child span for the domain call; one for each SQL call
(the official asyncpg instrumentation, or the Supabase transport's own); and for each generation
attempt, a span in the trace of the CreateGeneration that queued it (its `traceparent` is stored
with the job).

Off, nothing is imported from the SDK and nothing is patched: the hot path reads `active` and
goes on. The provider is this module's own, never OpenTelemetry's global one, so a process can
start and stop tracing (the tests do) and nothing else in it is traced by accident. The SDK reads
the standard variables itself (OTEL_EXPORTER_OTLP_*, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_TRACES_SAMPLER, OTEL_BSP_*); OTEL_PROPAGATORS chooses how context is read from requests.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

from server.observability.calls import CallRecord, current_call

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import SpanKind, Tracer

    from server.edges.http import ASGIApp, Message, Receive, Scope, Send

T = TypeVar("T")

# Read on the hot path: while False, no call does any tracer work.
active = False
_provider: TracerProvider | None = None
_tracer: Tracer | None = None

TRACER_NAME = "credits"
REQUEST_ID = "credits.request_id"
REASON = "credits.error_reason"
CODE = "credits.status_code"
GENERATION_ID = "credits.generation_id"
TRACEPARENT = "traceparent"
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_OFF: AbstractContextManager[None] = contextlib.nullcontext()


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether `environ` asks for traces: an OTLP endpoint, and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(_endpoint(environ))


def _endpoint(environ: Mapping[str, str]) -> str:
    """The OTLP endpoint spans go to ("" when none is set)."""
    return next((environ[n].strip() for n in _ENDPOINTS if environ.get(n, "").strip()), "")


class Tracing:
    """Tracing as one `start` turned it on; `stop` flushes what is left and turns it off."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    def stop(self) -> None:
        global active, _provider, _tracer
        if _provider is not self.provider:
            return
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        active, _provider, _tracer = False, None, None
        AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
        self.provider.shutdown()  # exports the spans still batched


def start(exporter: SpanExporter | None = None) -> Tracing | None:
    """Tracing turned on if the environment asks for it (`wanted`) and it is not on already:
    spans go to `exporter` (default: OTLP by OTEL_EXPORTER_OTLP_PROTOCOL, `http/protobuf` or
    `grpc`). None when this call turned nothing on. ValueError for an unknown protocol."""
    global active, _provider, _tracer
    if active or not wanted(os.environ):
        return None
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = exporter or _otlp_exporter()
    provider = TracerProvider(resource=_resource(), sampler=_sampler())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _provider, _tracer = provider, provider.get_tracer(TRACER_NAME)
    active = True
    return Tracing(provider)


def describe(environ: Mapping[str, str]) -> str:
    """Whether spans are exported and where, in one line (`credits check-config`): the
    endpoint's scheme, host and port only, never its credentials. ValueError for a protocol
    the service does not export, as `start` raises it."""
    endpoint = _endpoint(environ)
    if not endpoint:
        return "off (OTEL_EXPORTER_OTLP_ENDPOINT is not set)"
    if not wanted(environ):
        return "off (OTEL_SDK_DISABLED or OTEL_TRACES_EXPORTER turns it off)"
    protocol = _protocol(environ)
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.netloc.rpartition("@")[2]  # without user and password
    where = f"{parts.scheme}://{host}" if host else "its endpoint"
    return f"on: OTLP {protocol} to {where}"


def _protocol(environ: Mapping[str, str]) -> str:
    protocol = next((environ[n] for n in _PROTOCOLS if environ.get(n)), "http/protobuf")
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: the service exports `http/protobuf` or"
            " `grpc`"
        )
    return protocol


def _otlp_exporter() -> SpanExporter:
    if _protocol(os.environ) == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter()


def _resource() -> Any:
    """The SDK's resource from the environment, named `credits` unless it names itself."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "credits"}))
    return resource


def _sampler() -> Any:
    """OTEL_TRACES_SAMPLER's sampler (default: parent-based, always on), except that a client
    span with no parent is dropped: the SQL of a worker polling for jobs, the sweeper or the
    health probe would otherwise each make a trace of one span, many times a second."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import sampling

    configured = sampling._get_from_env_or_default()  # what TracerProvider() would use

    class WithinTraces(sampling.Sampler):
        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Any = None,
            links: Sequence[Any] | None = None,
            trace_state: Any = None,
        ) -> sampling.SamplingResult:
            parent = trace.get_current_span(parent_context).get_span_context()
            if kind is trace.SpanKind.CLIENT and not parent.is_valid:
                return sampling.SamplingResult(sampling.Decision.DROP)
            return configured.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"WithinTraces{{{configured.get_description()}}}"

    return WithinTraces()


# The edges


def grpc_interceptors(public: Callable[[str], bool]) -> list[Any] | None:
    """The grpc.aio server's interceptors: a span per RPC (not for the `public` methods:
    health, reflection), with the caller's trace context. None while off: grpc.aio then runs
    no interceptor chain at all."""
    if _provider is None:
        return None
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [
        aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=_provider, filter_=lambda details: not public(details.method)
        )
    ]


def asgi(app: ASGIApp, untraced_path: str) -> ASGIApp:
    """`app` (the HTTP edge) with a span per HTTP request but those for `untraced_path`
    (/healthz), in the caller's trace (OTEL_PROPAGATORS: `traceparent`); `app` itself while off.

    Our own few lines rather than opentelemetry-instrumentation-asgi: that package brings
    asgiref, whose types the connectrpc runtime then declares its applications with, and they
    no longer type-check as the plain ASGI callables the edge routes to."""
    tracer = _tracer
    if tracer is None:
        return app
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode

    async def traced(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == untraced_path:
            await app(scope, receive, send)
            return
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": scope["path"]}
        with tracer.start_as_current_span(
            method,  # renamed after the RPC once the call pipeline knows it is one
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:

            async def answer(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status: int = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await app(scope, receive, answer)

    return traced


def opened(record: CallRecord) -> None:
    """The RPC's span (the edge's) tagged with the call's request id; the Connect edge's HTTP
    span is named after the RPC too, as gRPC's is."""
    from opentelemetry import trace

    span = trace.get_current_span()
    span.set_attribute(REQUEST_ID, record.request_id)
    if record.protocol == "connect":
        service, _, method = record.method.strip("/").partition("/")
        span.update_name(record.method)
        span.set_attributes(
            {"rpc.system": "connect_rpc", "rpc.service": service, "rpc.method": method}
        )


def ended(record: CallRecord) -> None:
    """How the call ended, on its span: the status code and the ErrorInfo reason, if any."""
    from opentelemetry import trace

    span = trace.get_current_span()
    span.set_attribute(CODE, record.code.name)
    if record.reason:
        span.set_attribute(REASON, record.reason)


def domain(call: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    """`call` (what the servicer does for the RPC) run in a span of its own."""
    record = current_call()
    name = f"domain {record.method.rpartition('/')[2]}" if record else "domain"

    async def spanned() -> T:
        assert _tracer is not None
        with _tracer.start_as_current_span(name):
            return await call()

    return spanned


# Below the edges


def span(
    name: str, attributes: Mapping[str, str | int] | None = None, *, client: bool = False
) -> AbstractContextManager[Any]:
    """A span of the current trace around a block (a client span for a call out of the
    process: SQL, a provider); a context that does nothing while off."""
    if _tracer is None:
        return _OFF
    from opentelemetry.trace import SpanKind

    kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
    return _tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def traceparent() -> str | None:
    """The current span's context as a W3C `traceparent`, to be stored with work done later;
    None while off or outside a span."""
    if not active:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get(TRACEPARENT)


def job(
    parent: str | None, name: str, attributes: Mapping[str, str | int]
) -> AbstractContextManager[Any]:
    """A span for one attempt of queued work, a child of the span whose `traceparent` was
    stored with it (a trace of its own without one); a context that does nothing while off."""
    if _tracer is None:
        return _OFF
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({TRACEPARENT: parent} if parent else {})
    return _tracer.start_as_current_span(
        name, context=context, kind=SpanKind.CONSUMER, attributes=attributes
    )
