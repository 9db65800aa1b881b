"""CreditService end to end: a real server, real channels, the real database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, generation_service_pb2_grpc, ledger_pb2
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from server.config import Settings
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, TEST_JWT_SECRET, User, bearer, new_user

Stub = credit_service_pb2_grpc.CreditServiceStub
GenerationStub = generation_service_pb2_grpc.GenerationServiceStub


async def grant(credits: Stub, user: User, amount: int, key: str | None = None) -> int:
    response = await credits.GrantCredits(
        pb.GrantCreditsRequest(
            user_id=user.user_id, amount=amount, idempotency_key=key or uuid.uuid4().hex
        ),
        metadata=SERVICE,
    )
    return response.balance


async def funded(credits: Stub, amount: int) -> User:
    """A new user whose profile exists (made by their first call) with `amount` credits."""
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    if amount:
        await grant(credits, user, amount)
    return user


async def ledger_sum(database_url: str, user: User) -> tuple[int, int]:
    """(balance, sum of the ledger) as the database has them."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            """select p.balance,
                      coalesce(sum(case when t.kind in ('grant', 'refund') then t.amount
                                        else -t.amount end), 0) as total
                 from credit_profiles p
                 left join credit_transactions t on t.user_id = p.user_id
                where p.user_id = $1
                group by p.balance""",
            user.id,
        )
    finally:
        await conn.close()
    assert row is not None
    return row["balance"], row["total"]


# Provisioning and who may act on whom


async def test_first_call_of_a_user_creates_their_profile(credits: Stub) -> None:
    user = new_user(email="first@example.com")
    balance = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (balance.user_id, balance.balance, balance.held, balance.available) == (
        user.user_id,
        0,
        0,
        0,
    )
    profile = (await credits.GetProfile(pb.GetProfileRequest(), metadata=user.metadata)).profile
    assert profile.user_id == user.user_id
    assert profile.email == "first@example.com"
    assert profile.create_time.seconds > 0


# A first call that never reads the profile: name -> the call, as `user`.
FIRST_CALLS: dict[str, Callable[[Stub, GenerationStub, User], Awaitable[object]]] = {
    "ListModels": lambda _, g, u: g.ListModels(gpb.ListModelsRequest(), metadata=u.metadata),
    "GetGeneration": lambda _, g, u: g.GetGeneration(
        gpb.GetGenerationRequest(generation_id=str(uuid.uuid4())), metadata=u.metadata
    ),
    "CaptureCredits": lambda c, _, u: c.CaptureCredits(
        pb.CaptureCreditsRequest(hold_id=str(uuid.uuid4()), idempotency_key="k"),
        metadata=u.metadata,
    ),
    "GrantCredits (refused)": lambda c, _, u: c.GrantCredits(
        pb.GrantCreditsRequest(amount=1, idempotency_key="k"), metadata=u.metadata
    ),
}


@pytest.mark.parametrize("first", FIRST_CALLS)
async def test_a_users_first_call_creates_their_profile_whatever_it_asks(
    credits: Stub, generations: GenerationStub, first: str
) -> None:
    user = new_user()
    with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND, PERMISSION_DENIED: still a call
        await FIRST_CALLS[first](credits, generations, user)
    reply = await credits.GetBalance(pb.GetBalanceRequest(user_id=user.user_id), metadata=SERVICE)
    assert (reply.user_id, reply.balance) == (user.user_id, 0)


async def test_an_email_claim_postgres_cannot_store_is_left_out_of_the_profile(
    credits: Stub,
) -> None:
    # A verified token may carry any string: PostgreSQL text cannot hold NUL.
    user = new_user(email="ada\x00@example.com")
    profile = (await credits.GetProfile(pb.GetProfileRequest(), metadata=user.metadata)).profile
    assert (profile.user_id, profile.email) == (user.user_id, "")


async def test_concurrent_first_calls_create_one_profile(credits: Stub) -> None:
    user = new_user()
    replies = await asyncio.gather(
        *(credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata) for _ in range(20))
    )
    assert {r.user_id for r in replies} == {user.user_id}


async def test_signup_credits_are_granted_once_through_the_ledger(
    fresh_database_url: str,
) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=fresh_database_url,
        jwt_secret=TEST_JWT_SECRET,
        signup_credits=7,
    )
    app = await application.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = Stub(channel)
            user = new_user()
            first, second = await asyncio.gather(
                stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata),
                stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata),
            )
            assert first.balance == second.balance == 7
            page = await stub.ListTransactions(pb.ListTransactionsRequest(), metadata=user.metadata)
    finally:
        await app.stop(grace=1)
    assert [(t.kind, t.amount, t.description) for t in page.transactions] == [
        (ledger_pb2.TRANSACTION_KIND_GRANT, 7, "signup credits")
    ]


async def test_service_call_for_an_unknown_user_is_not_found(credits: Stub) -> None:
    stranger = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.GetBalance(pb.GetBalanceRequest(user_id=stranger), metadata=SERVICE)
    found = failure(raised.value)
    assert (found.code, found.reason, found.domain) == (
        grpc.StatusCode.NOT_FOUND,
        "PROFILE_NOT_FOUND",
        "credits.v1",
    )
    # ...and it did not create the profile either.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await credits.GetBalance(pb.GetBalanceRequest(user_id=stranger), metadata=SERVICE)
    assert failure(again.value).reason == "PROFILE_NOT_FOUND"


async def test_service_grant_to_an_unknown_user_is_not_found(credits: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.GrantCredits(
            pb.GrantCreditsRequest(user_id=str(uuid.uuid4()), amount=5, idempotency_key="k"),
            metadata=SERVICE,
        )
    assert failure(raised.value).reason == "PROFILE_NOT_FOUND"


async def test_a_user_naming_another_user_is_denied(credits: Stub) -> None:
    me, other = await funded(credits, 10), await funded(credits, 10)
    calls = [
        credits.GetBalance(pb.GetBalanceRequest(user_id=other.user_id), metadata=me.metadata),
        credits.GetProfile(pb.GetProfileRequest(user_id=other.user_id), metadata=me.metadata),
        credits.CheckCredits(
            pb.CheckCreditsRequest(user_id=other.user_id, amount=1), metadata=me.metadata
        ),
        credits.DebitCredits(
            pb.DebitCreditsRequest(user_id=other.user_id, amount=1, idempotency_key="x"),
            metadata=me.metadata,
        ),
        credits.ListTransactions(
            pb.ListTransactionsRequest(user_id=other.user_id), metadata=me.metadata
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        found = failure(raised.value)
        assert (found.code, found.reason) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
    other_balance = await credits.GetBalance(
        pb.GetBalanceRequest(user_id=other.user_id), metadata=SERVICE
    )
    assert other_balance.balance == 10


async def test_a_user_naming_themselves_is_the_same_as_me(credits: Stub) -> None:
    me = await funded(credits, 3)
    named = await credits.GetBalance(pb.GetBalanceRequest(user_id=me.user_id), metadata=me.metadata)
    assert named.balance == 3


async def test_users_may_not_grant_credits(credits: Stub) -> None:
    me = await funded(credits, 0)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.GrantCredits(
            pb.GrantCreditsRequest(user_id=me.user_id, amount=1000, idempotency_key="mint"),
            metadata=me.metadata,
        )
    found = failure(raised.value)
    assert (found.code, found.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert (await credits.GetBalance(pb.GetBalanceRequest(), metadata=me.metadata)).balance == 0


# Debits under concurrency


async def test_concurrent_debits_never_overdraw(credits: Stub, database_url: str) -> None:
    user = await funded(credits, 100)

    async def debit(i: int) -> grpc.StatusCode | None:
        try:
            await credits.DebitCredits(
                pb.DebitCreditsRequest(amount=1, idempotency_key=f"debit-{i}"),
                metadata=user.metadata,
            )
        except grpc.aio.AioRpcError as error:
            found = failure(error)
            assert found.reason == "INSUFFICIENT_CREDITS"
            assert found.metadata["required"] == "1"
            assert found.metadata["available"] == "0"
            assert found.precondition_subjects == ["available"]
            return found.code
        return None

    outcomes = await asyncio.gather(*(debit(i) for i in range(200)))
    assert outcomes.count(None) == 100
    assert outcomes.count(grpc.StatusCode.FAILED_PRECONDITION) == 100
    balance = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (balance.balance, balance.available) == (0, 0)
    assert await ledger_sum(database_url, user) == (0, 0)


async def test_debit_returns_the_transaction_and_new_balance(credits: Stub) -> None:
    user = await funded(credits, 10)
    response = await credits.DebitCredits(
        pb.DebitCreditsRequest(
            amount=4, idempotency_key="order-1", description="an image", metadata={"job": "j1"}
        ),
        metadata=user.metadata,
    )
    tx = response.transaction
    assert (response.balance, response.replayed) == (6, False)
    assert (tx.kind, tx.amount, tx.balance_after) == (ledger_pb2.TRANSACTION_KIND_DEBIT, 4, 6)
    assert (tx.user_id, tx.idempotency_key, tx.description) == (
        user.user_id,
        "order-1",
        "an image",
    )
    assert dict(tx.metadata) == {"job": "j1"}
    uuid.UUID(tx.transaction_id)


async def test_overdraft_is_insufficient_credits_and_changes_nothing(
    credits: Stub, database_url: str
) -> None:
    user = await funded(credits, 5)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.DebitCredits(
            pb.DebitCreditsRequest(amount=6, idempotency_key="too-much"), metadata=user.metadata
        )
    found = failure(raised.value)
    assert (found.code, found.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
    )
    assert found.metadata == {"required": "6", "available": "5"}
    assert await ledger_sum(database_url, user) == (5, 5)
    # The failed key was not consumed: the same key can succeed once credits arrive.
    await grant(credits, user, 1)
    ok = await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=6, idempotency_key="too-much"), metadata=user.metadata
    )
    assert (ok.balance, ok.replayed) == (0, False)


# Idempotency


async def test_replayed_debit_returns_the_original_once(credits: Stub, database_url: str) -> None:
    user = await funded(credits, 10)
    request = pb.DebitCreditsRequest(amount=3, idempotency_key="same", description="d")
    first = await credits.DebitCredits(request, metadata=user.metadata)
    replays = await asyncio.gather(
        *(credits.DebitCredits(request, metadata=user.metadata) for _ in range(10))
    )
    assert not first.replayed
    for replay in replays:
        assert replay.replayed
        assert replay.transaction == first.transaction
        assert replay.balance == first.balance == 7
    assert await ledger_sum(database_url, user) == (7, 7)


async def test_concurrent_identical_debits_take_effect_once(
    credits: Stub, database_url: str
) -> None:
    user = await funded(credits, 10)
    request = pb.DebitCreditsRequest(amount=2, idempotency_key="racing")
    replies = await asyncio.gather(
        *(credits.DebitCredits(request, metadata=user.metadata) for _ in range(8))
    )
    assert sorted(r.replayed for r in replies) == [False] + [True] * 7
    assert len({r.transaction.transaction_id for r in replies}) == 1
    assert await ledger_sum(database_url, user) == (8, 8)


@pytest.mark.parametrize(
    "changed",
    [
        {"amount": 4},
        {"description": "something else"},
        {"metadata": {"k": "v"}},
    ],
)
async def test_a_reused_key_with_other_parameters_is_refused(
    credits: Stub, changed: dict[str, object]
) -> None:
    user = await funded(credits, 10)
    await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=3, idempotency_key="once"), metadata=user.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.DebitCredits(
            pb.DebitCreditsRequest(idempotency_key="once", **{"amount": 3, **changed}),  # type: ignore[arg-type]
            metadata=user.metadata,
        )
    found = failure(raised.value)
    assert (found.code, found.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert (await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)).balance == 7


async def test_a_debit_key_cannot_be_reused_for_a_grant(credits: Stub) -> None:
    user = await funded(credits, 10)
    await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=3, idempotency_key="shared"), metadata=user.metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await grant(credits, user, 3, key="shared")
    assert failure(raised.value).reason == "IDEMPOTENCY_KEY_REUSED"


async def test_keys_are_scoped_to_the_user(credits: Stub) -> None:
    alice, bob = await funded(credits, 10), await funded(credits, 10)
    for user in (alice, bob):
        response = await credits.DebitCredits(
            pb.DebitCreditsRequest(amount=1, idempotency_key="order-42"), metadata=user.metadata
        )
        assert not response.replayed


async def test_replayed_grant_is_marked_replayed(credits: Stub) -> None:
    user = await funded(credits, 0)
    request = pb.GrantCreditsRequest(user_id=user.user_id, amount=5, idempotency_key="promo")
    first = await credits.GrantCredits(request, metadata=SERVICE)
    second = await credits.GrantCredits(request, metadata=SERVICE)
    assert (first.replayed, second.replayed) == (False, True)
    assert second.transaction == first.transaction
    assert (await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)).balance == 5


# Validation


def _invalid_requests(user_id: str) -> list[tuple[str, str, object]]:
    long_key = "k" * 256
    return [
        ("DebitCredits", "amount", pb.DebitCreditsRequest(amount=0, idempotency_key="k")),
        ("DebitCredits", "amount", pb.DebitCreditsRequest(amount=-5, idempotency_key="k")),
        ("DebitCredits", "idempotency_key", pb.DebitCreditsRequest(amount=1)),
        (
            "DebitCredits",
            "idempotency_key",
            pb.DebitCreditsRequest(amount=1, idempotency_key=long_key),
        ),
        (
            "DebitCredits",
            "idempotency_key",
            pb.DebitCreditsRequest(amount=1, idempotency_key="line\nbreak"),
        ),
        (
            "DebitCredits",
            "user_id",
            pb.DebitCreditsRequest(user_id="not-a-uuid", amount=1, idempotency_key="k"),
        ),
        (
            "DebitCredits",
            "description",
            pb.DebitCreditsRequest(amount=1, idempotency_key="k", description="d" * 1001),
        ),
        (
            "DebitCredits",
            "metadata",
            pb.DebitCreditsRequest(
                amount=1, idempotency_key="k", metadata={str(i): "v" for i in range(51)}
            ),
        ),
        # PostgreSQL text and jsonb cannot hold NUL: refused as the field's error, not a failure.
        (
            "DebitCredits",
            "description",
            pb.DebitCreditsRequest(amount=1, idempotency_key="k", description="a\x00b"),
        ),
        (
            "DebitCredits",
            "metadata",
            pb.DebitCreditsRequest(amount=1, idempotency_key="k", metadata={"a\x00": "v"}),
        ),
        (
            "DebitCredits",
            "metadata",
            pb.DebitCreditsRequest(amount=1, idempotency_key="k", metadata={"a": "v\x00"}),
        ),
        (
            "ReserveCredits",
            "description",
            pb.ReserveCreditsRequest(amount=1, idempotency_key="k", description="\x00"),
        ),
        ("CheckCredits", "amount", pb.CheckCreditsRequest(amount=0)),
        ("GetBalance", "user_id", pb.GetBalanceRequest(user_id="12345")),
        # Only the canonical form: not braced, URN or undashed, as uuid.UUID would read them.
        ("GetBalance", "user_id", pb.GetBalanceRequest(user_id="{" + user_id + "}")),
        ("GetBalance", "user_id", pb.GetBalanceRequest(user_id="urn:uuid:" + user_id)),
        ("GetBalance", "user_id", pb.GetBalanceRequest(user_id=user_id.replace("-", ""))),
        ("ListTransactions", "page_size", pb.ListTransactionsRequest(page_size=-1)),
        ("ListTransactions", "page_token", pb.ListTransactionsRequest(page_token="garbage!")),
        (
            "GrantCredits",
            "amount",
            pb.GrantCreditsRequest(user_id=user_id, amount=0, idempotency_key="k"),
        ),
    ]


async def test_each_invalid_argument_names_its_field(credits: Stub) -> None:
    user = await funded(credits, 10)
    for method, field, request in _invalid_requests(user.user_id):
        metadata = SERVICE if method == "GrantCredits" else user.metadata
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await getattr(credits, method)(request, metadata=metadata)
        found = failure(raised.value)
        assert (found.code, found.reason, found.field_violations) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            [field],
        ), f"{method} {field}"
    assert (await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)).balance == 10


async def test_a_uuid_in_capitals_names_the_same_user(credits: Stub) -> None:
    user = await funded(credits, 7)
    reply = await credits.GetBalance(
        pb.GetBalanceRequest(user_id=user.user_id.upper()), metadata=SERVICE
    )
    assert (reply.user_id, reply.balance) == (user.user_id, 7)


async def test_a_service_must_name_the_user(credits: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.GetBalance(pb.GetBalanceRequest(), metadata=SERVICE)
    found = failure(raised.value)
    assert (found.code, found.field_violations) == (grpc.StatusCode.INVALID_ARGUMENT, ["user_id"])


# Reads


async def test_check_credits_reports_sufficiency_and_shortfall(credits: Stub) -> None:
    user = await funded(credits, 10)
    enough = await credits.CheckCredits(pb.CheckCreditsRequest(amount=10), metadata=user.metadata)
    short = await credits.CheckCredits(pb.CheckCreditsRequest(amount=25), metadata=user.metadata)
    assert (enough.sufficient, enough.available, enough.shortfall) == (True, 10, 0)
    assert (short.sufficient, short.available, short.shortfall) == (False, 10, 15)
    as_service = await credits.CheckCredits(
        pb.CheckCreditsRequest(user_id=user.user_id, amount=3), metadata=SERVICE
    )
    assert as_service.sufficient


async def test_transactions_are_listed_newest_first_in_stable_pages(credits: Stub) -> None:
    user = await funded(credits, 100)
    for i in range(7):
        await credits.DebitCredits(
            pb.DebitCreditsRequest(amount=1, idempotency_key=f"k{i}"), metadata=user.metadata
        )
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page = await credits.ListTransactions(
            pb.ListTransactionsRequest(page_size=3, page_token=token), metadata=user.metadata
        )
        sizes.append(len(page.transactions))
        seen += [t.idempotency_key for t in page.transactions]
        token = page.next_page_token
        if not token:
            break
    assert sizes == [3, 3, 2]
    assert seen[:7] == [f"k{i}" for i in reversed(range(7))]
    assert len(seen) == len(set(seen)) == 8  # seven debits and the grant, each once
    everything = await credits.ListTransactions(
        pb.ListTransactionsRequest(user_id=user.user_id), metadata=SERVICE
    )
    assert [t.idempotency_key for t in everything.transactions] == seen
    assert everything.next_page_token == ""


async def test_a_page_token_cannot_be_used_for_another_user(credits: Stub) -> None:
    alice, bob = await funded(credits, 10), await funded(credits, 10)
    for i in range(3):
        await credits.DebitCredits(
            pb.DebitCreditsRequest(amount=1, idempotency_key=f"a{i}"), metadata=alice.metadata
        )
    page = await credits.ListTransactions(
        pb.ListTransactionsRequest(page_size=1), metadata=alice.metadata
    )
    assert page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.ListTransactions(
            pb.ListTransactionsRequest(page_token=page.next_page_token), metadata=bob.metadata
        )
    found = failure(raised.value)
    assert (found.code, found.field_violations) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["page_token"],
    )


# Unexpected failures


@pytest.fixture
async def broken_server(fresh_database_url: str) -> AsyncIterator[application.Application]:
    """A server whose schema lost a function after start-up (a deployment gone wrong)."""
    app = await application.start(
        Settings(listen="127.0.0.1:0", database_url=fresh_database_url, jwt_secret=TEST_JWT_SECRET)
    )
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute("alter function public.credit_get_profile(uuid) rename to gone")
    finally:
        await conn.close()
    try:
        yield app
    finally:
        await app.stop(grace=1)


async def test_an_unexpected_error_is_internal_without_internals(
    broken_server: application.Application, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broken_server.port}") as channel:
        user = new_user()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await Stub(channel).GetBalance(
                pb.GetBalanceRequest(),
                metadata=(*user.metadata, ("x-request-id", "req-123")),
            )
    found = failure(raised.value)
    assert (found.code, found.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert raised.value.details() == "internal error"
    assert ("x-request-id", "req-123") in tuple(raised.value.trailing_metadata() or ())
    logged = [r for r in caplog.records if "req-123" in r.getMessage()]
    assert logged, "the server logs the failure with the request id"
    assert logged[0].exc_info is not None
    token = user.metadata[0][1].removeprefix("Bearer ")
    assert all(token not in r.getMessage() for r in caplog.records)


async def test_health_is_serving_once_ready(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "credits.v1.CreditService", "credits.v1.GenerationService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_user_token_cannot_be_replaced_by_a_header_trick(credits: Stub) -> None:
    # Two authorization entries are ambiguous: refused, not resolved in the caller's favour.
    user = new_user()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.GetBalance(
            pb.GetBalanceRequest(), metadata=(*user.metadata, *bearer("forged"))
        )
    assert failure(raised.value).reason == "TOKEN_MISSING"
