"""Credit grants end to end over gRPC, on both transports: a monthly allowance that expires, a
purchased top-up that never does and a promotion for one model, spent in the documented
burn-down order (DebitCredits and CreateGeneration), with their allocations; future grants,
expiry by time (the SQL clock moved as the database owner), VoidGrant, ListGrants, next_expire,
CheckCredits and INSUFFICIENT_CREDITS with a scope, and the errors of grants."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import grpc.aio
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, grant_pb2, ledger_pb2
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from server.config import Settings
from tests.fixtures.errors import Failure, failure
from tests.fixtures.server import SERVICE, TEST_JWT_SECRET, User, new_user
from tests.fixtures.workers import COST, MODEL, GenerationStub, running_workers, wait_for

Stub = credit_service_pb2_grpc.CreditServiceStub
DAY = timedelta(days=1)

PAID, PROMOTIONAL = grant_pb2.GRANT_CATEGORY_PAID, grant_pb2.GRANT_CATEGORY_PROMOTIONAL
PENDING, ACTIVE = grant_pb2.GRANT_STATE_PENDING, grant_pb2.GRANT_STATE_ACTIVE
DEPLETED, EXPIRED = grant_pb2.GRANT_STATE_DEPLETED, grant_pb2.GRANT_STATE_EXPIRED
VOIDED = grant_pb2.GRANT_STATE_VOIDED
K = ledger_pb2


class SqlClock:
    """The database's clock (credits_private.clock, the owner's alone to set): every function
    that judges time reads pg now() plus its offset. Moved forward by `advance`."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self.offset = timedelta(0)

    def now(self) -> datetime:
        """The database's now, as near as this process can tell."""
        return datetime.now(UTC) + self.offset

    async def advance(self, by: timedelta) -> None:
        await self.set(self.offset + by)

    async def set(self, offset: timedelta) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            await conn.execute('update credits_private.clock set "offset" = $1', offset)
        finally:
            await conn.close()
        self.offset = offset


@pytest.fixture
async def clock(database_url: str) -> AsyncIterator[SqlClock]:
    """The SQL clock, put back when the test ends."""
    moved = SqlClock(database_url)
    try:
        yield moved
    finally:
        await moved.set(timedelta(0))


def stamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def when(value: Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


async def fails(call: object) -> Failure:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return failure(raised.value)


async def a_user(credits: Stub) -> User:
    """A new user whose profile exists (no credits: the test servers give no signup credits)."""
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    return user


async def give(
    credits: Stub,
    user: User,
    amount: int,
    *,
    key: str = "",
    description: str = "",
    expire_time: datetime | None = None,
    effective_time: datetime | None = None,
    priority: int | None = None,
    category: grant_pb2.GrantCategory.ValueType = grant_pb2.GRANT_CATEGORY_UNSPECIFIED,
    scopes: Iterable[str] = (),
) -> pb.GrantCreditsResponse:
    request = pb.GrantCreditsRequest(
        user_id=user.user_id,
        amount=amount,
        idempotency_key=key or uuid.uuid4().hex,
        description=description,
        expire_time=stamp(expire_time) if expire_time else None,
        effective_time=stamp(effective_time) if effective_time else None,
        priority=priority,
        category=category,
        scopes=list(scopes),
    )
    response: pb.GrantCreditsResponse = await credits.GrantCredits(request, metadata=SERVICE)
    return response


async def debit(
    credits: Stub, user: User, amount: int, scope: str = "", key: str = ""
) -> pb.DebitCreditsResponse:
    response: pb.DebitCreditsResponse = await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=amount, idempotency_key=key or uuid.uuid4().hex, scope=scope),
        metadata=user.metadata,
    )
    return response


def drawn(transaction: ledger_pb2.Transaction) -> list[tuple[str, int]]:
    return [(part.grant_id, part.amount) for part in transaction.allocations]


async def grants(
    credits: Stub, user: User, *states: grant_pb2.GrantState.ValueType
) -> dict[str, grant_pb2.Grant]:
    reply = await credits.ListGrants(
        pb.ListGrantsRequest(states=list(states), page_size=500), metadata=user.metadata
    )
    return {g.grant_id: g for g in reply.grants}


async def latest(credits: Stub, user: User, count: int) -> list[ledger_pb2.Transaction]:
    reply = await credits.ListTransactions(
        pb.ListTransactionsRequest(page_size=count), metadata=user.metadata
    )
    return list(reply.transactions)


# The documented story: an allowance, a top-up and a promotion, spent in order


