"""Traces (docs/tracing.md), collected with the SDK's in-memory exporter from a real server on
127.0.0.1:0 over the session's PostgreSQL, through both transports: a span per RPC on either
edge, tagged with the request id and in the caller's trace (`traceparent`); the domain call and
the SQL calls beneath it; a generation's attempt in the trace of the CreateGeneration that
queued it; and nothing at all when OTEL_EXPORTER_OTLP_ENDPOINT is unset."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import asyncpg
import grpc.aio
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from credits.v1 import credit_service_pb2 as cpb
from credits.v1 import credit_service_pb2_grpc, generation_service_pb2_grpc
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from server import checks
from server.config import Settings
from server.observability import tracing
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.connect import Connect
from tests.fixtures.errors import failure
from tests.fixtures.server import TRANSPORTS, settings_for
from tests.fixtures.workers import SUCCEEDED, funded, owner_connection, running_workers

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
DEBIT = "/credits.v1.CreditService/DebitCredits"
BALANCE = "/credits.v1.CreditService/GetBalance"
CREATE = "/credits.v1.GenerationService/CreateGeneration"


class Spans:
    """The spans the traced server finished, as the exporter received them."""

    def __init__(self, exporter: InMemorySpanExporter, traced: tracing.Tracing) -> None:
        self._exporter = exporter
        self._traced = traced

    def all(self) -> Sequence[ReadableSpan]:
        self._traced.provider.force_flush()
        return self._exporter.get_finished_spans()

    async def one(self, found: Callable[[ReadableSpan], bool], within: float = 5.0) -> ReadableSpan:
        """The one span `found` picks, waited for: a span ends after its response is sent."""
        deadline = time.monotonic() + within
        while True:
            spans = [span for span in self.all() if found(span)]
            if spans:
                assert len(spans) == 1, spans
                return spans[0]
            assert time.monotonic() < deadline, [span.name for span in self.all()]
            await asyncio.sleep(0.02)

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        return [span for span in self.all() if span.parent and span.parent.span_id == _id(parent)]

    def below(self, parent: ReadableSpan) -> list[ReadableSpan]:
        """Every span under `parent`, at any depth."""
        found = self.children(parent)
        return found + [deeper for child in found for deeper in self.below(child)]


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def _trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def _rpc(method: str, request_id: str) -> Callable[[ReadableSpan], bool]:
    """The RPC span of `method` with `request_id`."""
    return lambda span: (
        span.name == method
        and span.kind is SpanKind.SERVER
        and (span.attributes or {}).get(tracing.REQUEST_ID) == request_id
    )


def _sql_of(spans: Sequence[ReadableSpan], function: str) -> list[ReadableSpan]:
    """The SQL client spans among `spans` that call `function` (asyncpg's name the statement;
    the Supabase transport's, the function)."""
    return [
        span
        for span in spans
        if span.kind is SpanKind.CLIENT
        and (span.attributes or {}).get("db.system") == "postgresql"
        and (span.name == function or function in str((span.attributes or {}).get("db.statement")))
    ]


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spans]:
    """Tracing on, as OTEL_EXPORTER_OTLP_ENDPOINT turns it on, into an in-memory exporter."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    exporter = InMemorySpanExporter()
    traced = tracing.start(exporter)
    assert traced is not None
    assert tracing.active
    try:
        yield Spans(exporter, traced)
    finally:
        traced.stop()
    assert not tracing.active


@pytest.fixture(params=TRANSPORTS)
async def traced_server(
    request: pytest.FixtureRequest, spans: Spans, database_url: str, supabase: FakeSupabase
) -> AsyncIterator[application.Application]:
    """A server started while tracing is on (it builds its edges traced)."""
    app = await application.start(settings_for(request.param, database_url, supabase))
    try:
        yield app
    finally:
        await app.stop(grace=1)


def _headers(request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id), ("traceparent", TRACEPARENT))


async def _debit(app: application.Application, request_id: str, balance: int, amount: int) -> None:
    """DebitCredits of `amount` over gRPC in the caller's trace, by a new user with `balance`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        credits = credit_service_pb2_grpc.CreditServiceStub(channel)
        user = await funded(credits, balance)
        await credits.DebitCredits(
            cpb.DebitCreditsRequest(amount=amount, idempotency_key="traced"),
            metadata=user.metadata + _headers(request_id),
        )


