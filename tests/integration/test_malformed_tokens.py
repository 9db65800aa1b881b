"""Tokens signed with the right secret whose header or claims have the wrong shape are refused
as UNAUTHENTICATED / TOKEN_INVALID by the real service, and none of them reaches a traceback.

Every token here is HS256-signed by hand with the service's secret, over header and payload
bytes written as given, so only the shape is wrong: a bad signature cannot be what refuses it.
The first test proves the same signing makes a token the service accepts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any

import grpc
import grpc.aio
import pytest

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc
from tests.fixtures.errors import failure
from tests.fixtures.server import TEST_JWT_SECRET, bearer

Stub = credit_service_pb2_grpc.CreditServiceStub

# Deeper than the JSON decoder's recursion limit (RecursionError where it is not caught).
DEEP = "[" * 5000 + "]" * 5000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: str | bytes, payload: str | bytes) -> str:
    """A JWS over `header` and `payload` exactly as given, HMAC-SHA256 with the test secret."""
    raw = [part.encode() if isinstance(part, str) else part for part in (header, payload)]
    signing_input = f"{_b64(raw[0])}.{_b64(raw[1])}"
    mac = hmac.new(TEST_JWT_SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def header(**fields: Any) -> str:
    """A header with alg HS256 and typ JWT, changed by `fields`."""
    return json.dumps({"alg": "HS256", "typ": "JWT", **fields})


def claims(**fields: Any) -> str:
    """A well-formed user's claims, changed by `fields`."""
    now = int(time.time())
    valid = {
        "iss": "supabase",
        "sub": str(uuid.uuid4()),
        "aud": "authenticated",
        "role": "authenticated",
        "email": "ada@example.com",
        "iat": now,
        "exp": now + 600,
    }
    return json.dumps({**valid, **fields})


def service_claims(**fields: Any) -> str:
    now = int(time.time())
    return json.dumps(
        {"iss": "supabase", "role": "service_role", "iat": now, "exp": now + 600, **fields}
    )


# name -> (header, payload), each signed correctly.
MALFORMED: dict[str, tuple[str | bytes, str | bytes]] = {
    # Headers
    "alg a list": ('{"alg": ["HS256"], "typ": "JWT"}', claims()),
    "alg an object": (header(alg={"HS256": True}), claims()),
    "alg a number": (header(alg=256), claims()),
    "alg true": (header(alg=True), claims()),
    "alg null": (header(alg=None), claims()),
    "no alg": ('{"typ": "JWT"}', claims()),
    "kid a list": (header(kid=["k1"]), claims()),
    "kid a number": (header(kid=1), claims()),
    "kid an object": (header(kid={"k": 1}), claims()),
    "typ a list": (header(typ=["JWT"]), claims()),
    "typ a number": (header(typ=7), claims()),
    "crit a number": (header(crit=5), claims()),
    "crit an unknown extension": (header(crit=["exp"]), claims()),
    "header a list": ('["HS256"]', claims()),
    "header a string": ('"HS256"', claims()),
    "header null": ("null", claims()),
    "header a number": ("1", claims()),
    "header nested too deep": (f'{{"alg": "HS256", "x": {DEEP}}}', claims()),
    "header not JSON": ('{"alg": "HS256"', claims()),
    "header not UTF-8": (b'{"alg": "HS256\xff"}', claims()),
    # Time claims must be numbers.
    "exp a string of digits": (header(), claims(exp=str(int(time.time()) + 600))),
    "exp a word": (header(), claims(exp="soon")),
    "exp true": (header(), claims(exp=True)),
    "exp null": (header(), claims(exp=None)),
    "exp a list": (header(), claims(exp=[int(time.time()) + 600])),
    "exp an object": (header(), claims(exp={"s": 1})),
    "exp a 400-digit number": (header(), claims(exp=10**400)),
    "exp Infinity": (header(), claims(exp=float("inf"))),
    "exp NaN": (header(), claims(exp=float("nan"))),
    "nbf a string": (header(), claims(nbf="0")),
    "nbf a list": (header(), claims(nbf=[0])),
    "nbf true": (header(), claims(nbf=True)),
    "nbf NaN": (header(), claims(nbf=float("nan"))),
    "iat a string": (header(), claims(iat="0")),
    "iat an object": (header(), claims(iat={})),
    "iat false": (header(), claims(iat=False)),
    "iat -Infinity": (header(), claims(iat=float("-inf"))),
    # String claims
    "sub a number": (header(), claims(sub=5)),
    "sub a list": (header(), claims(sub=[str(uuid.uuid4())])),
    "sub null": (header(), claims(sub=None)),
    "sub an object": (header(), claims(sub={"id": str(uuid.uuid4())})),
    "role a list": (header(), claims(role=["authenticated"])),
    "role a number": (header(), claims(role=1)),
    "role an object": (header(), claims(role={"authenticated": True})),
    "aud a number": (header(), claims(aud=5)),
    "aud a list of numbers": (header(), claims(aud=[5])),
    "aud a list with a number": (header(), claims(aud=["authenticated", 5])),
    "aud an object": (header(), claims(aud={"authenticated": 1})),
    "iss a number": (header(), claims(iss=5)),
    "iss a list": (header(), claims(iss=["supabase"])),
    "email a number": (header(), claims(email=5)),
    "email a list": (header(), claims(email=["ada@example.com"])),
    "email an object": (header(), claims(email={"a": "b"})),
    "email true": (header(), claims(email=True)),
    "jti a number": (header(), claims(jti=5)),
    # Payloads
    "payload a list": (header(), "[]"),
    "payload a string": (header(), '"claims"'),
    "payload a number": (header(), "1"),
    "payload null": (header(), "null"),
    "payload nested too deep": (header(), claims(x=0).replace('"x": 0', f'"x": {DEEP}')),
    "payload not JSON": (header(), '{"exp": '),
    "payload not UTF-8": (header(), b'{"sub": "\xff"}'),
    # A service token is held to the same shapes.
    "service exp a string": (header(), service_claims(exp=str(int(time.time()) + 600))),
    "service iat a list": (header(), service_claims(iat=[0])),
    "service iss a number": (header(), service_claims(iss=1)),
    "service role a list": (header(), service_claims(role=["service_role"])),
}


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every log record that carries an exception or a formatted traceback."""
    return [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.exc_info or record.exc_text or "Traceback" in record.getMessage()
    ]


async def test_the_hand_signed_well_formed_tokens_are_accepted(credits: Stub) -> None:
    user_id = str(uuid.uuid4())
    reply = await credits.GetBalance(
        pb.GetBalanceRequest(), metadata=bearer(signed(header(), claims(sub=user_id)))
    )
    assert reply.user_id == user_id
    service = bearer(signed(header(), service_claims()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        # A service must name a user: past authentication, the request itself is refused.
        await credits.GetBalance(pb.GetBalanceRequest(), metadata=service)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("case", MALFORMED)
async def test_a_malformed_token_is_token_invalid_without_a_traceback(
    credits: Stub, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.DEBUG)
    token = signed(*MALFORMED[case])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await credits.GetBalance(pb.GetBalanceRequest(), metadata=bearer(token))
    found = failure(caught.value)
    assert (found.code, found.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
    assert tracebacks(caplog) == []
