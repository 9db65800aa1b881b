"""Spend controls over gRPC, on both transports (issue 20): a daily cap judged atomically under
100 concurrent debits, its error and its rollover with the SQL clock, reservations, releases,
refunds and generations counted, the cap on active generations under 50 concurrent creates,
GetUsage by day and model, the rollup equal to the ledger, and ExportTransactions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import (
    credit_service_pb2_grpc,
    generation_service_pb2_grpc,
    grant_pb2,
    ledger_pb2,
    usage_pb2,
)
from credits.v1 import generation_service_pb2 as gpb
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, User
from tests.fixtures.workers import COST, MODEL
from tests.integration.test_grants import SqlClock, a_user, clock, debit, fails, give

__all__ = ["clock"]

Stub = credit_service_pb2_grpc.CreditServiceStub
GenerationStub = generation_service_pb2_grpc.GenerationServiceStub
DAY = usage_pb2.SPEND_PERIOD_DAY

# The rollup as the ledger says it should be, per user: every entry's amount by UTC hour, kind,
# scope and the category of the grants it allocates (paid for entries without allocations).
ROLLUP_FROM_LEDGER = """
    select date_trunc('hour', t.created_at, 'UTC') as hour, t.kind, t.scope,
           coalesce(g.category, 'paid') as category,
           sum(coalesce(a.amount, t.amount))::bigint as amount
      from public.credit_transactions t
      left join public.credit_allocations a on a.transaction_id = t.transaction_id
      left join public.credit_grants g on g.grant_id = a.grant_id
     where t.user_id = $1
     group by 1, 2, 3, 4
     order by 1, 2, 3, 4
"""
# The rollup by hour (each day's row's `hours`), and each day's `amount` against its hours.
ROLLUP = """
    select x.day + (h.i - 1) * interval '1 hour', x.kind, x.scope, x.category, h.v
      from public.credit_usage x, unnest(x.hours) with ordinality as h (v, i)
     where x.user_id = $1 and h.v > 0 order by 1, 2, 3, 4
"""
DAYS_OFF_THEIR_HOURS = """
    select day from public.credit_usage x
     where x.user_id = $1 and x.amount <> (select sum(v) from unnest(x.hours) v)
