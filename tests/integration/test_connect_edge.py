"""The Connect edge of a real server (CREDITS_HTTP_LISTEN): every method over JSON and binary,
WatchGeneration as a Connect server stream, the contract's errors with their details in the
error body, authentication, the request id, and the access log and metrics it shares with the
gRPC edge. CORS, /healthz and the body limit are in test_http_edge.py."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import REGISTRY

from credits.v1 import credit_service_pb2 as cpb
from credits.v1 import generation_pb2, ledger_pb2
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from server.auth.tokens import mint_user_token
from server.observability.logs import JsonFormatter
from tests.fixtures.connect import CODECS, Connect, ConnectFailure, envelope, envelopes
from tests.fixtures.server import SERVICE, TEST_JWT_SECRET, User, new_user

CREDIT = "/credits.v1.CreditService/"
GENERATION = "/credits.v1.GenerationService/"
SERVICES: tuple[ServiceDescriptor, ...] = (
    cpb.DESCRIPTOR.services_by_name["CreditService"],
    gpb.DESCRIPTOR.services_by_name["GenerationService"],
)
MODEL = "test-image"  # tests/fixtures/models.toml: costs 5
QUEUED = generation_pb2.GENERATION_STATE_QUEUED
CANCELLED = generation_pb2.GENERATION_STATE_CANCELLED


def token_of(metadata: tuple[tuple[str, str], ...]) -> str:
    return dict(metadata)["authorization"].removeprefix("Bearer ")


SERVICE_TOKEN = token_of(SERVICE)


def token(user: User) -> str:
    return token_of(user.metadata)


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as client:
        yield client


def base_of(server: application.Application) -> str:
    assert server.http_port is not None, "the test server serves no Connect edge"
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(params=CODECS)
def connect(
    request: pytest.FixtureRequest, server: application.Application, http: httpx.AsyncClient
) -> Connect:
    """Calls to the session's server in JSON, then in binary (test ids say which)."""
    return Connect(http, base_of(server), request.param)


async def funded(connect: Connect, amount: int) -> User:
    """A new user with a profile and `amount` credits."""
    user = new_user()
    await connect.unary(
        CREDIT + "GetBalance", cpb.GetBalanceRequest(), cpb.GetBalanceResponse, token(user)
    )
    await connect.unary(
        CREDIT + "GrantCredits",
        cpb.GrantCreditsRequest(user_id=user.user_id, amount=amount, idempotency_key="seed"),
        cpb.GrantCreditsResponse,
        SERVICE_TOKEN,
    )
    return user


@pytest.mark.parametrize("codec", CODECS)
async def test_every_method_of_both_services_is_served_through_the_pipeline(
    server: application.Application, http: httpx.AsyncClient, codec: str
) -> None:
    """Each method the descriptors declare answers at its path, behind authentication: an empty
    request without a token is UNAUTHENTICATED / TOKEN_MISSING with a request id."""
    connect = Connect(http, base_of(server), codec)
    methods = [(service, method) for service in SERVICES for method in service.methods]
    assert len(methods) >= 16
    for service, method in methods:
        path = f"/{service.full_name}/{method.name}"
        if method.server_streaming:
            response = await http.post(
                connect.base + path,
                content=envelope(b"{}" if codec == "json" else b""),
                headers={"content-type": f"application/connect+{codec}"},
            )
            assert response.status_code == 200, path
            [(_flags, end)] = envelopes(response.content)
            error = json.loads(end)["error"]
        else:
            response = await connect.post(path, b"{}" if codec == "json" else b"")
            assert response.status_code == 401, (path, response.text)
            error = response.json()
        assert error["code"] == "unauthenticated", path
        assert error["details"][0]["type"] == "google.rpc.ErrorInfo", path
        assert response.headers["x-request-id"], path