async def test_grpc_call_is_a_span_in_the_callers_trace_with_domain_and_sql_beneath(
    traced_server: application.Application, spans: Spans
) -> None:
    request_id = f"trace-{uuid.uuid4().hex}"
    await _debit(traced_server, request_id, balance=10, amount=3)

    rpc = await spans.one(_rpc(DEBIT, request_id))
    assert _trace(rpc) == TRACE_ID
    assert rpc.parent is not None
    assert rpc.parent.span_id == int(CALLER_SPAN, 16)
    (domain,) = spans.children(rpc)
    assert domain.name == "domain DebitCredits"
    assert _sql_of(spans.below(domain), "credit_debit")
    assert all(_trace(span) == TRACE_ID for span in spans.below(rpc))


async def test_a_traced_failure_keeps_its_status_details_and_notes_its_reason(
    traced_server: application.Application, spans: Spans
) -> None:
    request_id = f"trace-{uuid.uuid4().hex}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _debit(traced_server, request_id, balance=1, amount=5)
    refused = failure(caught.value)
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )
    rpc = await spans.one(_rpc(DEBIT, request_id))
    attributes = rpc.attributes or {}
    assert attributes.get(tracing.REASON) == "INSUFFICIENT_CREDITS"
    assert attributes.get(tracing.CODE) == "FAILED_PRECONDITION"


async def test_connect_call_is_a_span_in_the_callers_trace_with_domain_and_sql_beneath(
    traced_server: application.Application, spans: Spans
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced_server.port}") as channel:
        user = await funded(credit_service_pb2_grpc.CreditServiceStub(channel), 0)
    request_id = f"trace-{uuid.uuid4().hex}"
    async with httpx.AsyncClient() as http:
        connect = Connect(http, f"http://127.0.0.1:{traced_server.http_port}")
        reply = await connect.unary(
            BALANCE,
            cpb.GetBalanceRequest(),
            cpb.GetBalanceResponse,
            headers=dict(user.metadata + _headers(request_id)),
        )
    assert reply.balance == 0

    rpc = await spans.one(_rpc(BALANCE, request_id))
    assert _trace(rpc) == TRACE_ID
    assert (rpc.attributes or {}).get("rpc.system") == "connect_rpc"
    (domain,) = spans.children(rpc)
    assert domain.name == "domain GetBalance"
    assert _sql_of(spans.below(domain), "credit_get_profile")