async def test_an_allowance_a_top_up_and_a_promotion_are_spent_in_the_documented_order(
    server: application.Application,
    credits: Stub,
    generations: GenerationStub,
    clock: SqlClock,
) -> None:
    user = await a_user(credits)
    now = clock.now()
    allowance = (
        await give(
            credits,
            user,
            100,
            description="monthly allowance",
            expire_time=now + 30 * DAY,
            category=PROMOTIONAL,
        )
    ).grant
    top_up = (await give(credits, user, 500, description="top-up", category=PAID)).grant
    promotion = (
        await give(
            credits,
            user,
            20,
            description="launch promotion",
            expire_time=now + 7 * DAY,
            category=PROMOTIONAL,
            scopes=[MODEL],
        )
    ).grant
    assert (top_up.category, top_up.priority, top_up.HasField("expire_time")) == (PAID, 50, False)
    assert (promotion.state, list(promotion.scopes)) == (ACTIVE, [MODEL])

    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (reply.balance, reply.available, reply.next_expire_amount) == (620, 620, 20)
    assert when(reply.next_expire_time) == when(promotion.expire_time)

    # Unscoped spending is paid by unscoped grants only; the model's by all three.
    unscoped = await credits.CheckCredits(
        pb.CheckCreditsRequest(amount=620), metadata=user.metadata
    )
    assert (unscoped.sufficient, unscoped.available, unscoped.shortfall) == (False, 600, 20)
    scoped = await credits.CheckCredits(
        pb.CheckCreditsRequest(amount=620, scope=MODEL), metadata=user.metadata
    )
    assert (scoped.sufficient, scoped.available, scoped.shortfall) == (True, 620, 0)

    # Scoped to this spending first, then the soonest expiry, never-expiring last.
    spent = await debit(credits, user, 30, scope=MODEL)
    assert drawn(spent.transaction) == [(promotion.grant_id, 20), (allowance.grant_id, 10)]
    assert spent.balance == 590

    # A generation spends with its model's name as its scope: its hold pins the allowance.
    async with running_workers(server):
        made = (
            await generations.CreateGeneration(
                gpb.CreateGenerationRequest(model=MODEL, prompt="a red square", request_id="g1"),
                metadata=user.metadata,
            )
        ).generation
        done = await wait_for(generations, user, made.generation_id)
    [capture] = [
        t for t in await latest(credits, user, 10) if t.transaction_id == done.transaction_id
    ]
    assert (capture.kind, drawn(capture)) == (
        K.TRANSACTION_KIND_CAPTURE,
        [(allowance.grant_id, COST)],
    )

    rest = await debit(credits, user, 200)
    left_of_allowance = 100 - 10 - COST
    assert drawn(rest.transaction) == [
        (allowance.grant_id, left_of_allowance),
        (top_up.grant_id, 200 - left_of_allowance),
    ]
    assert rest.balance == 620 - 30 - COST - 200

    listed = await grants(credits, user)
    assert [
        listed[g].remaining for g in (allowance.grant_id, top_up.grant_id, promotion.grant_id)
    ] == [
        0,
        rest.balance,
        0,
    ]
    assert set(await grants(credits, user, DEPLETED)) == {allowance.grant_id, promotion.grant_id}
    assert set(await grants(credits, user, ACTIVE)) == {top_up.grant_id}
    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (reply.HasField("next_expire_time"), reply.next_expire_amount) == (False, 0)


