"""examples/auto_topup.py end to end: a user with a threshold spends below it, the signed
balance.low webhook reaches the example's receiver, which verifies it and tops the balance up
once, even when the same delivery arrives twice; the same handler driven by ListEvents instead
tops up once more for a new crossing."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
from credits_client import CreditsClient

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, ledger_pb2
from server import app as application
from server.auth.tokens import mint_service_token
from server.events.webhooks import new_secret
from server.repository.events import EventRepository
from tests.fixtures.server import SERVICE, TEST_JWT_SECRET, new_user
from tests.fixtures.webhooks import deliver_until, pool_of

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "auto_topup.py"
Stub = credit_service_pb2_grpc.CreditServiceStub


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("auto_topup", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def receiving(
    server: application.Application, admin: EventRepository
) -> AsyncIterator[tuple[str, object]]:
    """The example's receiver on a free port, registered for balance.low; its secret and
    TopUp."""
    module = example()
    secret = new_secret()
    client = CreditsClient(
        f"127.0.0.1:{server.port}", credentials=mint_service_token(TEST_JWT_SECRET)
    )
    top_up = module.TopUp(client, 500)
    receiver = module.make_server("127.0.0.1", 0, secret, top_up)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    port = receiver.server_address[1]
    await admin.add(f"http://127.0.0.1:{port}/", ["balance.low"], secret)
    try:
        yield secret, top_up
    finally:
        receiver.shutdown()
        receiver.server_close()
        client.close()


async def grants_of(credits: Stub, user_id: str) -> list[int]:
    listed = await credits.ListTransactions(
        pb.ListTransactionsRequest(user_id=user_id, kinds=[ledger_pb2.TRANSACTION_KIND_GRANT]),
        metadata=SERVICE,
    )
    return [t.amount for t in listed.transactions]


@pytest.mark.parametrize("server", ["postgres"], indirect=True)
async def test_low_balance_webhook_tops_up_once(
    server: application.Application,
    credits: Stub,
    admin: EventRepository,
    receiving: tuple[str, object],
) -> None:
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    await credits.GrantCredits(
        pb.GrantCreditsRequest(user_id=user.user_id, amount=100, idempotency_key="start"),
        metadata=SERVICE,
    )
    await credits.SetBalanceAlerts(
        pb.SetBalanceAlertsRequest(user_id=user.user_id, thresholds=[50]), metadata=SERVICE
    )
    await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=60, idempotency_key="spend"), metadata=user.metadata
    )
    low = await credits.ListEvents(
        pb.ListEventsRequest(types=["balance.low"], page_size=1000), metadata=SERVICE
    )
    event_id = next(e.event_id for e in low.events if e.user_id == user.user_id)
    async with pool_of(admin) as delivering:
        delivery = await deliver_until(admin, delivering, uuid.UUID(event_id), "delivered")
        balance = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
        assert balance.available == 540
        # The same delivery again (as at-least-once delivery may): no second top-up.
        await admin.retry(delivery.delivery_id)
        await deliver_until(admin, delivering, uuid.UUID(event_id), "delivered")
    again = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert again.available == 540
    assert sorted(await grants_of(credits, user.user_id)) == [100, 500]

    # Polling instead: ListEvents after the last event seen, the same handler.
    await credits.DebitCredits(
        pb.DebitCreditsRequest(amount=500, idempotency_key="spend-more"), metadata=user.metadata
    )
    _, top_up = receiving
    polled = await credits.ListEvents(
        pb.ListEventsRequest(after_event_id=event_id, types=["balance.low"]), metadata=SERVICE
    )
    for event in (e for e in polled.events if e.user_id == user.user_id):
        body = {"id": event.event_id, "type": event.type, "user_id": event.user_id}
        body["data"] = json.loads(event.payload)
        await asyncio.to_thread(top_up.handle, body)  # type: ignore[attr-defined]
        await asyncio.to_thread(top_up.handle, body)  # type: ignore[attr-defined]
    assert sorted(await grants_of(credits, user.user_id)) == [100, 500, 500]
