"""CreditsClient on grpcio-testing's in-process channel: the requests it builds, the metadata it
sends (bearer tokens, fresh per call), the idempotency keys it fills in, and the typed errors it
raises."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest
from credits_client import (
    CreditsClient,
    InsufficientCredits,
    ServiceKey,
    TokenProvider,
)
from credits_client._proto import credit_service_pb2 as cpb
from credits_client._proto import generation_pb2, ledger_pb2
from credits_client._proto import generation_service_pb2 as gpb

from server import errors as server_errors
from server.api import error_table

CREDIT_SERVICE = cpb.DESCRIPTOR.services_by_name["CreditService"]
GENERATION_SERVICE = gpb.DESCRIPTOR.services_by_name["GenerationService"]


class Harness:
    """A client on a grpc_testing channel, with calls run in a thread so that the test can take
    each RPC the client makes and answer it."""

    def __init__(self, **client_args: Any) -> None:
        self.channel = grpc_testing.channel(
            [CREDIT_SERVICE, GENERATION_SERVICE], grpc_testing.strict_real_time()
        )
        self.client = CreditsClient(channel=self.channel, **client_args)
        self.pool = ThreadPoolExecutor(1)

    def start(self, call: Callable[[], Any]) -> Future[Any]:
        return self.pool.submit(call)

    def answer(
        self,
        service: Any,
        method: str,
        response: Any = None,
        status: grpc.Status | None = None,
    ) -> tuple[dict[str, str], Any]:
        """Take the pending `method` call, answer it, return its metadata and request."""
        metadata, request, rpc = self.channel.take_unary_unary(service.methods_by_name[method])
        if status is None:
            rpc.terminate(response, (), grpc.StatusCode.OK, "")
        else:
            rpc.terminate(None, status.trailing_metadata, status.code, status.details)
        return dict(metadata), request


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(credentials="user-token")
    yield h
    h.pool.shutdown(wait=False, cancel_futures=True)


def test_get_balance_sends_the_bearer_token_and_returns_the_response(harness: Harness) -> None:
    future = harness.start(lambda: harness.client.get_balance(user_id="u1"))
    metadata, request = harness.answer(
        CREDIT_SERVICE, "GetBalance", cpb.GetBalanceResponse(user_id="u1", balance=10, available=4)
    )
    assert metadata["authorization"] == "Bearer user-token"
    assert request == cpb.GetBalanceRequest(user_id="u1")
    assert future.result(5) == cpb.GetBalanceResponse(user_id="u1", balance=10, available=4)


def test_debit_fills_in_a_uuid_idempotency_key(harness: Harness) -> None:
    future = harness.start(
        lambda: harness.client.debit_credits(
            user_id="u1", amount=5, description="d", metadata={"job": "7"}
        )
    )
    _, request = harness.answer(CREDIT_SERVICE, "DebitCredits", cpb.DebitCreditsResponse())
    future.result(5)
    assert uuid.UUID(request.idempotency_key)
    assert (request.user_id, request.amount, request.description) == ("u1", 5, "d")
    assert dict(request.metadata) == {"job": "7"}


def test_each_mutation_gets_its_own_key_unless_given(harness: Harness) -> None:
    keys = []
    for _ in range(2):
        future = harness.start(lambda: harness.client.grant_credits(user_id="u", amount=1))
        keys.append(harness.answer(CREDIT_SERVICE, "GrantCredits", cpb.GrantCreditsResponse())[1])
        future.result(5)
    future = harness.start(
        lambda: harness.client.grant_credits(user_id="u", amount=1, idempotency_key="mine")
    )
    keys.append(harness.answer(CREDIT_SERVICE, "GrantCredits", cpb.GrantCreditsResponse())[1])
    future.result(5)
    assert keys[0].idempotency_key != keys[1].idempotency_key
    assert keys[2].idempotency_key == "mine"


@pytest.mark.parametrize(
    ("method", "call", "key_field"),
    [
        (
            "RefundCredits",
            lambda c: c.refund_credits(user_id="u", transaction_id="t"),
            "idempotency_key",
        ),
        ("ReserveCredits", lambda c: c.reserve_credits(amount=3, ttl=90), "idempotency_key"),
        ("CaptureCredits", lambda c: c.capture_credits(hold_id="h"), "idempotency_key"),
    ],
)
def test_other_mutations_fill_in_keys(
    harness: Harness, method: str, call: Callable[[CreditsClient], Any], key_field: str
) -> None:
    future = harness.start(lambda: call(harness.client))
    response = getattr(cpb, f"{method}Response")()
    _, request = harness.answer(CREDIT_SERVICE, method, response)
    future.result(5)
    assert uuid.UUID(getattr(request, key_field))


def test_reserve_sends_the_ttl_as_a_duration(harness: Harness) -> None:
    future = harness.start(lambda: harness.client.reserve_credits(amount=3, ttl=90))
    _, request = harness.answer(CREDIT_SERVICE, "ReserveCredits", cpb.ReserveCreditsResponse())
    future.result(5)
    assert request.ttl.seconds == 90


def test_create_generation_fills_in_the_request_id(harness: Harness) -> None:
    future = harness.start(
        lambda: harness.client.create_generation(model="m", prompt="p", parameters={"size": "8"})
    )
    _, request = harness.answer(
        GENERATION_SERVICE, "CreateGeneration", gpb.CreateGenerationResponse()
    )
    future.result(5)
    assert uuid.UUID(request.request_id)
    assert (request.model, request.prompt, dict(request.parameters)) == ("m", "p", {"size": "8"})


def test_list_transactions_builds_filters(harness: Harness) -> None:
    import datetime

    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    future = harness.start(
        lambda: harness.client.list_transactions(
            page_size=2, page_token="t", kinds=[ledger_pb2.TRANSACTION_KIND_DEBIT], start_time=start
        )
    )
    _, request = harness.answer(CREDIT_SERVICE, "ListTransactions", cpb.ListTransactionsResponse())
    future.result(5)
    assert (request.page_size, request.page_token) == (2, "t")
    assert list(request.kinds) == [ledger_pb2.TRANSACTION_KIND_DEBIT]
    assert request.start_time.ToDatetime(datetime.UTC) == start
    assert not request.HasField("end_time")


def test_a_token_provider_is_asked_before_every_call() -> None:
    tokens = iter(["first", "second"])
    harness = Harness(credentials=TokenProvider(lambda: next(tokens)))
    seen = []
    for _ in range(2):
        future = harness.start(lambda: harness.client.list_models())
        seen.append(harness.answer(GENERATION_SERVICE, "ListModels", gpb.ListModelsResponse())[0])
        future.result(5)
    assert [m["authorization"] for m in seen] == ["Bearer first", "Bearer second"]


def test_a_service_key_is_a_bearer_and_extra_metadata_is_sent() -> None:
    harness = Harness(credentials=ServiceKey("sk-secret"), metadata=[("x-request-id", "r1")])
    future = harness.start(lambda: harness.client.get_profile(user_id="u"))
    metadata, _ = harness.answer(CREDIT_SERVICE, "GetProfile", cpb.GetProfileResponse())
    future.result(5)
    assert metadata["authorization"] == "Bearer sk-secret"
    assert metadata["x-request-id"] == "r1"


def test_no_credentials_sends_no_authorization() -> None:
    harness = Harness()
    future = harness.start(lambda: harness.client.list_models())
    metadata, _ = harness.answer(GENERATION_SERVICE, "ListModels", gpb.ListModelsResponse())
    future.result(5)
    assert "authorization" not in metadata


def test_errors_are_raised_as_their_registry_class(harness: Harness) -> None:
    future = harness.start(lambda: harness.client.debit_credits(user_id="u", amount=30))
    sent = error_table.to_status(server_errors.InsufficientCredits(required=30, available=7))
    harness.answer(CREDIT_SERVICE, "DebitCredits", status=sent)
    with pytest.raises(InsufficientCredits) as raised:
        future.result(5)
    assert (raised.value.required, raised.value.available) == (30, 7)
    assert isinstance(raised.value.__cause__, grpc.RpcError)


def test_watch_generation_yields_each_message(harness: Harness) -> None:
    future = harness.start(
        lambda: [m.generation.state for m in harness.client.watch_generation(generation_id="g")]
    )
    metadata, request, rpc = harness.channel.take_unary_stream(
        GENERATION_SERVICE.methods_by_name["WatchGeneration"]
    )
    for state in (
        generation_pb2.GENERATION_STATE_QUEUED,
        generation_pb2.GENERATION_STATE_SUCCEEDED,
    ):
        rpc.send_response(
            gpb.WatchGenerationResponse(generation=generation_pb2.Generation(state=state))
        )
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert future.result(5) == [
        generation_pb2.GENERATION_STATE_QUEUED,
        generation_pb2.GENERATION_STATE_SUCCEEDED,
    ]
    assert request.generation_id == "g"
    assert dict(metadata)["authorization"] == "Bearer user-token"


def test_repr_never_shows_tokens() -> None:
    client = Harness(credentials="very-secret-token").client
    assert "very-secret-token" not in repr(client)
    assert "secret" not in repr(ServiceKey("sk-secret"))
    assert "secret" not in repr(TokenProvider(lambda: "secret"))


def test_an_async_token_provider_needs_the_async_client() -> None:
    async def fetch() -> str:
        return "t"

    harness = Harness(credentials=TokenProvider(fetch))
    with pytest.raises(TypeError, match="AsyncCreditsClient"):
        harness.client.list_models()


def test_the_client_is_a_context_manager_that_leaves_a_given_channel_open() -> None:
    harness = Harness(credentials="t")
    with harness.client as client:
        assert client is harness.client
    future = harness.start(lambda: harness.client.list_models())
    harness.answer(GENERATION_SERVICE, "ListModels", gpb.ListModelsResponse())
    future.result(5)


def test_grant_credits_sends_the_grants_options(harness: Harness) -> None:
    import datetime

    from credits_client._proto import grant_pb2

    starts = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    ends = starts + datetime.timedelta(days=30)
    future = harness.start(
        lambda: harness.client.grant_credits(
            user_id="u",
            amount=100,
            effective_time=starts,
            expire_time=ends,
            priority=0,
            category=grant_pb2.GRANT_CATEGORY_PROMOTIONAL,
            scopes=["model-a", "model-b"],
        )
    )
    _, request = harness.answer(CREDIT_SERVICE, "GrantCredits", cpb.GrantCreditsResponse())
    future.result(5)
    assert uuid.UUID(request.idempotency_key)
    assert request.effective_time.ToDatetime(datetime.UTC) == starts
    assert request.expire_time.ToDatetime(datetime.UTC) == ends
    assert (request.HasField("priority"), request.priority) == (True, 0)
    assert request.category == grant_pb2.GRANT_CATEGORY_PROMOTIONAL
    assert list(request.scopes) == ["model-a", "model-b"]


def test_grant_credits_leaves_unset_options_unset(harness: Harness) -> None:
    future = harness.start(lambda: harness.client.grant_credits(user_id="u", amount=1))
    _, request = harness.answer(CREDIT_SERVICE, "GrantCredits", cpb.GrantCreditsResponse())
    future.result(5)
    assert not request.HasField("priority")
    assert not request.HasField("expire_time")
    assert not request.HasField("effective_time")
    assert (request.category, list(request.scopes)) == (0, [])


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("DebitCredits", lambda c: c.debit_credits(amount=1, scope="model-a")),
        ("ReserveCredits", lambda c: c.reserve_credits(amount=1, scope="model-a")),
        ("CheckCredits", lambda c: c.check_credits(amount=1, scope="model-a")),
    ],
)
def test_spending_calls_send_their_scope(
    harness: Harness, method: str, call: Callable[[CreditsClient], Any]
) -> None:
    future = harness.start(lambda: call(harness.client))
    _, request = harness.answer(CREDIT_SERVICE, method, getattr(cpb, f"{method}Response")())
    future.result(5)
    assert request.scope == "model-a"


def test_void_grant_fills_in_a_key_and_list_grants_its_filter(harness: Harness) -> None:
    from credits_client._proto import grant_pb2

    future = harness.start(lambda: harness.client.void_grant(grant_id="g", description="fraud"))
    _, void = harness.answer(CREDIT_SERVICE, "VoidGrant", cpb.VoidGrantResponse())
    future.result(5)
    assert (void.grant_id, void.description) == ("g", "fraud")
    assert uuid.UUID(void.idempotency_key)
    future = harness.start(
        lambda: harness.client.list_grants(
            user_id="u", page_size=3, page_token="t", states=[grant_pb2.GRANT_STATE_ACTIVE]
        )
    )
    _, listing = harness.answer(CREDIT_SERVICE, "ListGrants", cpb.ListGrantsResponse())
    future.result(5)
    assert (listing.user_id, listing.page_size, listing.page_token) == ("u", 3, "t")
    assert list(listing.states) == [grant_pb2.GRANT_STATE_ACTIVE]


@pytest.mark.parametrize(
    ("sent", "expected", "attributes"),
    [
        (server_errors.GrantNotFound(), "GrantNotFound", {}),
        (server_errors.GrantNotActive(state="expired"), "GrantNotActive", {"state": "expired"}),
        (
            server_errors.InsufficientCredits(required=3, available=1, scope="model-a"),
            "InsufficientCredits",
            {"scope": "model-a", "required": 3, "available": 1},
        ),
        (
            server_errors.InsufficientCredits(required=3, available=1),
            "InsufficientCredits",
            {"scope": "", "metadata": {"required": "3", "available": "1"}},
        ),
    ],
)
def test_grant_errors_are_raised_as_their_classes(
    harness: Harness, sent: server_errors.CreditsError, expected: str, attributes: dict[str, Any]
) -> None:
    import credits_client

    future = harness.start(lambda: harness.client.void_grant(grant_id="g"))
    harness.answer(CREDIT_SERVICE, "VoidGrant", status=error_table.to_status(sent))
    with pytest.raises(getattr(credits_client, expected)) as raised:
        future.result(5)
    assert {name: getattr(raised.value, name) for name in attributes} == attributes