async def test_the_grant_transaction_carries_its_own_allocation(credits: Stub) -> None:
    user = await a_user(credits)
    granted = await give(credits, user, 40, key="paid-1")
    assert granted.transaction.kind == K.TRANSACTION_KIND_GRANT
    assert granted.grant.transaction_id == granted.transaction.transaction_id
    assert drawn(granted.transaction) == [(granted.grant.grant_id, 40)]
    assert (granted.balance, granted.replayed) == (40, False)
    again = await give(credits, user, 40, key="paid-1")
    assert again.replayed
    assert (again.grant.grant_id, again.transaction.transaction_id) == (
        granted.grant.grant_id,
        granted.transaction.transaction_id,
    )
    other = await fails(give(credits, user, 40, key="paid-1", priority=10))
    assert (other.code, other.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")


async def test_priority_comes_before_everything_else(credits: Stub, clock: SqlClock) -> None:
    user = await a_user(credits)
    soon_scoped = (
        await give(credits, user, 10, scopes=[MODEL], expire_time=clock.now() + DAY)
    ).grant
    first = (await give(credits, user, 10, priority=0)).grant
    spent = await debit(credits, user, 15, scope=MODEL)
    assert drawn(spent.transaction) == [(first.grant_id, 10), (soon_scoped.grant_id, 5)]


async def test_then_the_oldest_of_equals(credits: Stub) -> None:
    user = await a_user(credits)
    old = (await give(credits, user, 10)).grant
    new = (await give(credits, user, 10)).grant
    spent = await debit(credits, user, 12)
    assert drawn(spent.transaction) == [(old.grant_id, 10), (new.grant_id, 2)]


# Future grants


async def test_a_future_grant_counts_nowhere_until_it_takes_effect(
    credits: Stub, clock: SqlClock
) -> None:
    user = await a_user(credits)
    starts = clock.now() + DAY
    later = await give(credits, user, 50, key="next-month", effective_time=starts)
    assert not later.HasField("transaction")
    assert (later.grant.state, later.grant.transaction_id, later.balance) == (PENDING, "", 0)
    assert when(later.grant.effective_time) == starts
    assert (await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)).balance == 0
    short = await fails(debit(credits, user, 1))
    assert (short.reason, short.metadata) == (
        "INSUFFICIENT_CREDITS",
        {"required": "1", "available": "0"},
    )
    assert set(await grants(credits, user, PENDING)) == {later.grant.grant_id}

    await clock.advance(DAY + timedelta(seconds=1))
    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert reply.balance == 50  # judged by time before anything is written
    spent = await debit(credits, user, 5)
    assert drawn(spent.transaction) == [(later.grant.grant_id, 5)]
    entries = await latest(credits, user, 2)
    assert [(t.kind, t.idempotency_key) for t in entries] == [
        (K.TRANSACTION_KIND_DEBIT, spent.transaction.idempotency_key),
        (K.TRANSACTION_KIND_GRANT, "next-month"),
    ]
    replay = await give(credits, user, 50, key="next-month", effective_time=starts)
    assert replay.replayed
    assert replay.transaction.transaction_id == entries[1].transaction_id
    assert (replay.grant.state, replay.grant.remaining) == (ACTIVE, 45)


# Expiry by time


async def test_a_grant_expires_at_its_expire_time_as_an_expire_entry(
    credits: Stub, clock: SqlClock
) -> None:
    user = await a_user(credits)
    ends = clock.now() + 30 * DAY
    allowance = (await give(credits, user, 100, expire_time=ends, category=PROMOTIONAL)).grant
    await give(credits, user, 50)
    await debit(credits, user, 30)
    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (reply.balance, when(reply.next_expire_time), reply.next_expire_amount) == (
        120,
        ends,
        70,
    )
    profile = (await credits.GetProfile(pb.GetProfileRequest(), metadata=user.metadata)).profile
    assert (when(profile.next_expire_time), profile.next_expire_amount) == (ends, 70)

    await clock.advance(30 * DAY + timedelta(seconds=1))
    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (reply.balance, reply.available, reply.HasField("next_expire_time")) == (50, 50, False)
    gone = (await grants(credits, user))[allowance.grant_id]
    assert (gone.state, gone.remaining) == (EXPIRED, 0)

    spent = await debit(credits, user, 1)  # settles the expiry under the user's lock first
    assert spent.balance == 49
    expiry = (await latest(credits, user, 2))[1]
    assert (expiry.kind, expiry.amount, expiry.balance_after) == (K.TRANSACTION_KIND_EXPIRE, 70, 50)
    assert drawn(expiry) == [(allowance.grant_id, 70)]
    listed = await credits.ListTransactions(
        pb.ListTransactionsRequest(kinds=[K.TRANSACTION_KIND_EXPIRE]), metadata=user.metadata
    )
    assert [t.transaction_id for t in listed.transactions] == [expiry.transaction_id]


async def test_a_hold_never_pins_a_grant_that_expires_before_it(
    credits: Stub, clock: SqlClock
) -> None:
    user = await a_user(credits)
    short = (await give(credits, user, 10, expire_time=clock.now() + timedelta(minutes=5))).grant
    await give(credits, user, 4)
    refused = await fails(
        credits.ReserveCredits(
            pb.ReserveCreditsRequest(amount=5, idempotency_key="h"), metadata=user.metadata
        )
    )
    assert (refused.reason, refused.metadata) == (
        "INSUFFICIENT_CREDITS",
        {"required": "5", "available": "4"},
    )
    spent = await debit(credits, user, 10)  # a debit may still spend it now
    assert drawn(spent.transaction) == [(short.grant_id, 10)]