async def test_unary_calls_of_credit_service(connect: Connect) -> None:
    user = await funded(connect, 100)
    me = token(user)

    balance = await connect.unary(
        CREDIT + "GetBalance", cpb.GetBalanceRequest(), cpb.GetBalanceResponse, me
    )
    assert (balance.user_id, balance.balance, balance.held, balance.available) == (
        user.user_id,
        100,
        0,
        100,
    )
    profile = await connect.unary(
        CREDIT + "GetProfile", cpb.GetProfileRequest(), cpb.GetProfileResponse, me
    )
    assert profile.profile.balance == 100
    check = await connect.unary(
        CREDIT + "CheckCredits", cpb.CheckCreditsRequest(amount=150), cpb.CheckCreditsResponse, me
    )
    assert (check.sufficient, check.shortfall) == (False, 50)

    debit_request = cpb.DebitCreditsRequest(amount=30, idempotency_key="d1", metadata={"k": "v"})
    debit = await connect.unary(
        CREDIT + "DebitCredits", debit_request, cpb.DebitCreditsResponse, me
    )
    assert (debit.balance, debit.replayed, debit.transaction.kind) == (
        70,
        False,
        ledger_pb2.TRANSACTION_KIND_DEBIT,
    )
    again = await connect.unary(
        CREDIT + "DebitCredits", debit_request, cpb.DebitCreditsResponse, me
    )
    assert (again.replayed, again.transaction.transaction_id) == (
        True,
        debit.transaction.transaction_id,
    )

    refund = await connect.unary(
        CREDIT + "RefundCredits",
        cpb.RefundCreditsRequest(
            transaction_id=debit.transaction.transaction_id, amount=10, idempotency_key="r1"
        ),
        cpb.RefundCreditsResponse,
        SERVICE_TOKEN,
    )
    assert (refund.balance, refund.transaction.refunded_transaction_id) == (
        80,
        debit.transaction.transaction_id,
    )

    reserve = await connect.unary(
        CREDIT + "ReserveCredits",
        cpb.ReserveCreditsRequest(amount=20, idempotency_key="h1"),
        cpb.ReserveCreditsResponse,
        me,
    )
    assert (reserve.available, reserve.hold.state) == (60, ledger_pb2.HOLD_STATE_PENDING)
    capture = await connect.unary(
        CREDIT + "CaptureCredits",
        cpb.CaptureCreditsRequest(hold_id=reserve.hold.hold_id, amount=15, idempotency_key="c1"),
        cpb.CaptureCreditsResponse,
        me,
    )
    assert (capture.balance, capture.hold.state) == (65, ledger_pb2.HOLD_STATE_CAPTURED)

    second = await connect.unary(
        CREDIT + "ReserveCredits",
        cpb.ReserveCreditsRequest(amount=5, idempotency_key="h2"),
        cpb.ReserveCreditsResponse,
        me,
    )
    release = await connect.unary(
        CREDIT + "ReleaseCredits",
        cpb.ReleaseCreditsRequest(hold_id=second.hold.hold_id),
        cpb.ReleaseCreditsResponse,
        me,
    )
    assert (release.available, release.hold.state) == (65, ledger_pb2.HOLD_STATE_RELEASED)

    listed = await connect.unary(
        CREDIT + "ListTransactions",
        cpb.ListTransactionsRequest(page_size=2),
        cpb.ListTransactionsResponse,
        me,
    )
    assert [t.kind for t in listed.transactions] == [
        ledger_pb2.TRANSACTION_KIND_CAPTURE,
        ledger_pb2.TRANSACTION_KIND_REFUND,
    ]
    rest = await connect.unary(
        CREDIT + "ListTransactions",
        cpb.ListTransactionsRequest(page_size=10, page_token=listed.next_page_token),
        cpb.ListTransactionsResponse,
        me,
    )
    assert [t.kind for t in rest.transactions] == [
        ledger_pb2.TRANSACTION_KIND_DEBIT,
        ledger_pb2.TRANSACTION_KIND_GRANT,
    ]
    assert rest.next_page_token == ""


async def test_unary_calls_of_generation_service(connect: Connect) -> None:
    user = await funded(connect, 20)
    me = token(user)
    models = await connect.unary(
        GENERATION + "ListModels", gpb.ListModelsRequest(), gpb.ListModelsResponse, me
    )
    assert MODEL in [m.model for m in models.models]

    created = await connect.unary(
        GENERATION + "CreateGeneration",
        gpb.CreateGenerationRequest(model=MODEL, prompt="a lighthouse", request_id="g1"),
        gpb.CreateGenerationResponse,
        me,
    )
    generation_id = created.generation.generation_id
    assert created.generation.state == QUEUED
    got = await connect.unary(
        GENERATION + "GetGeneration",
        gpb.GetGenerationRequest(generation_id=generation_id),
        gpb.GetGenerationResponse,
        me,
    )
    assert got.generation.prompt == "a lighthouse"
    listed = await connect.unary(
        GENERATION + "ListGenerations",
        gpb.ListGenerationsRequest(),
        gpb.ListGenerationsResponse,
        me,
    )
    assert [g.generation_id for g in listed.generations] == [generation_id]
    cancelled = await connect.unary(
        GENERATION + "CancelGeneration",
        gpb.CancelGenerationRequest(generation_id=generation_id),
        gpb.CancelGenerationResponse,
        me,
    )
    assert cancelled.generation.state == CANCELLED
    balance = await connect.unary(
        CREDIT + "GetBalance", cpb.GetBalanceRequest(), cpb.GetBalanceResponse, me
    )
    assert (balance.balance, balance.held) == (20, 0)


