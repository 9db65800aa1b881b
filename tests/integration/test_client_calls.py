"""Both clients against the real service (over both transports): every RPC once, a token
refreshed by the token provider, and a retried mutation that takes effect exactly once."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from credits_client import (
    AsyncCreditsClient,
    CreditsClient,
    GenerationNotCancellable,
    GrantNotActive,
    GrantNotFound,
    HoldNotPending,
    InsufficientCredits,
    PermissionDenied,
    ServiceKey,
    SpendLimitExceeded,
    TokenExpired,
    TokenProvider,
)
from credits_client import types as t

from server import app as application
from server.auth.tokens import mint_user_token
from tests.fixtures.server import SERVICE, TEST_JWT_SECRET
from tests.fixtures.workers import COST, MODEL, running_workers

SERVICE_TOKEN = SERVICE[0][1].removeprefix("Bearer ")


def user_token(user_id: uuid.UUID, ttl: datetime.timedelta = datetime.timedelta(hours=1)) -> str:
    return mint_user_token(TEST_JWT_SECRET, user_id, ttl=ttl)


def target(app: application.Application) -> str:
    return f"127.0.0.1:{app.port}"


async def test_async_client_every_rpc(server: application.Application) -> None:
    user_id = uuid.uuid4()
    uid = str(user_id)
    async with (
        AsyncCreditsClient(target(server), credentials=ServiceKey(SERVICE_TOKEN)) as service,
        AsyncCreditsClient(target(server), credentials=user_token(user_id)) as me,
    ):
        assert (await me.get_profile()).profile.user_id == uid
        grant = await service.grant_credits(user_id=uid, amount=100, description="welcome")
        assert (grant.balance, grant.replayed) == (100, False)
        assert (await me.get_balance()).available == 100
        assert (await me.check_credits(amount=150)).shortfall == 50
        debit = await me.debit_credits(amount=10, metadata={"job": "1"})
        # No user_id: the transaction's owner.
        refund = await service.refund_credits(
            transaction_id=debit.transaction.transaction_id, amount=4
        )
        assert refund.balance == 94
        reserve = await me.reserve_credits(amount=20, ttl=datetime.timedelta(minutes=1))
        capture = await me.capture_credits(hold_id=reserve.hold.hold_id, amount=5)
        assert (capture.balance, capture.hold.state) == (89, t.HOLD_STATE_CAPTURED)
        second = await me.reserve_credits(amount=3)
        released = await me.release_credits(hold_id=second.hold.hold_id)
        assert (released.hold.state, released.available) == (t.HOLD_STATE_RELEASED, 89)
        with pytest.raises(HoldNotPending) as settled:
            await me.release_credits(hold_id=second.hold.hold_id)
        assert (settled.value.state, settled.value.generation_id) == ("released", None)
        page = await me.list_transactions(page_size=2)
        assert len(page.transactions) == 2
        assert page.next_page_token
        with pytest.raises(InsufficientCredits) as raised:
            await me.debit_credits(amount=1000)
        assert (raised.value.required, raised.value.available) == (1000, 89)
        with pytest.raises(PermissionDenied):
            await me.grant_credits(user_id=uid, amount=1)

        assert MODEL in [m.model for m in (await me.list_models()).models]
        doomed = await me.create_generation(model=MODEL, prompt="never mind")
        with pytest.raises(HoldNotPending) as owned:
            await me.capture_credits(hold_id=doomed.generation.hold_id)
        assert owned.value.generation_id == doomed.generation.generation_id
        cancelled = await me.cancel_generation(generation_id=doomed.generation.generation_id)
        assert cancelled.generation.state == t.GENERATION_STATE_CANCELLED
        with pytest.raises(GenerationNotCancellable):
            await me.cancel_generation(generation_id=doomed.generation.generation_id)
        made = await me.create_generation(model=MODEL, prompt="a cat", parameters={"size": "32"})
        generation_id = made.generation.generation_id
        assert (await me.get_generation(generation_id=generation_id)).generation.cost == COST
        async with running_workers(server):
            states = [
                m.generation.state
                async for m in me.watch_generation(generation_id=generation_id, timeout=20)
            ]
        assert states[-1] == t.GENERATION_STATE_SUCCEEDED
        listed = await me.list_generations()
        assert {g.generation_id for g in listed.generations} == {
            generation_id,
            doomed.generation.generation_id,
        }
        assert (await me.get_balance()).balance == 89 - COST


async def test_sync_client_every_rpc(server: application.Application) -> None:
    user_id = uuid.uuid4()
    uid = str(user_id)

    def flow() -> list[int]:
        with (
            CreditsClient(target(server), credentials=ServiceKey(SERVICE_TOKEN)) as service,
            CreditsClient(target(server), credentials=user_token(user_id)) as me,
        ):
            assert me.get_profile().profile.user_id == uid
            service.grant_credits(user_id=uid, amount=50)
            assert me.get_balance().balance == 50
            assert me.check_credits(amount=10).sufficient
            debit = me.debit_credits(amount=10, idempotency_key="sync-debit")
            again = me.debit_credits(amount=10, idempotency_key="sync-debit")
            assert (again.replayed, again.balance) == (True, 40)
            service.refund_credits(user_id=uid, transaction_id=debit.transaction.transaction_id)
            hold = me.reserve_credits(amount=5).hold
            assert me.capture_credits(hold_id=hold.hold_id).balance == 45
            other = me.reserve_credits(amount=5).hold
            assert me.release_credits(hold_id=other.hold_id).available == 45
            kinds = [tx.kind for tx in me.list_transactions().transactions]
            assert kinds.count(t.TRANSACTION_KIND_DEBIT) == 1
            assert me.list_models().models
            # Slow enough that the workers running meanwhile cannot finish it before the cancel.
            slow = {"delay_ms": "4000"}
            doomed = me.create_generation(model=MODEL, prompt="no", parameters=slow).generation
            cancelled = me.cancel_generation(generation_id=doomed.generation_id)
            assert cancelled.generation.state == t.GENERATION_STATE_CANCELLED
            made = me.create_generation(model=MODEL, prompt="a dog").generation
            assert me.get_generation(generation_id=made.generation_id).generation.prompt == "a dog"
            assert len(me.list_generations().generations) == 2
            return [
                m.generation.state
                for m in me.watch_generation(generation_id=made.generation_id, timeout=20)
            ]

    async with running_workers(server):
        states = await asyncio.to_thread(flow)
    assert states[-1] == t.GENERATION_STATE_SUCCEEDED


async def test_async_client_grant_rpcs(server: application.Application) -> None:
    user_id = uuid.uuid4()
    uid = str(user_id)
    ends = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    async with (
        AsyncCreditsClient(target(server), credentials=ServiceKey(SERVICE_TOKEN)) as service,
        AsyncCreditsClient(target(server), credentials=user_token(user_id)) as me,
    ):
        await me.get_balance()
        allowance = await service.grant_credits(
            user_id=uid,
            amount=30,
            expire_time=ends,
            priority=10,
            category=t.GRANT_CATEGORY_PROMOTIONAL,
            description="monthly allowance",
        )
        assert (allowance.grant.state, allowance.grant.priority) == (t.GRANT_STATE_ACTIVE, 10)
        assert allowance.grant.expire_time.ToDatetime(datetime.UTC) == ends
        promo = await service.grant_credits(user_id=uid, amount=5, scopes=[MODEL])
        assert list(promo.grant.scopes) == [MODEL]
        balance = await me.get_balance()
        assert (balance.balance, balance.next_expire_amount) == (35, 30)
        assert (await me.check_credits(amount=35)).shortfall == 5
        assert (await me.check_credits(amount=35, scope=MODEL)).sufficient
        spent = await me.debit_credits(amount=8, scope=MODEL)
        assert [(a.grant_id, a.amount) for a in spent.transaction.allocations] == [
            (allowance.grant.grant_id, 8)
        ]
        with pytest.raises(InsufficientCredits) as short:
            await me.reserve_credits(amount=100, scope=MODEL)
        assert (short.value.scope, short.value.available) == (MODEL, 27)
        listed = await me.list_grants(states=[t.GRANT_STATE_ACTIVE], page_size=1)
        assert [g.grant_id for g in listed.grants] == [promo.grant.grant_id]
        voided = await service.void_grant(grant_id=allowance.grant.grant_id, description="x")
        assert (voided.transaction.kind, voided.transaction.amount, voided.balance) == (
            t.TRANSACTION_KIND_VOID,
            22,
            5,
        )
        with pytest.raises(GrantNotActive) as again:
            await service.void_grant(grant_id=allowance.grant.grant_id)
        assert again.value.state == "voided"
        with pytest.raises(GrantNotFound):
            await service.void_grant(grant_id=str(uuid.uuid4()))
        with pytest.raises(PermissionDenied):
            await me.void_grant(grant_id=promo.grant.grant_id)


async def test_sync_client_grant_rpcs(server: application.Application) -> None:
    user_id = uuid.uuid4()
    uid = str(user_id)
    starts = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)

    def flow() -> None:
        with (
            CreditsClient(target(server), credentials=ServiceKey(SERVICE_TOKEN)) as service,
            CreditsClient(target(server), credentials=user_token(user_id)) as me,
        ):
            me.get_balance()
            later = service.grant_credits(user_id=uid, amount=10, effective_time=starts)
            assert later.grant.state == t.GRANT_STATE_PENDING
            assert not later.HasField("transaction")
            now = service.grant_credits(user_id=uid, amount=4, priority=0)
            assert me.get_balance().balance == 4
            assert me.debit_credits(amount=1).transaction.allocations[0].grant_id == (
                now.grant.grant_id
            )
            pending = me.list_grants(states=[t.GRANT_STATE_PENDING]).grants
            assert [g.grant_id for g in pending] == [later.grant.grant_id]
            voided = service.void_grant(grant_id=later.grant.grant_id, idempotency_key="v")
            assert (voided.grant.state, voided.HasField("transaction")) == (
                t.GRANT_STATE_VOIDED,
                False,
            )
            assert service.void_grant(grant_id=later.grant.grant_id, idempotency_key="v").replayed

    await asyncio.to_thread(flow)


async def test_async_client_spend_control_rpcs(server: application.Application) -> None:
    user_id = uuid.uuid4()
    uid = str(user_id)
    today = datetime.datetime.now(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    async with (
        AsyncCreditsClient(target(server), credentials=ServiceKey(SERVICE_TOKEN)) as service,
        AsyncCreditsClient(target(server), credentials=user_token(user_id)) as me,
    ):
        await me.get_balance()
        await service.grant_credits(user_id=uid, amount=50)
        limits = await service.set_spend_limit(user_id=uid, period=t.SPEND_PERIOD_DAY, limit=10)
        assert [(x.period, x.limit) for x in limits.limits] == [(t.SPEND_PERIOD_DAY, 10)]
        await me.debit_credits(amount=6, scope=MODEL)
        with pytest.raises(SpendLimitExceeded) as over:
            await me.debit_credits(amount=5)
        assert (over.value.period, over.value.limit, over.value.spent) == ("day", 10, 6)
        assert over.value.reset_time == today + datetime.timedelta(days=1)
        assert (await me.get_spend_limits()).limits[0].spent == 6
        usage = await me.get_usage(
            start_time=today,
            end_time=today + datetime.timedelta(days=1),
            granularity=t.USAGE_GRANULARITY_DAY,
            group_by=t.USAGE_GROUP_BY_SCOPE,
        )
        assert [(b.scope, b.spent, b.granted) for b in usage.buckets] == [
            ("", 0, 50),
            (MODEL, 6, 0),
        ]
        exported = [e async for e in service.export_transactions(user_id=uid)]
        assert [(e.kind, e.amount) for e in exported] == [
            (t.TRANSACTION_KIND_GRANT, 50),
            (t.TRANSACTION_KIND_DEBIT, 6),
        ]

    def sync_flow() -> None:
        with CreditsClient(target(server), credentials=ServiceKey(SERVICE_TOKEN)) as client:
            assert [e.amount for e in client.export_transactions(user_id=uid)] == [50, 6]
            assert client.get_spend_limits(user_id=uid).limits[0].limit == 10

    await asyncio.to_thread(sync_flow)


async def test_a_token_provider_refreshes_an_expired_token(
    server: application.Application,
) -> None:
    user_id = uuid.uuid4()
    expired = user_token(user_id, ttl=datetime.timedelta(minutes=-5))
    issued: list[str] = []

    async def session_token() -> str:
        # Hands out the stale token once, then a refreshed one, as a Supabase session would.
        issued.append(expired if not issued else user_token(user_id))
        return issued[-1]

    async with AsyncCreditsClient(target(server), credentials=session_token) as client:
        with pytest.raises(TokenExpired):
            await client.get_balance()
        assert (await client.get_balance()).user_id == str(user_id)
    assert len(issued) == 2

    tokens = iter([expired, user_token(user_id)])

    def sync_flow() -> str:
        with CreditsClient(target(server), credentials=TokenProvider(lambda: next(tokens))) as c:
            with pytest.raises(TokenExpired):
                c.get_profile()
            return c.get_profile().profile.user_id

    assert await asyncio.to_thread(sync_flow) == str(user_id)


class LossyProxy(grpc.GenericRpcHandler):
    """Forwards every unary call to the real service, but for the first `lose` calls answers
    UNAVAILABLE after the service has done the work, as if the connection dropped."""

    def __init__(self, upstream: grpc.aio.Channel, lose: int) -> None:
        self.upstream = upstream
        self.lose = lose
        self.forwarded = 0

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        forward = self.upstream.unary_unary(method)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            metadata = [
                (k, v) for k, v in context.invocation_metadata() or () if k == "authorization"
            ]
            response: bytes = await forward(request, metadata=metadata, timeout=5)
            self.forwarded += 1
            if self.lose:
                self.lose -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            return response

        return grpc.unary_unary_rpc_method_handler(handle)  # type: ignore[arg-type]


@pytest.fixture
async def lossy(server: application.Application) -> AsyncIterator[tuple[str, LossyProxy]]:
    async with grpc.aio.insecure_channel(target(server)) as upstream:
        proxy = LossyProxy(upstream, lose=0)
        front = grpc.aio.server()
        front.add_generic_rpc_handlers((proxy,))
        port = front.add_insecure_port("127.0.0.1:0")
        await front.start()
        try:
            yield f"127.0.0.1:{port}", proxy
        finally:
            await front.stop(None)


@pytest.mark.parametrize("client_kind", ["async", "sync"])
async def test_a_retried_debit_takes_effect_once(
    server: application.Application, lossy: tuple[str, LossyProxy], client_kind: str
) -> None:
    front, proxy = lossy
    user_id = uuid.uuid4()
    async with AsyncCreditsClient(target(server), credentials=SERVICE_TOKEN) as service:
        await AsyncCreditsClient(target(server), credentials=user_token(user_id)).get_balance()
        await service.grant_credits(user_id=str(user_id), amount=30)

        proxy.lose = 2  # the first two answers are lost after the debit was made
        if client_kind == "async":
            async with AsyncCreditsClient(front, credentials=SERVICE_TOKEN) as client:
                reply = await client.debit_credits(user_id=str(user_id), amount=7)
        else:

            def debit() -> t.DebitCreditsResponse:
                with CreditsClient(front, credentials=SERVICE_TOKEN) as client:
                    return client.debit_credits(user_id=str(user_id), amount=7)

            reply = await asyncio.to_thread(debit)

        assert proxy.forwarded == 3
        assert (reply.replayed, reply.balance) == (True, 23)
        ledger = await service.list_transactions(
            user_id=str(user_id), kinds=[t.TRANSACTION_KIND_DEBIT]
        )
        assert [tx.idempotency_key for tx in ledger.transactions] == [
            reply.transaction.idempotency_key
        ]
        assert (await service.get_balance(user_id=str(user_id))).balance == 23