async def test_a_refund_into_an_expired_grant_expires_again_at_once(
    credits: Stub, clock: SqlClock
) -> None:
    user = await a_user(credits)
    soon = (await give(credits, user, 10, expire_time=clock.now() + DAY)).grant
    lasting = (await give(credits, user, 10)).grant
    spent = await debit(credits, user, 15)
    assert drawn(spent.transaction) == [(soon.grant_id, 10), (lasting.grant_id, 5)]
    await clock.advance(DAY + timedelta(seconds=1))
    refund = await credits.RefundCredits(
        pb.RefundCreditsRequest(
            user_id=user.user_id,
            transaction_id=spent.transaction.transaction_id,
            amount=8,
            idempotency_key="r",
        ),
        metadata=SERVICE,
    )
    # The grant drawn last gets its credits back first; the expired part leaves again.
    assert drawn(refund.transaction) == [(lasting.grant_id, 5), (soon.grant_id, 3)]
    assert (refund.transaction.balance_after, refund.balance) == (13, 10)
    after = await latest(credits, user, 1)
    assert (after[0].kind, after[0].amount, drawn(after[0])) == (
        K.TRANSACTION_KIND_EXPIRE,
        3,
        [(soon.grant_id, 3)],
    )
    assert dict(after[0].metadata) == {"refund_transaction_id": refund.transaction.transaction_id}
    assert (await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)).balance == 10


# VoidGrant


async def test_void_removes_the_unpinned_rest_and_the_pinned_part_when_its_hold_ends(
    credits: Stub,
) -> None:
    user = await a_user(credits)
    granted = (await give(credits, user, 50)).grant
    held = await credits.ReserveCredits(
        pb.ReserveCreditsRequest(amount=10, idempotency_key="h"), metadata=user.metadata
    )
    request = pb.VoidGrantRequest(grant_id=granted.grant_id, idempotency_key="v", description="x")
    voided = await credits.VoidGrant(request, metadata=SERVICE)
    assert (voided.transaction.kind, voided.transaction.amount, voided.balance) == (
        K.TRANSACTION_KIND_VOID,
        40,
        10,
    )
    assert drawn(voided.transaction) == [(granted.grant_id, 40)]
    assert (voided.grant.state, voided.grant.remaining, voided.replayed) == (VOIDED, 10, False)
    again = await credits.VoidGrant(request, metadata=SERVICE)
    assert again.replayed
    assert again.transaction.transaction_id == voided.transaction.transaction_id
    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (reply.balance, reply.held, reply.available) == (10, 10, 0)

    await credits.ReleaseCredits(
        pb.ReleaseCreditsRequest(hold_id=held.hold.hold_id), metadata=user.metadata
    )
    last = (await latest(credits, user, 1))[0]
    assert (last.kind, last.amount, drawn(last)) == (
        K.TRANSACTION_KIND_VOID,
        10,
        [(granted.grant_id, 10)],
    )
    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (reply.balance, reply.held, reply.available) == (0, 0, 0)

    other = pb.VoidGrantRequest(grant_id=granted.grant_id, idempotency_key="v2")
    not_active = await fails(credits.VoidGrant(other, metadata=SERVICE))
    assert (not_active.code, not_active.reason, not_active.metadata) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "GRANT_NOT_ACTIVE",
        {"state": "voided"},
    )


async def test_voiding_a_future_grant_writes_nothing_and_it_never_takes_effect(
    credits: Stub, clock: SqlClock
) -> None:
    user = await a_user(credits)
    later = (await give(credits, user, 30, effective_time=clock.now() + DAY)).grant
    voided = await credits.VoidGrant(
        pb.VoidGrantRequest(grant_id=later.grant_id, idempotency_key="v"), metadata=SERVICE
    )
    assert not voided.HasField("transaction")
    assert (voided.grant.state, voided.balance) == (VOIDED, 0)
    await clock.advance(2 * DAY)
    assert (await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)).balance == 0
    await fails(debit(credits, user, 1))
    assert await latest(credits, user, 10) == []