async def test_a_watch_streams_each_state_and_ends_after_the_final_one(connect: Connect) -> None:
    """The generation as it is (QUEUED), then its cancellation, and the end-of-stream message
    with no error: the stream ended by its final state."""
    user = await funded(connect, 20)
    me = token(user)
    created = await connect.unary(
        GENERATION + "CreateGeneration",
        gpb.CreateGenerationRequest(model=MODEL, prompt="p", request_id="w1"),
        gpb.CreateGenerationResponse,
        me,
    )
    generation_id = created.generation.generation_id
    states = []
    watch = gpb.WatchGenerationRequest(generation_id=generation_id)
    async for update in connect.stream(
        GENERATION + "WatchGeneration", watch, gpb.WatchGenerationResponse, me
    ):
        states.append(update.generation.state)
        if update.generation.state == QUEUED:
            await connect.unary(
                GENERATION + "CancelGeneration",
                gpb.CancelGenerationRequest(generation_id=generation_id),
                gpb.CancelGenerationResponse,
                me,
            )
    assert states == [QUEUED, CANCELLED]


async def test_a_watch_that_fails_ends_with_the_error_in_its_end_of_stream(
    connect: Connect,
) -> None:
    watch = gpb.WatchGenerationRequest(generation_id=str(uuid.uuid4()))
    stream = connect.stream(
        GENERATION + "WatchGeneration", watch, gpb.WatchGenerationResponse, token(new_user())
    )
    with pytest.raises(ConnectFailure) as raised:
        await anext(stream)  # no message: the end-of-stream's error
    assert (raised.value.code, raised.value.reason, raised.value.domain) == (
        "not_found",
        "GENERATION_NOT_FOUND",
        "credits.v1",
    )
    assert raised.value.headers["x-request-id"]


async def test_errors_carry_the_error_info_and_details_of_the_contract(connect: Connect) -> None:
    user = await funded(connect, 10)
    me = token(user)
    with pytest.raises(ConnectFailure) as short:
        await connect.unary(
            CREDIT + "DebitCredits",
            cpb.DebitCreditsRequest(amount=25, idempotency_key="big"),
            cpb.DebitCreditsResponse,
            me,
        )
    assert (short.value.http_status, short.value.code, short.value.reason) == (
        400,
        "failed_precondition",
        "INSUFFICIENT_CREDITS",
    )
    assert short.value.metadata == {"required": "25", "available": "10"}
    assert short.value.precondition_subjects == ["available"]
    assert short.value.detail_types == ["google.rpc.ErrorInfo", "google.rpc.PreconditionFailure"]

    with pytest.raises(ConnectFailure) as invalid:
        await connect.unary(
            CREDIT + "DebitCredits",
            cpb.DebitCreditsRequest(amount=0, idempotency_key="zero"),
            cpb.DebitCreditsResponse,
            me,
        )
    assert (invalid.value.code, invalid.value.reason) == ("invalid_argument", "INVALID_ARGUMENT")
    assert invalid.value.field_violations == ["amount"]

    with pytest.raises(ConnectFailure) as denied:
        await connect.unary(
            CREDIT + "GrantCredits",
            cpb.GrantCreditsRequest(user_id=user.user_id, amount=5, idempotency_key="self"),
            cpb.GrantCreditsResponse,
            me,
        )
    assert (denied.value.http_status, denied.value.code, denied.value.reason) == (
        403,
        "permission_denied",
        "PERMISSION_DENIED",
    )

    first = cpb.DebitCreditsRequest(amount=1, idempotency_key="same")
    await connect.unary(CREDIT + "DebitCredits", first, cpb.DebitCreditsResponse, me)
    changed = cpb.DebitCreditsRequest(amount=2, idempotency_key="same")
    with pytest.raises(ConnectFailure) as reused:
        await connect.unary(CREDIT + "DebitCredits", changed, cpb.DebitCreditsResponse, me)
    assert (reused.value.http_status, reused.value.reason) == (409, "IDEMPOTENCY_KEY_REUSED")