async def test_generation_attempt_joins_the_trace_of_its_create_generation(
    traced_server: application.Application, spans: Spans, database_url: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{traced_server.port}") as channel:
        credits = credit_service_pb2_grpc.CreditServiceStub(channel)
        generations = generation_service_pb2_grpc.GenerationServiceStub(channel)
        user = await funded(credits, 10)
        request_id = f"trace-{uuid.uuid4().hex}"
        reply = await generations.CreateGeneration(
            gpb.CreateGenerationRequest(model="test-image", prompt="a traced cat", request_id="t"),
            metadata=user.metadata + _headers(request_id),
        )
        generation_id = reply.generation.generation_id
        async with running_workers(traced_server, 1):
            watch = generations.WatchGeneration(
                gpb.WatchGenerationRequest(generation_id=generation_id),
                metadata=user.metadata + _headers(f"watch-{request_id}"),
            )
            states = [reply.generation.state async for reply in watch]  # a traced stream
    assert states[-1] == SUCCEEDED

    create = await spans.one(_rpc(CREATE, request_id))
    (domain,) = spans.children(create)
    async with owner_connection(database_url) as conn:
        kept = await conn.fetchval(
            "select traceparent from public.credit_generations where generation_id = $1",
            uuid.UUID(generation_id),
        )
    assert kept == f"00-{TRACE_ID}-{_id(domain):016x}-01"

    def attempt_of(span: ReadableSpan) -> bool:
        attributes = span.attributes or {}
        return span.name == "generation attempt" and (
            attributes.get(tracing.GENERATION_ID) == generation_id
        )

    attempt = await spans.one(attempt_of)
    assert _trace(attempt) == TRACE_ID
    assert attempt.parent is not None
    assert attempt.parent.span_id == _id(domain)
    below = spans.below(attempt)
    assert [span.name for span in below if span.name == "provider generate"] == [
        "provider generate"
    ]
    assert _sql_of(below, "credit_complete_generation")


async def test_nothing_is_traced_without_an_endpoint(
    monkeypatch: pytest.MonkeyPatch, database_url: str, supabase: FakeSupabase
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    exporter = InMemorySpanExporter()
    assert tracing.start(exporter) is None
    app = await application.start(settings_for("postgres", database_url, supabase))
    try:
        assert app.traces is None
        assert not tracing.active
        assert not hasattr(asyncpg.Connection.fetchval, "__wrapped__")  # not instrumented
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            credits = credit_service_pb2_grpc.CreditServiceStub(channel)
            user = await funded(credits, 5)
            await credits.DebitCredits(
                cpb.DebitCreditsRequest(amount=1, idempotency_key="untraced"),
                metadata=user.metadata + _headers("untraced"),
            )
    finally:
        await app.stop(grace=1)
    assert exporter.get_finished_spans() == ()


def test_tracing_is_wanted_only_with_an_endpoint_and_the_sdk_enabled() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert tracing.wanted(endpoint)
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318"})
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": " "})
    assert not tracing.wanted({**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({**endpoint, "OTEL_TRACES_EXPORTER": "none"})


def test_the_otlp_protocol_is_http_or_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    traced = tracing.start()
    assert traced is not None
    traced.stop()  # nothing was traced: nothing is sent
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        tracing.start()
    assert not tracing.active


def test_check_config_says_where_spans_go_but_never_the_endpoints_credentials() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://user:key@collector.example:4318/v?k=1"}
    assert tracing.describe({}) == "off (OTEL_EXPORTER_OTLP_ENDPOINT is not set)"
    assert tracing.describe(endpoint) == "on: OTLP http/protobuf to https://collector.example:4318"
    grpc_endpoint = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector", **endpoint}
    assert tracing.describe({**grpc_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == (
        "on: OTLP grpc to http://collector"
    )
    assert tracing.describe({**endpoint, "OTEL_SDK_DISABLED": "true"}).startswith("off (")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        tracing.describe({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"})


async def test_check_config_fails_on_a_protocol_serve_would_refuse(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {"SUPABASE_JWT_SECRET": "s" * 40, "CREDITS_DATA_DIR": str(tmp_path)}
    )
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    [fine] = [c for c in await checks.run(settings) if c.name == "tracing"]
    assert (fine.ok, fine.detail) == (True, "on: OTLP grpc to http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")
    [refused] = [c for c in await checks.run(settings) if c.name == "tracing"]
    assert not refused.ok
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='thrift'" in refused.line()


def test_spans_reach_an_otlp_http_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default exporter: OTLP protobuf over HTTP, POSTed to <endpoint>/v1/traces."""
    received: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    collector = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(
            "OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_port}"
        )
        monkeypatch.setenv("OTEL_SERVICE_NAME", "credits-under-test")
        traced = tracing.start()
        assert traced is not None
        with tracing.span("exported"):
            pass
        traced.stop()  # sends what is batched
    finally:
        collector.shutdown()
        collector.server_close()
    [(path, body)] = received
    assert path == "/v1/traces"
    request = ExportTraceServiceRequest.FromString(body)
    [resource_spans] = request.resource_spans
    names = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert names["service.name"] == "credits-under-test"
    assert [s.name for scope in resource_spans.scope_spans for s in scope.spans] == ["exported"]