async def test_void_errors_and_who_may_void(credits: Stub, clock: SqlClock) -> None:
    user = await a_user(credits)
    spent = (await give(credits, user, 5)).grant
    await debit(credits, user, 5)
    short = (await give(credits, user, 5, expire_time=clock.now() + DAY)).grant

    def void(grant_id: str, key: str = "v") -> object:
        return credits.VoidGrant(
            pb.VoidGrantRequest(grant_id=grant_id, idempotency_key=key), metadata=SERVICE
        )

    unknown = await fails(void(str(uuid.uuid4())))
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "GRANT_NOT_FOUND")
    depleted = await fails(void(spent.grant_id))
    assert (depleted.reason, depleted.metadata) == ("GRANT_NOT_ACTIVE", {"state": "depleted"})
    await clock.advance(DAY + timedelta(seconds=1))
    expired = await fails(void(short.grant_id))
    assert (expired.reason, expired.metadata) == ("GRANT_NOT_ACTIVE", {"state": "expired"})
    malformed = await fails(void("not-a-uuid"))
    assert (malformed.reason, malformed.field_violations) == ("INVALID_ARGUMENT", ["grant_id"])
    keyless = await fails(void(short.grant_id, key=""))
    assert keyless.field_violations == ["idempotency_key"]
    by_user = await fails(
        credits.VoidGrant(
            pb.VoidGrantRequest(grant_id=short.grant_id, idempotency_key="v"),
            metadata=user.metadata,
        )
    )
    assert (by_user.code, by_user.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )


# ListGrants


async def test_list_grants_pages_newest_first_with_a_states_filter(
    credits: Stub, clock: SqlClock
) -> None:
    user = await a_user(credits)
    made = [(await give(credits, user, 1)).grant.grant_id for _ in range(5)]
    later = (await give(credits, user, 1, effective_time=clock.now() + DAY)).grant.grant_id
    await debit(credits, user, 2)  # the two oldest are spent
    seen: list[str] = []
    token = ""
    while True:
        page = await credits.ListGrants(
            pb.ListGrantsRequest(page_size=2, page_token=token), metadata=user.metadata
        )
        assert len(page.grants) <= 2
        seen += [g.grant_id for g in page.grants]
        token = page.next_page_token
        if not token:
            break
    assert seen == [later, *reversed(made)]
    by_service = await credits.ListGrants(
        pb.ListGrantsRequest(user_id=user.user_id, states=[DEPLETED, PENDING]), metadata=SERVICE
    )
    assert [g.grant_id for g in by_service.grants] == [later, made[1], made[0]]
    assert [g.state for g in by_service.grants] == [PENDING, DEPLETED, DEPLETED]

    first = await credits.ListGrants(
        pb.ListGrantsRequest(page_size=1, states=[ACTIVE]), metadata=user.metadata
    )
    assert first.next_page_token
    other = await fails(
        credits.ListGrants(
            pb.ListGrantsRequest(page_size=1, page_token=first.next_page_token),
            metadata=user.metadata,
        )
    )
    assert (other.reason, other.field_violations) == ("INVALID_ARGUMENT", ["page_token"])
    unknown = await fails(
        credits.ListGrants(pb.ListGrantsRequest(states=[0]), metadata=user.metadata)
    )
    assert unknown.field_violations == ["states"]
    stranger = await a_user(credits)
    denied = await fails(
        credits.ListGrants(pb.ListGrantsRequest(user_id=user.user_id), metadata=stranger.metadata)
    )
    assert denied.reason == "PERMISSION_DENIED"


# Scopes and INSUFFICIENT_CREDITS


async def test_insufficient_credits_names_the_scope_it_was_judged_for(
    credits: Stub, generations: GenerationStub
) -> None:
    user = await a_user(credits)
    await give(credits, user, COST - 1, scopes=[MODEL])
    # The metadata names the scope when the spending has one (unscoped: as before scopes).
    for scope, named in (("", {}), ("another-model", {"scope": "another-model"})):
        short = await fails(debit(credits, user, 1, scope=scope))
        assert (short.code, short.reason, short.metadata) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "INSUFFICIENT_CREDITS",
            {"required": "1", "available": "0", **named},
        )
        assert short.precondition_subjects == ["available"]
    made = await fails(
        generations.CreateGeneration(
            gpb.CreateGenerationRequest(model=MODEL, prompt="p", request_id="r"),
            metadata=user.metadata,
        )
    )
    assert (made.reason, made.metadata) == (
        "INSUFFICIENT_CREDITS",
        {"required": str(COST), "available": str(COST - 1), "scope": MODEL},
    )
    held = await credits.ReserveCredits(
        pb.ReserveCreditsRequest(amount=COST - 1, idempotency_key="h", scope=MODEL),
        metadata=user.metadata,
    )
    assert held.available == 0


