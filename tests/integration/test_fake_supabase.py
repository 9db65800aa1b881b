"""Tests OF the fake: `tests.fakes.supabase.FakeSupabase` keeps the documented behaviour of
Supabase's API gateway, PostgREST and the auth JWKS endpoint, in front of the session's migrated
database. They talk to it with raw httpx (exact statuses and bodies) and with the real clients
(postgrest-py, supabase-py), as the service does. The database is shared by the session, so each
test works on fresh user ids and puts back any setting it changes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from postgrest import AsyncPostgrestClient
from postgrest.exceptions import APIError
from postgrest.types import CountMethod
from supabase import acreate_client

from tests.fakes.supabase import FakeSupabase

JWT_SECRET = "fake-supabase-tests-" + secrets.token_hex(24)
INVALID_API_KEY = {
    "message": "Invalid API key",
    "hint": "Double check your Supabase `anon` or `service_role` API key.",
}
BAD_SIGNATURE = {
    "code": "PGRST301",
    "details": None,
    "hint": None,
    "message": "JWSError (JWSInvalidSignature)",
}


@pytest.fixture(scope="module")
async def fake(database_url: str) -> AsyncIterator[FakeSupabase]:
    started = await FakeSupabase.start(database_url, jwt_secret=JWT_SECRET)
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture(autouse=True)
def _fresh_switches(fake: FakeSupabase) -> None:
    fake.accept_service_key()
    fake.reset_counts()


def rest(fake: FakeSupabase, key: str, token: str | None = None) -> AsyncPostgrestClient:
    """The postgrest-py client as supabase-py configures it: `apiKey` plus a bearer token."""
    headers = {"apiKey": key, "Authorization": f"Bearer {token or key}"}
    return AsyncPostgrestClient(f"{fake.url}/rest/v1", headers=headers)


async def rpc(db: AsyncPostgrestClient, function: str, params: dict[str, Any]) -> Any:
    """Call `function` through postgrest-py; its decoded result."""
    response = await db.rpc(function, params).execute()
    return response.data


async def post(
    fake: FakeSupabase, path: str, body: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        return await client.post(f"/rest/v1/{path}", json=body, headers=headers)


async def get(fake: FakeSupabase, path: str, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        return await client.get(f"/rest/v1/{path}", headers=headers)


def as_user(fake: FakeSupabase, token: str) -> dict[str, str]:
    return {"apikey": fake.anon_key, "Authorization": f"Bearer {token}"}


async def provision(fake: FakeSupabase, user: uuid.UUID, grant: int = 0) -> None:
    async with rest(fake, fake.service_role_key) as db:
        await rpc(db, "credit_provision_profile", {"p_user_id": str(user)})
        if grant:
            params = {"p_user_id": str(user), "p_amount": grant, "p_idempotency_key": "seed"}
            await rpc(db, "credit_grant", params)


async def test_a_user_sees_only_their_own_rows(fake: FakeSupabase) -> None:
    me, other = uuid.uuid4(), uuid.uuid4()
    await provision(fake, other)
    token = fake.mint_user_token(me, email="me@example.com")
    async with rest(fake, fake.anon_key, token) as db:
        created = await rpc(db, "credit_provision_profile", {"p_user_id": str(me)})
        mine = await rpc(db, "credit_get_profile", {"p_user_id": str(me)})
        with pytest.raises(APIError) as hidden:
            await rpc(db, "credit_get_profile", {"p_user_id": str(other)})
        rows = await db.table("credit_profiles").select("user_id").execute()
    assert created == {"created": True}
    assert mine["user_id"] == str(me)
    assert mine["email"] == "me@example.com"  # taken from the JWT's claims
    assert hidden.value.code == "CR003"
    assert rows.data == [{"user_id": str(me)}]
    raw = await post(
        fake, "rpc/credit_get_profile", {"p_user_id": str(other)}, as_user(fake, token)
    )
    assert raw.status_code == 400
    assert raw.json() == {
        "code": "CR003",
        "details": None,
        "hint": None,
        "message": "no credit profile for this user",
    }


async def test_the_service_keys_may_grant_and_the_anon_keys_may_not(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    await provision(fake, user)
    grant = {"p_user_id": str(user), "p_amount": 5}
    async with rest(fake, fake.service_role_key) as db:
        legacy = await rpc(db, "credit_grant", {**grant, "p_idempotency_key": "a"})
    async with rest(fake, fake.secret_key) as db:
        opaque = await rpc(db, "credit_grant", {**grant, "p_idempotency_key": "b"})
    assert (legacy["balance"], opaque["balance"]) == (5, 10)
    for key in (fake.anon_key, fake.publishable_key):
        body = {**grant, "p_idempotency_key": "c"}
        raw = await post(fake, "rpc/credit_grant", body, {"apikey": key})
        assert raw.status_code == 401
        assert raw.json()["code"] == "42501"
        assert raw.headers["WWW-Authenticate"] == "Bearer"


async def test_a_users_forbidden_call_is_403(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    token = fake.mint_user_token(user)
    body = {"p_user_id": str(user), "p_amount": 1, "p_idempotency_key": "x"}
    raw = await post(fake, "rpc/credit_grant", body, as_user(fake, token))
    assert (raw.status_code, raw.json()["code"]) == (403, "42501")


async def test_insufficient_credits_carry_their_detail(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    await provision(fake, user, grant=3)
    token = fake.mint_user_token(user, alg="HS256")
    params = {"p_user_id": str(user), "p_amount": 10, "p_idempotency_key": "too-much"}
    async with rest(fake, fake.publishable_key, token) as db:
        with pytest.raises(APIError) as refused:
            await rpc(db, "credit_debit", params)
    assert (refused.value.code, refused.value.message) == ("CR001", "insufficient credits")
    assert isinstance(refused.value.details, str)
    assert json.loads(refused.value.details) == {"required": 10, "available": 3, "scope": ""}


async def test_arguments_are_cast_from_json_by_name(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    await provision(fake, user, grant=4)
    params = {
        "p_user_id": str(user),
        "p_limit": "10",  # a string cast to integer, as PostgREST does
        "p_kinds": ["grant"],
        "p_start": "2000-01-01T00:00:00Z",
    }
    async with rest(fake, fake.secret_key) as db:
        listed = await rpc(db, "credit_list_transactions", params)
        swept = await rpc(db, "credit_expire_holds", {})
        lag = await rpc(db, "credit_settlement_lag", {})
    assert [(t["kind"], t["amount"]) for t in listed] == [("grant", 4)]
    assert isinstance(swept, int)
    assert isinstance(lag, int | float)
    assert lag >= 0


async def test_tokens_are_checked_like_postgrest(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    other_key = ec.generate_private_key(ec.SECP256R1())
    kid = fake.jwks()["keys"][0]["kid"]
    claims = {"sub": str(user), "role": "authenticated", "exp": 4_000_000_000}
    cases = {
        fake.mint_user_token(user, ttl=-60): (401, "PGRST303", "JWT expired"),
        fake.mint_user_token(user, claims={"iat": 4_000_000_000}): (
            401,
            "PGRST303",
            "JWT issued at future",
        ),
        jwt.encode(claims, "another-secret-" + "x" * 32, algorithm="HS256"): (
            401,
            "PGRST301",
            "JWSError (JWSInvalidSignature)",
        ),
        jwt.encode(claims, other_key, algorithm="ES256", headers={"kid": kid}): (
            401,
            "PGRST301",
            "JWSError (JWSInvalidSignature)",
        ),
        fake.sign({**claims, "role": "no_such_role"}): (401, "22023", None),
    }
    body = {"p_user_id": str(user)}
    for token, (status, code, message) in cases.items():
        raw = await post(fake, "rpc/credit_get_profile", body, as_user(fake, token))
        assert (raw.status_code, raw.json()["code"]) == (status, code), raw.text
        assert message is None or raw.json()["message"] == message
    garbage = await post(fake, "rpc/credit_get_profile", body, as_user(fake, "not-a-jwt"))
    assert (garbage.status_code, garbage.json()["code"]) == (401, "PGRST301")
    # PostgREST allows 30 seconds of clock skew.
    late = await post(
        fake, "rpc/credit_get_profile", body, as_user(fake, fake.mint_user_token(user, ttl=-5))
    )
    assert late.json()["code"] == "CR003"


async def test_the_service_jwt_can_be_rejected_by_postgrest(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    await provision(fake, user)
    fake.reject_service_key("jwt")
    body = {"p_user_id": str(user)}
    for key in (fake.service_role_key, fake.secret_key):
        raw = await post(fake, "rpc/credit_get_profile", body, {"apikey": key})
        assert raw.status_code == 401
        assert raw.json() == BAD_SIGNATURE
    async with rest(fake, fake.service_role_key) as db:
        with pytest.raises(APIError) as refused:
            await rpc(db, "credit_get_profile", body)
    assert refused.value.code == "PGRST301"
    user_call = await post(
        fake, "rpc/credit_get_profile", body, as_user(fake, fake.mint_user_token(user))
    )
    assert user_call.status_code == 200
    assert fake.rejected_service_key_requests == 3
    fake.accept_service_key()
    raw = await post(fake, "rpc/credit_get_profile", body, {"apikey": fake.service_role_key})
    assert raw.status_code == 200


async def test_the_service_key_can_be_rejected_by_the_gateway(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    await provision(fake, user)
    fake.reject_service_key("gateway")
    body = {"p_user_id": str(user)}
    for key in (fake.service_role_key, fake.secret_key):
        raw = await post(fake, "rpc/credit_get_profile", body, {"apikey": key})
        assert raw.status_code == 401
        assert raw.json() == INVALID_API_KEY
    async with rest(fake, fake.secret_key) as db:
        with pytest.raises(APIError) as refused:
            await rpc(db, "credit_get_profile", body)
    assert (refused.value.code, refused.value.message) == (None, "Invalid API key")
    assert fake.rejected_service_key_requests == 3
    assert fake.requests[("service_role", "/rest/v1/rpc/credit_get_profile")] == 0
    fake.accept_service_key()
    raw = await post(fake, "rpc/credit_get_profile", body, {"apikey": fake.secret_key})
    assert raw.status_code == 200


async def test_the_gateway_wants_a_known_api_key(fake: FakeSupabase) -> None:
    body = {"p_users": 1}
    missing = await post(fake, "rpc/credit_expire_holds", body, {})
    assert missing.status_code == 401
    assert missing.json() == {
        "message": "No API key found in request",
        "hint": "No `apikey` request header or url param was found.",
    }
    unknown = await post(fake, "rpc/credit_expire_holds", body, {"apikey": "sb_secret_nope"})
    assert (unknown.status_code, unknown.json()) == (401, INVALID_API_KEY)
    mixed = {"apikey": fake.secret_key, "Authorization": f"Bearer {fake.publishable_key}"}
    assert (await post(fake, "rpc/credit_expire_holds", body, mixed)).status_code == 401
    shouting = await post(fake, "rpc/credit_expire_holds", body, {"APIKEY": fake.secret_key})
    assert shouting.status_code == 200
    in_url = await post(fake, f"rpc/credit_expire_holds?apikey={fake.secret_key}", body, {})
    assert in_url.status_code == 200


async def test_going_down_refuses_connections_and_comes_back_on_the_same_port(
    fake: FakeSupabase,
) -> None:
    port = fake.port
    await fake.go_down()
    try:
        with pytest.raises(httpx.ConnectError):
            await post(fake, "rpc/credit_expire_holds", {}, {"apikey": fake.secret_key})
    finally:
        await fake.come_back()
    assert fake.port == port
    raw = await post(fake, "rpc/credit_expire_holds", {}, {"apikey": fake.secret_key})
    assert raw.status_code == 200


async def test_a_void_function_answers_204(fake: FakeSupabase, database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        before = await conn.fetchval("select signup_credits from credits_private.settings")
        try:
            async with rest(fake, fake.service_role_key) as db:
                done = await rpc(db, "credit_configure", {"p_signup_credits": 7})
            changed = await conn.fetchval("select signup_credits from credits_private.settings")
            raw = await post(
                fake,
                "rpc/credit_configure",
                {"p_signup_credits": before},
                {"apikey": fake.service_role_key},
            )
        finally:
            await conn.execute("update credits_private.settings set signup_credits = $1", before)
    finally:
        await conn.close()
    assert not done
    assert changed == 7
    assert (raw.status_code, raw.content) == (204, b"")


async def test_unknown_functions_and_arguments_are_pgrst202(fake: FakeSupabase) -> None:
    key = {"apikey": fake.secret_key}
    unknown = await post(fake, "rpc/credit_nope", {"b": 1, "a": 2}, key)
    assert unknown.status_code == 404
    assert unknown.json()["code"] == "PGRST202"
    assert unknown.json()["message"] == (
        "Could not find the function public.credit_nope(a, b) in the schema cache"
    )
    wrong_names = await post(fake, "rpc/credit_get_profile", {"user_id": str(uuid.uuid4())}, key)
    assert (wrong_names.status_code, wrong_names.json()["code"]) == (404, "PGRST202")
    missing = await post(fake, "rpc/credit_debit", {"p_user_id": str(uuid.uuid4())}, key)
    assert (missing.status_code, missing.json()["code"]) == (404, "PGRST202")
    bad_uuid = await post(fake, "rpc/credit_get_profile", {"p_user_id": "nope"}, key)
    assert (bad_uuid.status_code, bad_uuid.json()["code"]) == (400, "22P02")


async def test_tables_are_read_with_eq_filters_under_the_callers_role(
    fake: FakeSupabase,
) -> None:
    user = uuid.uuid4()
    await provision(fake, user, grant=9)
    async with rest(fake, fake.secret_key) as db:
        rows = await (
            db.table("credit_transactions")
            .select("user_id, kind, amount", count=CountMethod.exact)
            .eq("user_id", str(user))
            .eq("kind", "grant")
            .order("seq", desc=True)
            .limit(5)
            .execute()
        )
        one = await (
            db.table("credit_profiles").select("*").eq("user_id", str(user)).single().execute()
        )
    data: Any = rows.data
    assert data == [{"user_id": str(user), "kind": "grant", "amount": 9}]
    assert rows.count == 1
    profile: Any = one.data
    assert profile["balance"] == 9
    key = {"apikey": fake.secret_key}
    assert (await get(fake, "nope?select=*", key)).json()["code"] == "PGRST205"
    bad_column = await get(fake, "credit_profiles?nope=eq.1", key)
    assert (bad_column.status_code, bad_column.json()["code"]) == (400, "42703")
    anon = await get(fake, f"credit_profiles?user_id=eq.{user}", {"apikey": fake.anon_key})
    assert (anon.status_code, anon.json()["code"]) == (401, "42501")


async def test_the_jwks_verifies_minted_tokens(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    token = fake.mint_user_token(user, email="jwks@example.com")
    client = jwt.PyJWKClient(f"{fake.url}/auth/v1/.well-known/jwks.json")
    # PyJWKClient blocks on urllib: run it off the loop that serves the fake.
    signing_key = await asyncio.to_thread(client.get_signing_key_from_jwt, token)
    claims = jwt.decode(token, signing_key.key, algorithms=["ES256"], audience="authenticated")
    assert claims["sub"] == str(user)
    assert claims["role"] == "authenticated"
    assert claims["iss"] == f"{fake.url}/auth/v1"
    assert claims["email"] == "jwks@example.com"
    assert jwt.get_unverified_header(token)["kid"] == fake.jwks()["keys"][0]["kid"]


async def test_the_counters_count_by_role_and_path(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    token = fake.mint_user_token(user)
    await post(fake, "rpc/credit_provision_profile", {"p_user_id": str(user)}, as_user(fake, token))
    await post(fake, "rpc/credit_get_profile", {"p_user_id": str(user)}, as_user(fake, token))
    await post(fake, "rpc/credit_get_profile", {"p_user_id": str(user)}, {"apikey": fake.anon_key})
    await post(
        fake, "rpc/credit_get_profile", {"p_user_id": str(user)}, {"apikey": fake.secret_key}
    )
    await post(fake, "rpc/credit_get_profile", {"p_user_id": str(user)}, {})  # gateway: not counted
    assert fake.requests == {
        ("authenticated", "/rest/v1/rpc/credit_provision_profile"): 1,
        ("authenticated", "/rest/v1/rpc/credit_get_profile"): 1,
        ("anon", "/rest/v1/rpc/credit_get_profile"): 1,
        ("service_role", "/rest/v1/rpc/credit_get_profile"): 1,
    }
    fake.reset_counts()
    assert not fake.requests


async def test_an_unreachable_database_is_pgrst000() -> None:
    down = await FakeSupabase.start(
        "postgresql://nobody@127.0.0.1:1/nothing", jwt_secret=JWT_SECRET, connect_timeout=2
    )
    try:
        raw = await post(down, "rpc/credit_expire_holds", {}, {"apikey": down.secret_key})
    finally:
        await down.stop()
    assert raw.status_code == 503
    assert raw.json()["code"] == "PGRST000"
    assert raw.json()["message"].startswith("Could not connect with the database")


# supabase-py itself passes postgrest-py deprecated arguments.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:supabase.*")
async def test_supabase_py_works_against_the_fake(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    await provision(fake, user, grant=2)
    client = await acreate_client(fake.url, fake.secret_key)
    try:
        result = await client.rpc("credit_get_profile", {"p_user_id": str(user)}).execute()
    finally:
        await client.postgrest.aclose()
    data: Any = result.data
    assert data["balance"] == 2
    assert fake.requests[("service_role", "/rest/v1/rpc/credit_get_profile")] == 1


async def test_get_calls_run_read_only(fake: FakeSupabase) -> None:
    user = uuid.uuid4()
    await provision(fake, user, grant=1)
    key = {"apikey": fake.secret_key}
    read = await get(fake, f"rpc/credit_get_profile?p_user_id={user}", key)
    assert (read.status_code, read.json()["balance"]) == (200, 1)
    write = await get(
        fake, f"rpc/credit_grant?p_user_id={user}&p_amount=1&p_idempotency_key=get", key
    )
    assert (write.status_code, write.json()["code"]) == (405, "25006")