async def test_callers_without_a_valid_token_are_refused_with_their_reason(
    connect: Connect,
) -> None:
    request, response = cpb.GetBalanceRequest(), cpb.GetBalanceResponse
    expired = mint_user_token(TEST_JWT_SECRET, uuid.uuid4(), ttl=timedelta(seconds=-5))
    cases = [
        ({}, "TOKEN_MISSING"),
        ({"authorization": "Basic abc"}, "TOKEN_MISSING"),
        ({"authorization": "Bearer not-a-jwt"}, "TOKEN_INVALID"),
        ({"authorization": f"Bearer {expired}"}, "TOKEN_EXPIRED"),
        # Longer than the 32 KiB the verifier takes: read whole, refused with a reason.
        ({"authorization": "Bearer " + "a" * (33 * 1024)}, "TOKEN_INVALID"),
    ]
    for headers, reason in cases:
        with pytest.raises(ConnectFailure) as refused:
            await connect.unary(CREDIT + "GetBalance", request, response, headers=headers)
        assert (refused.value.http_status, refused.value.code, refused.value.reason) == (
            401,
            "unauthenticated",
            reason,
        ), headers.keys()


async def test_a_request_that_does_not_decode_is_invalid_argument_once_the_caller_is_known(
    connect: Connect,
) -> None:
    garbage = b"{not json" if connect.codec == "json" else b"\xff\xff\xff"
    anonymous = await connect.post(CREDIT + "GetBalance", garbage)
    assert anonymous.json()["code"] == "unauthenticated"  # the body is not even read
    response = await connect.post(CREDIT + "GetBalance", garbage, token(new_user()))
    assert response.status_code == 400
    error = response.json()
    assert error["code"] == "invalid_argument"
    assert error["details"][0]["type"] == "google.rpc.ErrorInfo"


async def test_the_request_id_comes_back_sent_or_made(connect: Connect) -> None:
    me = token(new_user())
    sent = await connect.post(
        CREDIT + "GetBalance",
        b"{}" if connect.codec == "json" else b"",
        me,
        {"x-request-id": "trace-connect-1"},
    )
    assert sent.headers["x-request-id"] == "trace-connect-1"
    made = await connect.post(CREDIT + "GetBalance", b"{}" if connect.codec == "json" else b"", me)
    assert len(made.headers["x-request-id"]) == 32


async def test_json_answers_carry_every_field_in_camel_case(
    server: application.Application, http: httpx.AsyncClient
) -> None:
    connect = Connect(http, base_of(server), "json")
    user = new_user()
    response = await connect.post(CREDIT + "GetBalance", b"{}", token(user))
    assert response.json() == {
        "userId": user.user_id,
        "balance": "0",
        "held": "0",
        "available": "0",
        "nextExpireAmount": "0",
    }
    # Proto field names are read too.
    check = await connect.post(
        CREDIT + "CheckCredits", b'{"amount": "5", "user_id": ""}', token(user)
    )
    assert check.json() == {"sufficient": False, "available": "0", "shortfall": "5"}


def _access_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "credits.access"]
    return [line for line in lines if line["request_id"] == request_id]


def _rpcs(method: str, code: str, protocol: str) -> float:
    labels = {"method": method, "code": code, "protocol": protocol}
    return REGISTRY.get_sample_value("credits_rpcs_total", labels) or 0.0


async def test_calls_are_logged_and_counted_with_their_protocol(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="credits.access")
    user = new_user()
    method = CREDIT + "DebitCredits"
    before = (
        _rpcs(method, "FAILED_PRECONDITION", "connect"),
        _rpcs(method, "FAILED_PRECONDITION", "grpc"),
    )
    request_id = f"trace-log-{connect.codec}-{uuid.uuid4()}"
    with pytest.raises(ConnectFailure):
        await connect.unary(
            method,
            cpb.DebitCreditsRequest(amount=5, idempotency_key="k"),
            cpb.DebitCreditsResponse,
            token(user),
            {"x-request-id": request_id},
        )
    [line] = _access_lines(caplog, request_id)
    assert (line["method"], line["code"], line["reason"], line["principal"], line["user_id"]) == (
        method,
        "FAILED_PRECONDITION",
        "INSUFFICIENT_CREDITS",
        "user",
        user.user_id,
    )
    assert line["protocol"] == "connect"
    after = (
        _rpcs(method, "FAILED_PRECONDITION", "connect"),
        _rpcs(method, "FAILED_PRECONDITION", "grpc"),
    )
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)
    assert all(token(user) not in str(record.__dict__) for record in caplog.records)
