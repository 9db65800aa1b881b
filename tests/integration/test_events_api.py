"""Events over the API (issue 19), on both transports: SetBalanceAlerts and the thresholds read
back in GetProfile, ListEvents resuming from the last event seen, and WatchBalance sending the
balance now and then every change, in order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable

import asyncpg
import grpc
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from server import app as application
from tests.fixtures.errors import Failure, failure
from tests.fixtures.server import SERVICE, User, new_user

Stub = credit_service_pb2_grpc.CreditServiceStub


async def refused(call: Awaitable[object]) -> Failure:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return failure(raised.value)


async def granted(credits: Stub, amount: int) -> User:
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    await credits.GrantCredits(
        pb.GrantCreditsRequest(user_id=user.user_id, amount=amount, idempotency_key="start"),
        metadata=SERVICE,
    )
    return user


async def spend(credits: Stub, user: User, amount: int, key: str) -> None:
    await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=amount, idempotency_key=key), metadata=user.metadata
    )


async def test_set_balance_alerts_and_read_them_back(credits: Stub) -> None:
    user = await granted(credits, 100)
    request = pb.SetBalanceAlertsRequest(user_id=user.user_id, thresholds=[100, 10, 50, 10])
    answer = await credits.SetBalanceAlerts(request, metadata=SERVICE)
    assert list(answer.profile.low_balance_thresholds) == [10, 50, 100]
    assert not answer.profile.low_balance_thresholds_default
    mine = await credits.GetProfile(pb.GetProfileRequest(), metadata=user.metadata)
    assert list(mine.profile.low_balance_thresholds) == [10, 50, 100]
    assert mine.profile.balance == 100
    reset = pb.SetBalanceAlertsRequest(user_id=user.user_id, use_defaults=True)
    back = await credits.SetBalanceAlerts(reset, metadata=SERVICE)
    assert back.profile.low_balance_thresholds_default
    assert list(back.profile.low_balance_thresholds) == []  # the test server sets none

    own = pb.SetBalanceAlertsRequest(thresholds=[5])
    denied = await refused(credits.SetBalanceAlerts(own, metadata=user.metadata))
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    bad = pb.SetBalanceAlertsRequest(user_id=user.user_id, thresholds=[5, 0])
    invalid = await refused(credits.SetBalanceAlerts(bad, metadata=SERVICE))
    assert (invalid.code, invalid.field_violations) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["thresholds"],
    )


async def last_event_id(database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return str(
            await conn.fetchval(
                "select credits_private.event_id(xid, seq) from credits_private.events"
                " order by xid desc, seq desc limit 1"
            )
        )
    finally:
        await conn.close()


async def test_list_events_resumes_without_gaps_or_repeats(
    credits: Stub, database_url: str
) -> None:
    cursor = await last_event_id(database_url)
    user = await granted(credits, 30)
    await credits.SetBalanceAlerts(
        pb.SetBalanceAlertsRequest(user_id=user.user_id, thresholds=[25]), metadata=SERVICE
    )
    for i in range(6):
        await spend(credits, user, 1, f"s{i}")
    seen: list[tuple[str, str]] = []
    while True:
        page = await credits.ListEvents(
            pb.ListEventsRequest(after_event_id=cursor, page_size=2), metadata=SERVICE
        )
        if not page.events:
            break
        seen.extend((e.event_id, e.type) for e in page.events if e.user_id == user.user_id)
        cursor = page.events[-1].event_id
    assert len({event_id for event_id, _ in seen}) == len(seen)
    # The grant's entry, five debits', then the sixth's (24 < 25: low) in one transaction.
    assert [t for _, t in seen[:6]] == ["transaction.created"] * 6
    assert sorted(t for _, t in seen[6:]) == ["balance.low", "transaction.created"]
    low = await credits.ListEvents(
        pb.ListEventsRequest(after_event_id=seen[0][0], types=["balance.low"]), metadata=SERVICE
    )
    mine = [e for e in low.events if e.user_id == user.user_id]
    assert [e.type for e in mine] == ["balance.low"]
    payload = json.loads(mine[0].payload)
    assert (payload["threshold"], payload["available"]) == (25, 24)

    user_call = await refused(credits.ListEvents(pb.ListEventsRequest(), metadata=user.metadata))
    assert user_call.code == grpc.StatusCode.PERMISSION_DENIED
    unknown = await refused(
        credits.ListEvents(pb.ListEventsRequest(types=["balance.high"]), metadata=SERVICE)
    )
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown.field_violations == ["types"]


async def next_message(stream: AsyncIterator[pb.WatchBalanceResponse]) -> pb.WatchBalanceResponse:
    return await asyncio.wait_for(anext(stream), 10)


async def test_watch_balance_sends_every_change_in_order(
    server: application.Application, credits: Stub
) -> None:
    user = await granted(credits, 100)
    call = credits.WatchBalance(pb.WatchBalanceRequest(), metadata=user.metadata)
    stream = call.__aiter__()
    try:
        first = await next_message(stream)
        assert (first.user_id, first.balance, first.available) == (user.user_id, 100, 100)
        if server.backend.balances.live:
            # Announced as they commit: a burst arrives whole, in order.
            for i in range(8):
                await spend(credits, user, 1, f"w{i}")
            seen = [(await next_message(stream)).balance for _ in range(8)]
            assert seen == list(range(99, 91, -1))
        else:
            # Polled: each change is seen when the next poll comes after it.
            for i in range(3):
                await spend(credits, user, 1, f"w{i}")
                assert (await next_message(stream)).balance == 99 - i
        hold = pb.ReserveCreditsRequest(amount=10, idempotency_key="h")
        await credits.ReserveCredits(hold, metadata=user.metadata)
        held = await next_message(stream)
        assert (held.held, held.available) == (10, held.balance - 10)
    finally:
        call.cancel()

    stranger = pb.WatchBalanceRequest(user_id=new_user().user_id)
    other = credits.WatchBalance(stranger, metadata=user.metadata)
    denied = await refused(anext(other.__aiter__()))
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("server", ["postgres"], indirect=True)
async def test_a_service_watches_any_user(server: application.Application, credits: Stub) -> None:
    user = await granted(credits, 10)
    call = credits.WatchBalance(pb.WatchBalanceRequest(user_id=user.user_id), metadata=SERVICE)
    stream = call.__aiter__()
    try:
        assert (await next_message(stream)).balance == 10
        await spend(credits, user, 4, "x")
        assert (await next_message(stream)).balance == 6
    finally:
        call.cancel()