# What GrantCredits refuses


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("priority 101", "priority"),
        ("priority -1", "priority"),
        ("an unknown category", "category"),
        ("an empty scope", "scopes"),
        ("a scope of 101 characters", "scopes"),
        ("21 scopes", "scopes"),
        ("expire_time in the past", "expire_time"),
        ("expire_time before effective_time", "expire_time"),
        ("an expire_time out of range", "expire_time"),
    ],
)
async def test_grant_credits_refuses_bad_grant_options(
    credits: Stub, clock: SqlClock, case: str, field: str
) -> None:
    user = await a_user(credits)
    now = clock.now()
    base = pb.GrantCreditsRequest(user_id=user.user_id, amount=5, idempotency_key="g")
    changes: dict[str, pb.GrantCreditsRequest] = {
        "priority 101": pb.GrantCreditsRequest(priority=101),
        "priority -1": pb.GrantCreditsRequest(priority=-1),
        "an unknown category": pb.GrantCreditsRequest(category=7),  # type: ignore[arg-type]
        "an empty scope": pb.GrantCreditsRequest(scopes=["m", ""]),
        "a scope of 101 characters": pb.GrantCreditsRequest(scopes=["m" * 101]),
        "21 scopes": pb.GrantCreditsRequest(scopes=[f"m{n}" for n in range(21)]),
        "expire_time in the past": pb.GrantCreditsRequest(expire_time=stamp(now - DAY)),
        "expire_time before effective_time": pb.GrantCreditsRequest(
            effective_time=stamp(now + 2 * DAY), expire_time=stamp(now + DAY)
        ),
        "an expire_time out of range": pb.GrantCreditsRequest(
            expire_time=Timestamp(seconds=253_402_300_800)
        ),
    }
    request = pb.GrantCreditsRequest()
    request.CopyFrom(base)
    request.MergeFrom(changes[case])
    refused = await fails(credits.GrantCredits(request, metadata=SERVICE))
    assert (refused.code, refused.reason, refused.field_violations) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        [field],
    )
    assert await grants(credits, user) == {}


async def test_a_retried_grant_replays_after_its_expire_time_has_passed(
    credits: Stub, clock: SqlClock
) -> None:
    user = await a_user(credits)
    ends = clock.now() + DAY
    first = await give(credits, user, 5, key="g", expire_time=ends)
    await clock.advance(2 * DAY)
    again = await give(credits, user, 5, key="g", expire_time=ends)
    assert again.replayed
    assert again.grant.grant_id == first.grant.grant_id


async def test_a_scope_longer_than_100_characters_is_refused(credits: Stub) -> None:
    user = await a_user(credits)
    for call in (
        credits.DebitCredits(
            pb.DebitCreditsRequest(amount=1, idempotency_key="d", scope="m" * 101),
            metadata=user.metadata,
        ),
        credits.ReserveCredits(
            pb.ReserveCreditsRequest(amount=1, idempotency_key="h", scope="m" * 101),
            metadata=user.metadata,
        ),
        credits.CheckCredits(
            pb.CheckCreditsRequest(amount=1, scope="m" * 101), metadata=user.metadata
        ),
    ):
        refused = await fails(call)
        assert (refused.reason, refused.field_violations) == ("INVALID_ARGUMENT", ["scope"])


async def test_only_a_service_grants(credits: Stub) -> None:
    user = await a_user(credits)
    refused = await fails(
        credits.GrantCredits(
            pb.GrantCreditsRequest(amount=5, idempotency_key="g", priority=1),
            metadata=user.metadata,
        )
    )
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )


# Signup credits


async def test_signup_credits_are_a_promotional_grant_that_expires_after_the_ttl(
    fresh_database_url: str,
) -> None:
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=fresh_database_url,
        jwt_secret=TEST_JWT_SECRET,
        signup_credits=25,
        signup_credits_ttl_seconds=12 * 3600,
    )
    app = await application.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = credit_service_pb2_grpc.CreditServiceStub(channel)
            user = new_user()
            fresh = await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
            [signup] = (await grants(stub, user)).values()
            await SqlClock(fresh_database_url).advance(timedelta(hours=12))
            later = await stub.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    finally:
        await app.stop(grace=1)
    assert (fresh.balance, fresh.next_expire_amount) == (25, 25)
    assert (signup.category, signup.priority, list(signup.scopes)) == (PROMOTIONAL, 50, [])
    assert when(signup.expire_time) - when(signup.effective_time) == timedelta(hours=12)
    assert when(fresh.next_expire_time) == when(signup.expire_time)
    assert (later.balance, later.HasField("next_expire_time")) == (0, False)
