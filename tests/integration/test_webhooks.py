"""Webhook delivery (issue 19) against a real HTTP receiver on 127.0.0.1: failed attempts,
slow answers and dropped connections are retried until delivered; every attempt is signed per
Standard Webhooks and verifies with the library; a rotated secret signs what follows; a
delivery given up on is listed and retried by `credits webhooks`; a deliverer SIGKILLed
mid-delivery leads to a redelivery, never a lost event. Retry delays are tiny here."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from server import cli, webhook_cli
from server.config import Settings
from server.events.models import Endpoint
from server.events.webhooks import new_secret
from server.repository.events import EventRepository
from tests.fixtures.server import TEST_JWT_SECRET
from tests.fixtures.webhooks import Receiver, debit_event, deliver_until, delivery_of, pool_of

ROOT = Path(__file__).resolve().parents[2]


def verified(secret: str, headers: dict[str, str], body: bytes) -> Any:
    return Webhook(secret).verify(body, headers)


async def add(admin: EventRepository, url: str, secret: str) -> Endpoint:
    return await admin.add(url, ["transaction.created"], secret)


async def test_retried_through_failures_until_delivered_and_signed(
    database_url: str, admin: EventRepository, receiver: Receiver
) -> None:
    secret = new_secret()
    await add(admin, receiver.url, secret)
    receiver.script = ["close", "slow", "fail"]
    event_id = await debit_event(database_url)
    async with pool_of(admin) as pool:
        delivery = await deliver_until(admin, pool, event_id, "delivered")
    assert delivery.attempts == 4
    assert len(receiver.received) == 4
    for headers, body in receiver.received:
        assert headers["webhook-id"] == str(event_id)
        payload = verified(secret, headers, body)
        assert payload["id"] == str(event_id)
        assert payload["type"] == "transaction.created"
        assert payload["data"]["kind"] == "grant"
        assert payload["data"]["amount"] == 10
    with pytest.raises(WebhookVerificationError):
        verified(new_secret(), *receiver.received[-1])


async def test_given_up_then_listed_and_retried_by_the_cli(
    database_url: str,
    admin: EventRepository,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await add(admin, receiver.url, new_secret())
    receiver.script = ["fail"] * 5
    event_id = await debit_event(database_url)
    async with pool_of(admin) as pool:
        failed = await deliver_until(admin, pool, event_id, "failed")
        assert (failed.attempts, failed.last_status, failed.last_error) == (5, 500, "HTTP 500")
        settings = Settings(database_url=database_url, jwt_secret=TEST_JWT_SECRET)
        capsys.readouterr()
        assert await run_cli(settings, "deliveries", "--failed") == 0
        listed = capsys.readouterr().out
        assert str(failed.delivery_id) in listed
        assert "failed" in listed
        assert await run_cli(settings, "retry", str(failed.delivery_id)) == 0
        assert "pending" in capsys.readouterr().out
        delivered = await deliver_until(admin, pool, event_id, "delivered")
    assert delivered.attempts == 1
    assert len(receiver.received) == 6
    assert await run_cli(settings, "retry", str(uuid.uuid4())) == 1


async def test_a_rotated_secret_signs_what_follows(
    database_url: str,
    admin: EventRepository,
    receiver: Receiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(database_url=database_url, jwt_secret=TEST_JWT_SECRET)
    capsys.readouterr()
    assert await run_cli(settings, "add", receiver.url, "--events", "transaction.created") == 0
    added = capsys.readouterr().out
    endpoint_id = added.split()[1]
    old = added.split("secret ")[1].split()[0]
    assert await run_cli(settings, "list") == 0
    listed = capsys.readouterr().out
    assert endpoint_id in listed
    assert old not in listed
    assert "whsec_" not in listed
    assert await run_cli(settings, "rotate-secret", endpoint_id) == 0
    new = capsys.readouterr().out.split("secret ")[1].split()[0]
    assert new != old
    event_id = await debit_event(database_url)
    async with pool_of(admin) as pool:
        await deliver_until(admin, pool, event_id, "delivered")
    headers, body = receiver.received[-1]
    assert verified(new, headers, body)["id"] == str(event_id)
    with pytest.raises(WebhookVerificationError):
        verified(old, headers, body)
    assert await run_cli(settings, "remove", endpoint_id) == 0
    assert await admin.endpoints() == []


@pytest.mark.parametrize(
    ("limit", "error"),
    [("0", "must be 1 to 1000"), ("1001", "must be 1 to 1000"), ("x", "not a whole")],
)
def test_listing_deliveries_takes_1_to_1000(
    limit: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.parser().parse_args(["webhooks", "deliveries", "--limit", limit])
    assert exited.value.code == 2
    assert f"argument --limit: {error}" in capsys.readouterr().err
    args = cli.parser().parse_args(["webhooks", "deliveries", "--limit", "1000"])
    assert args.limit == 1000


async def run_cli(settings: Settings, *argv: str) -> int:
    """`credits webhooks ARGV` in this process (its event loop is the test's)."""
    args: argparse.Namespace = cli.parser().parse_args(["webhooks", *argv])
    return await webhook_cli.run(settings, args.action, args)


DELIVERER = """
import asyncio, sys
from server.events.webhooks import DeliveryPool, DeliverySettings
from server.repository.breaker import CredentialBreaker
from server.repository.events import EventRepository
from server.repository.layered import LayeredRepository
from server.transports.postgres import PostgresTransport

async def main() -> None:
    transport = await PostgresTransport.connect(sys.argv[1], min_size=1, max_size=2)
    queue = EventRepository(LayeredRepository(transport, CredentialBreaker()))
    settings = DeliverySettings(timeout_seconds=60, lease_seconds=1, idle_seconds=0.05)
    DeliveryPool(queue, 1, settings, pump_interval=0.05).start()
    print("delivering", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_deliverer_killed_mid_delivery_leads_to_redelivery(
    database_url: str, admin: EventRepository, receiver: Receiver
) -> None:
    secret = new_secret()
    await add(admin, receiver.url, secret)
    receiver.script = ["hang"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DELIVERER,
        database_url,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen' / 'python'}"},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), 20)
        event_id = await debit_event(database_url)
        await asyncio.wait_for(receiver.arrived.wait(), 20)
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    assert (await delivery_of(admin, event_id)).state == "pending"
    async with pool_of(admin) as pool:
        delivered = await deliver_until(admin, pool, event_id, "delivered")
    assert delivered.attempts == 2
    assert [h["webhook-id"] for h, _ in receiver.received] == [str(event_id)] * 2
    assert verified(secret, *receiver.received[-1])["id"] == str(event_id)
