"""The common unary Connect call is served in front of the connectrpc runtime
(server/edges/unary.py) and answers exactly as the runtime does: the same status, body, content
type and request id, for answers and for the contract's errors, in JSON and binary. A deadline
(`connect-timeout-ms`) sends the same call through the runtime, which is what the answers are
compared with. Two differences are on purpose: the lean answer has a content-length where the
runtime's is chunked, and only an answer of GZIP_MIN_BYTES or more is gzip-compressed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from credits.v1 import credit_service_pb2 as cpb
from server import app as application
from server.edges.unary import GZIP_MIN_BYTES
from tests.fixtures.server import SERVICE, User, new_user

CREDIT = "/credits.v1.CreditService/"
# Through the runtime: a deadline is left to it.
RUNTIME = {"connect-timeout-ms": "60000"}
CONTENT_TYPES = {"json": "application/json", "proto": "application/proto"}


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as client:
        yield client


def body_of(message: Message, codec: str) -> bytes:
    if codec == "json":
        return json_format.MessageToJson(message).encode()
    return message.SerializeToString()


async def both(
    http: httpx.AsyncClient,
    server: application.Application,
    method: str,
    body: bytes,
    token: str | None,
    codec: str = "json",
) -> tuple[httpx.Response, httpx.Response]:
    """The same call served lean, then by the runtime (each with its own request id)."""
    answers = []
    for extra in ({}, RUNTIME):
        headers = {"content-type": CONTENT_TYPES[codec], "x-request-id": str(uuid.uuid4()), **extra}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        url = f"http://127.0.0.1:{server.http_port}{CREDIT}{method}"
        answer = await http.post(url, content=body, headers=headers)
        assert answer.headers["x-request-id"] == headers["x-request-id"]
        answers.append(answer)
    lean, runtime = answers
    assert "content-length" in lean.headers
    assert runtime.headers.get("transfer-encoding") == "chunked"  # what tells them apart
    return lean, runtime


def same(lean: httpx.Response, runtime: httpx.Response) -> None:
    assert (lean.status_code, lean.content) == (runtime.status_code, runtime.content)
    assert lean.headers["content-type"] == runtime.headers["content-type"]


def token_of(user: User) -> str:
    return dict(user.metadata)["authorization"].removeprefix("Bearer ")


SERVICE_TOKEN = dict(SERVICE)["authorization"].removeprefix("Bearer ")


async def provisioned(http: httpx.AsyncClient, server: application.Application) -> User:
    """A new user whose first call made their profile."""
    user = new_user()
    url = f"http://127.0.0.1:{server.http_port}{CREDIT}GetBalance"
    headers = {"content-type": "application/json", "authorization": f"Bearer {token_of(user)}"}
    assert (await http.post(url, content=b"{}", headers=headers)).status_code == 200
    return user


@pytest.mark.parametrize("codec", ["json", "proto"])
async def test_answers_and_errors_are_the_runtimes(
    http: httpx.AsyncClient, server: application.Application, codec: str
) -> None:
    user = new_user()
    balance = body_of(cpb.GetBalanceRequest(), codec)
    lean, runtime = await both(http, server, "GetBalance", balance, token_of(user), codec)
    same(lean, runtime)
    assert lean.status_code == 200
    # A small answer: compressed by the runtime for a caller that accepts gzip (httpx does),
    # not here.
    assert (lean.headers["content-encoding"], runtime.headers["content-encoding"]) == (
        "identity",
        "gzip",
    )
    # The contract's errors, with their details: no token, a token that does not verify, a
    # body that does not decode, a debit past the balance, a grant refused to a user.
    cases = [
        ("GetBalance", balance, None),
        ("GetBalance", balance, "not-a-jwt"),
        ("GetBalance", b"\xff{not a message", token_of(user)),
        (
            "DebitCredits",
            body_of(cpb.DebitCreditsRequest(amount=10, idempotency_key="too-much"), codec),
            token_of(user),
        ),
        (
            "GrantCredits",
            body_of(
                cpb.GrantCreditsRequest(user_id=user.user_id, amount=5, idempotency_key="g"), codec
            ),
            token_of(user),
        ),
    ]
    for method, body, token in cases:
        lean, runtime = await both(http, server, method, body, token, codec)
        same(lean, runtime)
        assert lean.status_code >= 400, lean.content


async def test_a_debit_is_answered_alike_and_a_replay_is_the_same_answer(
    http: httpx.AsyncClient, server: application.Application
) -> None:
    user = await provisioned(http, server)
    grant = cpb.GrantCreditsRequest(user_id=user.user_id, amount=100, idempotency_key="seed")
    lean, runtime = await both(http, server, "GrantCredits", body_of(grant, "json"), SERVICE_TOKEN)
    assert lean.status_code == runtime.status_code == 200, lean.content
    granted = json_format.Parse(lean.content, cpb.GrantCreditsResponse())
    replayed = json_format.Parse(runtime.content, cpb.GrantCreditsResponse())
    assert (granted.replayed, replayed.replayed) == (False, True)
    debit = body_of(cpb.DebitCreditsRequest(amount=3, idempotency_key="d1"), "json")
    lean, runtime = await both(http, server, "DebitCredits", debit, token_of(user))
    assert lean.status_code == runtime.status_code == 200
    first = json_format.Parse(lean.content, cpb.DebitCreditsResponse())
    again = json_format.Parse(runtime.content, cpb.DebitCreditsResponse())
    assert (first.balance, first.replayed, again.replayed) == (97, False, True)
    assert first.transaction == again.transaction


async def test_a_large_answer_is_gzip_compressed_for_a_caller_that_accepts_it(
    http: httpx.AsyncClient, server: application.Application
) -> None:
    user = await provisioned(http, server)
    for n in range(12):
        grant = cpb.GrantCreditsRequest(
            user_id=user.user_id, amount=1, idempotency_key=f"g{n}", description="x" * 40
        )
        lean, _ = await both(http, server, "GrantCredits", body_of(grant, "json"), SERVICE_TOKEN)
        assert lean.status_code == 200, lean.content
    page = body_of(cpb.ListTransactionsRequest(), "json")
    lean, runtime = await both(http, server, "ListTransactions", page, token_of(user))
    same(lean, runtime)
    assert len(lean.content) >= GZIP_MIN_BYTES
    assert lean.headers["content-encoding"] == runtime.headers["content-encoding"] == "gzip"