"""


async def set_limit(
    credits: Stub, user: User, limit: int, period: usage_pb2.SpendPeriod.ValueType = DAY
) -> pb.SetSpendLimitResponse:
    response: pb.SetSpendLimitResponse = await credits.SetSpendLimit(
        pb.SetSpendLimitRequest(user_id=user.user_id, period=period, limit=limit),
        metadata=SERVICE,
    )
    return response


async def limits(credits: Stub, user: User) -> list[tuple[int, int, int, bool]]:
    response = await credits.GetSpendLimits(pb.GetSpendLimitsRequest(), metadata=user.metadata)
    return [(x.period, x.limit, x.spent, x.is_default) for x in response.limits]


async def rollup_matches_ledger(database_url: str, *users: User) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for user in users:
            expected = [tuple(r) for r in await conn.fetch(ROLLUP_FROM_LEDGER, user.id)]
            assert [tuple(r) for r in await conn.fetch(ROLLUP, user.id)] == expected
            assert await conn.fetch(DAYS_OFF_THEIR_HOURS, user.id) == []
    finally:
        await conn.close()


def next_midnight(now: datetime) -> datetime:
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


async def test_100_concurrent_debits_against_a_daily_cap_of_10_succeed_exactly_10_times(
    credits: Stub, database_url: str
) -> None:
    user = await a_user(credits)
    await give(credits, user, 1000)
    await set_limit(credits, user, 10)

    async def one() -> str:
        try:
            await debit(credits, user, 1)
        except grpc.aio.AioRpcError as error:
            return failure(error).reason
        return "debited"

    outcomes = await asyncio.gather(*(one() for _ in range(100)))
    assert outcomes.count("debited") == 10
    assert outcomes.count("SPEND_LIMIT_EXCEEDED") == 90
    balance = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert balance.balance == 990
    assert [(p, limit, spent) for p, limit, spent, _ in await limits(credits, user)] == [
        (DAY, 10, 10)
    ]
    await rollup_matches_ledger(database_url, user)


async def test_over_the_cap_is_spend_limit_exceeded_with_when_it_resets_and_changes_nothing(
    credits: Stub, clock: SqlClock
) -> None:
    user = await a_user(credits)
    await give(credits, user, 100)
    await set_limit(credits, user, 10)
    await debit(credits, user, 7)
    before = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)

    refused = await fails(debit(credits, user, 4))
    assert (refused.code, refused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "SPEND_LIMIT_EXCEEDED",
    )
    reset = next_midnight(clock.now())
    assert refused.metadata == {
        "period": "day",
        "limit": "10",
        "spent": "7",
        "reset_time": reset.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    assert await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata) == before
    await debit(credits, user, 3)  # exactly up to the cap

    # The next UTC day (by the SQL clock) starts from 0.
    await clock.advance(reset - clock.now() + timedelta(seconds=1))
    await debit(credits, user, 10)
    response = await credits.GetSpendLimits(pb.GetSpendLimitsRequest(), metadata=user.metadata)
    (day,) = response.limits
    assert (day.spent, day.reset_time.ToDatetime(tzinfo=UTC)) == (10, reset + timedelta(days=1))


async def test_a_reservation_counts_a_release_gives_back_a_capture_counts_once(
    credits: Stub,
) -> None:
    user = await a_user(credits)
    await give(credits, user, 100)
    await set_limit(credits, user, 10)
    hold = (
        await credits.ReserveCredits(
            pb.ReserveCreditsRequest(amount=8, idempotency_key="r1", ttl=Duration(seconds=60)),
            metadata=user.metadata,
        )
    ).hold
    assert (await limits(credits, user))[0][2] == 8
    refused = await fails(debit(credits, user, 3))
    assert (refused.reason, refused.metadata["spent"]) == ("SPEND_LIMIT_EXCEEDED", "8")
    await credits.ReleaseCredits(
        pb.ReleaseCreditsRequest(hold_id=hold.hold_id), metadata=user.metadata
    )
    assert (await limits(credits, user))[0][2] == 0

    hold = (
        await credits.ReserveCredits(
            pb.ReserveCreditsRequest(amount=6, idempotency_key="r2", scope="m"),
            metadata=user.metadata,
        )
    ).hold
    captured = await credits.CaptureCredits(
        pb.CaptureCreditsRequest(hold_id=hold.hold_id, amount=4, idempotency_key="c2"),
        metadata=user.metadata,
    )
    assert captured.transaction.scope == "m"
    assert (await limits(credits, user))[0][2] == 4  # the capture, not the hold's 6 too
    await debit(credits, user, 6)
    assert (await fails(debit(credits, user, 1))).reason == "SPEND_LIMIT_EXCEEDED"

    # A refund gives back what it returns.
    await credits.RefundCredits(
        pb.RefundCreditsRequest(
            transaction_id=captured.transaction.transaction_id, amount=3, idempotency_key="f"
        ),
        metadata=SERVICE,
    )
    assert (await limits(credits, user))[0][2] == 7
    await debit(credits, user, 3)


async def test_weekly_and_monthly_limits_and_removal(credits: Stub) -> None:
    user = await a_user(credits)
    await give(credits, user, 100)
    await set_limit(credits, user, 5, usage_pb2.SPEND_PERIOD_WEEK)
    set_month = await set_limit(credits, user, 50, usage_pb2.SPEND_PERIOD_MONTH)
    assert [(x.period, x.limit, x.is_default) for x in set_month.limits] == [
        (usage_pb2.SPEND_PERIOD_WEEK, 5, False),
        (usage_pb2.SPEND_PERIOD_MONTH, 50, False),
    ]
    await debit(credits, user, 5)
    refused = await fails(debit(credits, user, 1))
    assert (refused.metadata["period"], refused.metadata["limit"]) == ("week", "5")
    removed = await set_limit(credits, user, 0, usage_pb2.SPEND_PERIOD_WEEK)
    assert [(x.period, x.spent) for x in removed.limits] == [(usage_pb2.SPEND_PERIOD_MONTH, 5)]
    await debit(credits, user, 1)


async def test_generations_count_and_the_active_cap_holds_under_50_concurrent_creates(
    credits: Stub, generations: GenerationStub, database_url: str
) -> None:
    user = await a_user(credits)
    await give(credits, user, 1000)

    async def create(n: int) -> str:
        try:
            await generations.CreateGeneration(
                gpb.CreateGenerationRequest(model=MODEL, prompt="a cat", request_id=f"g{n}"),
                metadata=user.metadata,
            )
        except grpc.aio.AioRpcError as error:
            refused = failure(error)
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.reason == "TOO_MANY_ACTIVE_GENERATIONS"
            assert refused.metadata == {"limit": "8", "active": "8"}
            assert refused.retry_delay_seconds == 5
            return "refused"
        return "created"

    outcomes = await asyncio.gather(*(create(n) for n in range(50)))
    assert outcomes.count("created") == 8
    listed = await generations.ListGenerations(gpb.ListGenerationsRequest(), metadata=user.metadata)
    assert len(listed.generations) == 8
    # Their holds count as spending; a cancelled one gives its hold back and frees a place.
    assert (await limits(credits, user)) == []
    await set_limit(credits, user, 8 * COST)
    assert (await limits(credits, user))[0][2] == 8 * COST
    await generations.CancelGeneration(
        gpb.CancelGenerationRequest(generation_id=listed.generations[0].generation_id),
        metadata=user.metadata,
    )
    assert (await limits(credits, user))[0][2] == 7 * COST
    await generations.CreateGeneration(
        gpb.CreateGenerationRequest(model=MODEL, prompt="a dog", request_id="again"),
        metadata=user.metadata,
    )
    over = gpb.CreateGenerationRequest(model=MODEL, prompt="a cow", request_id="over")
    # The spending cap is judged first (the reservation), then the cap on active generations.
    refused = await fails(generations.CreateGeneration(over, metadata=user.metadata))
    assert (refused.reason, refused.metadata["spent"]) == ("SPEND_LIMIT_EXCEEDED", str(8 * COST))
    await set_limit(credits, user, 0)
    refused = await fails(generations.CreateGeneration(over, metadata=user.metadata))
    assert refused.reason == "TOO_MANY_ACTIVE_GENERATIONS"
    for generation in listed.generations[1:]:
        await generations.CancelGeneration(
            gpb.CancelGenerationRequest(generation_id=generation.generation_id),
            metadata=user.metadata,
        )
    await rollup_matches_ledger(database_url, user)


async def test_only_a_service_sets_limits_and_a_user_reads_only_its_own(credits: Stub) -> None:
    user, other = await a_user(credits), await a_user(credits)
    denied = await fails(
        credits.SetSpendLimit(pb.SetSpendLimitRequest(period=DAY, limit=5), metadata=user.metadata)
    )
    assert denied.reason == "PERMISSION_DENIED"
    denied = await fails(
        credits.GetSpendLimits(
            pb.GetSpendLimitsRequest(user_id=other.user_id), metadata=user.metadata
        )
    )
    assert denied.reason == "PERMISSION_DENIED"
    bad = await fails(
        credits.SetSpendLimit(pb.SetSpendLimitRequest(user_id=user.user_id), metadata=SERVICE)
    )
    assert (bad.reason, bad.field_violations) == ("INVALID_ARGUMENT", ["period"])
    bad = await fails(
        credits.SetSpendLimit(
            pb.SetSpendLimitRequest(user_id=user.user_id, period=DAY, limit=-1), metadata=SERVICE
        )
    )
    assert bad.field_violations == ["limit"]


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


async def test_a_dashboard_draws_spending_per_day_per_model_from_one_call(
    credits: Stub, database_url: str
) -> None:
    user = await a_user(credits)
    await give(credits, user, 100, category=grant_pb2.GRANT_CATEGORY_PROMOTIONAL)
    await give(credits, user, 100)
    await debit(credits, user, 3, scope="model-a")
    await debit(credits, user, 4, scope="model-a")
    spent_b = await debit(credits, user, 5, scope="model-b")
    await debit(credits, user, 6)
    await credits.RefundCredits(
        pb.RefundCreditsRequest(
            transaction_id=spent_b.transaction.transaction_id, idempotency_key="r"
        ),
        metadata=SERVICE,
    )
    assert spent_b.transaction.scope == "model-b"
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    request = pb.GetUsageRequest(
        start_time=stamp(today - timedelta(days=30)),
        end_time=stamp(today + timedelta(days=1)),
        granularity=usage_pb2.USAGE_GRANULARITY_DAY,
        group_by=usage_pb2.USAGE_GROUP_BY_SCOPE,
    )
    usage = await credits.GetUsage(request, metadata=user.metadata)
    rows = [
        (b.start_time.ToDatetime(tzinfo=UTC), b.scope, b.spent, b.granted, b.refunded)
        for b in usage.buckets
    ]
    assert rows == [
        (today, "", 6, 200, 0),
        (today, "model-a", 7, 0, 0),
        (today, "model-b", 5, 0, 5),
    ]
    by_category = await credits.GetUsage(
        pb.GetUsageRequest(
            user_id=user.user_id,
            start_time=request.start_time,
            end_time=request.end_time,
            granularity=usage_pb2.USAGE_GRANULARITY_MONTH,
            group_by=usage_pb2.USAGE_GROUP_BY_GRANT_CATEGORY,
        ),
        metadata=SERVICE,
    )
    assert {(b.category, b.spent, b.granted) for b in by_category.buckets} >= {
        (grant_pb2.GRANT_CATEGORY_PROMOTIONAL, 18, 100),
        (grant_pb2.GRANT_CATEGORY_PAID, 0, 100),
    }
    await rollup_matches_ledger(database_url, user)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"start_time": None}, "start_time"),
        ({"end_time": None}, "end_time"),
        ({"granularity": 0}, "granularity"),
        ({"group_by": 99}, "group_by"),
        ({"start_time": datetime(2026, 1, 1, 0, 30, tzinfo=UTC)}, "start_time"),
        ({"end_time": datetime(2025, 1, 1, tzinfo=UTC)}, "end_time"),
        ({"end_time": datetime(2026, 3, 1, tzinfo=UTC)}, "end_time"),  # > 1000 hours
    ],
)
async def test_get_usage_refuses_bad_arguments(
    credits: Stub, user: User, change: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {
        "start_time": datetime(2026, 1, 1, tzinfo=UTC),
        "end_time": datetime(2026, 1, 2, tzinfo=UTC),
        "granularity": usage_pb2.USAGE_GRANULARITY_HOUR,
        "group_by": usage_pb2.USAGE_GROUP_BY_NONE,
        **change,
    }
    request = pb.GetUsageRequest(
        granularity=args["granularity"],  # type: ignore[arg-type]
        group_by=args["group_by"],  # type: ignore[arg-type]
    )
    for name in ("start_time", "end_time"):
        if args[name] is not None:
            getattr(request, name).CopyFrom(stamp(args[name]))  # type: ignore[arg-type]
    refused = await fails(credits.GetUsage(request, metadata=user.metadata))
    assert (refused.reason, refused.field_violations) == ("INVALID_ARGUMENT", [field])


async def test_export_streams_a_users_ledger_with_allocations_in_order(credits: Stub) -> None:
    user = await a_user(credits)
    granted = await give(credits, user, 50)
    spent = [await debit(credits, user, n, scope="s") for n in (1, 2, 3)]
    stream = credits.ExportTransactions(
        pb.ExportTransactionsRequest(user_id=user.user_id), metadata=SERVICE
    )
    exported = [t async for message in stream for t in message.transactions]
    assert [t.transaction_id for t in exported] == [
        granted.transaction.transaction_id,
        *(d.transaction.transaction_id for d in spent),
    ]
    assert [(t.kind, t.scope) for t in exported] == [
        (ledger_pb2.TRANSACTION_KIND_GRANT, ""),
        *[(ledger_pb2.TRANSACTION_KIND_DEBIT, "s")] * 3,
    ]
    assert exported[1].allocations[0].grant_id == granted.grant.grant_id
    denied = await fails(
        credits.ExportTransactions(
            pb.ExportTransactionsRequest(user_id=user.user_id), metadata=user.metadata
        ).read()
    )
    assert denied.reason == "PERMISSION_DENIED"
    neither = await fails(
        credits.ExportTransactions(pb.ExportTransactionsRequest(), metadata=SERVICE).read()
    )
    assert neither.field_violations == ["user_id"]
    later = await credits.ExportTransactions(
        pb.ExportTransactionsRequest(
            all_users=True, start_time=stamp(datetime.now(UTC) + timedelta(days=400))
        ),
        metadata=SERVICE,
    ).read()
    assert later == grpc.aio.EOF
