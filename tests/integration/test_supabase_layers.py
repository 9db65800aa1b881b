"""The Supabase transport's layers against the stand-in: the service key refused, the user
layer carrying each caller's own token, the project unreachable, and `credits check-config`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import grpc
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, generation_service_pb2_grpc
from credits.v1 import generation_service_pb2 as gpb
from server import app as application
from server import checks
from server.db import migrate
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.errors import failure
from tests.fixtures.server import SERVICE, TEST_JWT_SECRET, User, new_user, settings_for

Stub = credit_service_pb2_grpc.CreditServiceStub
# Wide enough that a test's calls all fall in one window, even on a loaded machine.
BREAKER_SECONDS = 3.0


@dataclasses.dataclass
class Deployment:
    """A service of its own on the Supabase API, and the stand-in it talks to."""

    fake: FakeSupabase
    app: application.Application
    credits: Stub
    channel: grpc.aio.Channel


@pytest.fixture
async def deployment(database_url: str) -> AsyncIterator[Deployment]:
    fake = await FakeSupabase.start(database_url, jwt_secret=TEST_JWT_SECRET)
    settings = dataclasses.replace(
        settings_for("supabase", database_url, fake), breaker_seconds=BREAKER_SECONDS
    )
    app = await application.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield Deployment(fake, app, Stub(channel), channel)
    finally:
        await app.stop(grace=1)
        await fake.stop()


async def funded(credits: Stub, amount: int) -> User:
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    await credits.GrantCredits(
        pb.GrantCreditsRequest(user_id=user.user_id, amount=amount, idempotency_key="seed"),
        metadata=SERVICE,
    )
    return user


def service_calls(fake: FakeSupabase) -> int:
    return sum(n for (role, _), n in fake.requests.items() if role == "service_role")


def user_calls(fake: FakeSupabase) -> int:
    return sum(n for (role, _), n in fake.requests.items() if role == "authenticated")


@pytest.mark.parametrize("mode", ["jwt", "gateway"])
async def test_a_refused_service_key_falls_back_to_the_users_own_token(
    deployment: Deployment,
    mode: Literal["jwt", "gateway"],
    caplog: pytest.LogCaptureFixture,
) -> None:
    credits, fake = deployment.credits, deployment.fake
    user = await funded(credits, 50)
    newcomer = new_user()
    fake.reject_service_key(mode)
    fake.reset_counts()
    caplog.set_level(logging.ERROR, logger="server.repository.breaker")

    for i in range(5):
        reply = await credits.DebitCredits(
            pb.DebitCreditsRequest(amount=1, idempotency_key=f"d{i}"), metadata=user.metadata
        )
        assert reply.balance == 50 - (i + 1)
    # A newcomer's profile is provisioned through their own token too.
    fresh = await credits.GetBalance(pb.GetBalanceRequest(), metadata=newcomer.metadata)
    assert fresh.balance == 0

    assert fake.rejected_service_key_requests == 1, "one failing call per breaker window"
    assert service_calls(fake) == 0
    assert user_calls(fake) >= 6
    said = [r for r in caplog.records if "service credentials rejected" in r.getMessage()]
    assert len(said) == 1
    assert fake.service_role_key not in caplog.text

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await credits.GrantCredits(
            pb.GrantCreditsRequest(user_id=user.user_id, amount=5, idempotency_key="g"),
            metadata=SERVICE,
        )
    found = failure(raised.value)
    assert (found.code, found.reason) == (
        grpc.StatusCode.INTERNAL,
        "SERVICE_CREDENTIALS_REJECTED",
    )


async def test_the_service_layer_is_tried_again_after_the_breaker_window(
    deployment: Deployment,
) -> None:
    credits, fake = deployment.credits, deployment.fake
    user = await funded(credits, 10)
    fake.reject_service_key("jwt")
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    fake.accept_service_key()
    await asyncio.sleep(BREAKER_SECONDS + 0.1)
    fake.reset_counts()
    reply = await credits.GrantCredits(
        pb.GrantCreditsRequest(user_id=user.user_id, amount=5, idempotency_key="after"),
        metadata=SERVICE,
    )
    assert reply.balance == 15
    assert service_calls(fake) == 1


async def test_business_errors_do_not_trip_the_breaker(deployment: Deployment) -> None:
    credits, fake = deployment.credits, deployment.fake
    user = await funded(credits, 1)
    fake.reset_counts()
    for i in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await credits.DebitCredits(
                pb.DebitCreditsRequest(amount=5, idempotency_key=f"too-much-{i}"),
                metadata=user.metadata,
            )
        assert failure(raised.value).reason == "INSUFFICIENT_CREDITS"
    assert user_calls(fake) == 0, "a business error is answered, not retried as the user"
    assert service_calls(fake) == 3


async def test_concurrent_users_on_the_user_layer_each_see_only_their_own_credits(
    deployment: Deployment,
) -> None:
    credits, fake = deployment.credits, deployment.fake
    users = [await funded(credits, i + 1) for i in range(100)]
    fake.reject_service_key("jwt")
    fake.reset_counts()
    balances = await asyncio.gather(
        *(credits.GetBalance(pb.GetBalanceRequest(), metadata=u.metadata) for u in users)
    )
    assert [(b.user_id, b.balance) for b in balances] == [
        (u.user_id, i + 1) for i, u in enumerate(users)
    ]
    ledgers = await asyncio.gather(
        *(
            credits.ListTransactions(pb.ListTransactionsRequest(), metadata=u.metadata)
            for u in users
        )
    )
    for i, (user, ledger) in enumerate(zip(users, ledgers, strict=True)):
        assert [(t.user_id, t.amount) for t in ledger.transactions] == [(user.user_id, i + 1)]
    assert service_calls(fake) == 0
    assert user_calls(fake) == 200, "every call went through its caller's own token"


async def test_an_unreachable_project_is_unavailable_and_recovers_by_itself(
    deployment: Deployment,
) -> None:
    credits, fake = deployment.credits, deployment.fake
    user = await funded(credits, 10)
    await fake.go_down()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    finally:
        await fake.come_back()
    found = failure(raised.value)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
    assert found.retry_delay_seconds is not None
    assert found.retry_delay_seconds > 0
    # An outage is not a credential failure: no fallback, and the next call just works.
    assert user_calls(fake) == 0
    reply = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert reply.balance == 10


# credits check-config


async def test_check_config_passes_on_a_healthy_project(deployment: Deployment) -> None:
    results = await checks.run(deployment.app.settings)
    assert [(r.name, r.ok) for r in results] == [
        ("service key accepted", True),
        ("migrations applied", True),
        ("anon key accepted", True),
        ("token keys", True),
        ("tracing", True),
        ("serving", True),
    ]


async def test_check_config_names_the_newest_migration_a_project_lacks(
    fresh_database_url: str, tmp_path: Path
) -> None:
    shipped = migrate.discover()
    for migration in shipped[:-1]:  # a project that has not pushed the newest one yet
        (tmp_path / migration.path.name).write_bytes(migration.path.read_bytes())
    await migrate.migrate(fresh_database_url, migrations_dir=tmp_path)
    fake = await FakeSupabase.start(fresh_database_url, jwt_secret=TEST_JWT_SECRET)
    try:
        results = await checks.run(settings_for("supabase", fresh_database_url, fake))
    finally:
        await fake.stop()
    applied = next(r for r in results if r.name == "migrations applied")
    assert not applied.ok
    assert applied.detail == f"missing: {shipped[-1].path.stem}"
    assert "supabase db push" in applied.hint


async def test_check_config_names_a_refused_service_key(deployment: Deployment) -> None:
    deployment.fake.reject_service_key("gateway")
    results = {r.name: r for r in await checks.run(deployment.app.settings)}
    assert not results["service key accepted"].ok
    assert "SUPABASE_SERVICE_ROLE_KEY" in results["service key accepted"].hint
    assert results["anon key accepted"].ok


async def test_check_config_reads_the_jwks_and_verifies_a_project_token(
    deployment: Deployment,
) -> None:
    fake = deployment.fake
    settings = dataclasses.replace(
        deployment.app.settings, jwks_url=f"{fake.url}/auth/v1/.well-known/jwks.json"
    )
    token = fake.mint_user_token("5b0c3a4e-8f7d-4a53-9a55-6c1f3f0f3a11")
    results = {r.name: r for r in await checks.run(settings, token)}
    assert results["JWKS reachable"].ok
    assert "ES256" in results["JWKS reachable"].detail
    assert results["token verifies"].ok
    bad = {r.name: r for r in await checks.run(settings, token[:-4] + "AAAA")}
    assert not bad["token verifies"].ok


async def test_check_config_command_exits_non_zero_on_a_failure(deployment: Deployment) -> None:
    fake = deployment.fake
    env = {
        "SUPABASE_URL": fake.url,
        "SUPABASE_ANON_KEY": fake.anon_key,
        "SUPABASE_SERVICE_ROLE_KEY": fake.service_role_key,
        "SUPABASE_JWT_SECRET": TEST_JWT_SECRET,
        "PATH": "/usr/bin:/bin",
    }

    async def check_config() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "check-config",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        return process.returncode or 0, output.decode()

    code, output = await check_config()
    assert code == 0, output
    assert "OK   service key accepted" in output
    fake.reject_service_key("jwt")
    code, output = await check_config()
    assert code == 1, output
    assert "FAIL service key accepted" in output
    assert fake.service_role_key not in output


async def test_the_new_key_formats_work_like_the_legacy_ones(database_url: str) -> None:
    fake = await FakeSupabase.start(database_url, jwt_secret=TEST_JWT_SECRET)
    settings = dataclasses.replace(
        settings_for("supabase", database_url, fake),
        supabase_anon_key=fake.publishable_key,
        supabase_service_role_key=fake.secret_key,
    )
    app = await application.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            credits = Stub(channel)
            user = await funded(credits, 7)
            # The secret key itself is also accepted as a service's bearer.
            as_key = (("authorization", f"Bearer {fake.secret_key}"),)
            reply = await credits.GetBalance(
                pb.GetBalanceRequest(user_id=user.user_id), metadata=as_key
            )
            assert reply.balance == 7
            fake.reject_service_key("gateway")
            fake.reset_counts()
            mine = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
            assert mine.balance == 7
            assert user_calls(fake) == 1, "the publishable key carries the user layer"
    finally:
        await app.stop(grace=1)
        await fake.stop()


PROVISION = ("service_role", "/rest/v1/rpc/credit_provision_profile")


async def test_a_users_profile_is_made_sure_of_once_not_on_every_call(
    deployment: Deployment,
) -> None:
    credits, fake = deployment.credits, deployment.fake
    generations = generation_service_pb2_grpc.GenerationServiceStub(deployment.channel)
    known, newcomer = await funded(credits, 5), new_user()
    fake.reset_counts()
    for _ in range(3):  # a call that never reads the profile, by a user seen before: free
        await generations.ListModels(gpb.ListModelsRequest(), metadata=known.metadata)
        await credits.GetBalance(pb.GetBalanceRequest(), metadata=known.metadata)
    assert fake.requests[PROVISION] == 0
    for _ in range(3):  # a newcomer's: made the first time only
        await generations.ListModels(gpb.ListModelsRequest(), metadata=newcomer.metadata)
    assert fake.requests[PROVISION] == 1
