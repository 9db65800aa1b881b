"""The call interceptor's authentication on a real grpc.aio server: rejections on unary and
streaming RPCs alike.

GetBalance echoes the principal the handler sees; WatchGeneration is the generated base
(server-streaming, UNIMPLEMENTED), so a rejection there proves the streaming path works.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import grpc.aio
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_status import rpc_status
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from credits.v1 import (
    credit_service_pb2,
    credit_service_pb2_grpc,
    generation_service_pb2,
    generation_service_pb2_grpc,
)
from server.auth.principal import UserPrincipal, current_principal
from server.auth.tokens import mint_service_token, mint_user_token
from server.auth.verifier import TokenVerifier
from server.interceptors import CallInterceptor
from server.serving import GuardedServer

SECRET = "integration-test-jwt-secret-" + "y" * 40
OTHER_SECRET = "not-the-configured-secret-" + "z" * 40
API_KEY = "sb_secret_integration_test_key"
USER_ID = uuid.UUID("0f6f2c1e-8d7b-4c3a-9e21-5a4b3c2d1e0f")


class Keys:
    """EC and RSA signing keys, published as a JWKS by a local HTTP server."""

    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwks = {
            "keys": [
                {**ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True), "kid": "ec-1"},
                {**RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": "rsa-1"},
            ]
        }
        body = json.dumps(jwks).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.jwks_url = f"http://127.0.0.1:{self.http.server_address[1]}/jwks.json"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def ec_public_pem(self) -> bytes:
        return self.ec.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class EchoCredits(credit_service_pb2_grpc.CreditServiceServicer):
    """GetBalance answers with the principal the interceptor bound for this call."""

    async def GetBalance(
        self, request: credit_service_pb2.GetBalanceRequest, context: Any
    ) -> credit_service_pb2.GetBalanceResponse:
        principal = current_principal()
        if isinstance(principal, UserPrincipal):
            return credit_service_pb2.GetBalanceResponse(user_id=str(principal.user_id))
        return credit_service_pb2.GetBalanceResponse(user_id=f"service:{principal.name}")


class UnimplementedWatch(generation_service_pb2_grpc.GenerationServiceServicer):
    """A server-streaming RPC that answers UNIMPLEMENTED once the caller got past auth."""

    async def WatchGeneration(  # type: ignore[override]
        self, request: generation_service_pb2.WatchGenerationRequest, context: Any
    ) -> AsyncIterator[generation_service_pb2.WatchGenerationResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served by this test server")
        yield generation_service_pb2.WatchGenerationResponse()


def _caller() -> bytes:
    principal = current_principal()
    name = principal.user_id if isinstance(principal, UserPrincipal) else principal.name
    return str(name).encode()


async def _chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    """Bidirectional, async generator: answers each message with the caller's id."""
    async for _ in requests:
        yield _caller()


# Raw-bytes methods (no serializers) covering the handler kinds the protos lack.
RAW_SERVICE = grpc.method_handlers_generic_handler(
    "test.Raw",
    {
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
    },
)


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    published = Keys()
    yield published
    published.http.shutdown()
    published.http.server_close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel(keys: Keys) -> AsyncIterator[grpc.aio.Channel]:
    verifier = TokenVerifier(
        hs256_secret=SECRET, jwks_url=keys.jwks_url, issuer=ISSUER, service_keys=[API_KEY]
    )
    server = GuardedServer(grpc.aio.server(), CallInterceptor(verifier))
    credit_service_pb2_grpc.add_CreditServiceServicer_to_server(EchoCredits(), server)  # type: ignore[abstract]
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(
        UnimplementedWatch(),  # type: ignore[abstract]
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    server.add_generic_rpc_handlers((RAW_SERVICE,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await server.stop(None)


# The issuer this server requires of user tokens (Supabase Auth's, as SUPABASE_URL sets it);
# service-role tokens keep Supabase's own "supabase".
ISSUER = "https://abcdefghijklmnopqrst.supabase.co/auth/v1"


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid user claims; an override of None drops that claim."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": str(USER_ID), "aud": "authenticated", "role": "authenticated"}
    base["iss"] = ISSUER
    base |= {"iat": now, "exp": now + 600, **overrides}
    return {k: v for k, v in base.items() if v is not None}


def user_token(user_id: uuid.UUID, email: str | None = None) -> str:
    """A user token as Supabase Auth mints it for this server's project."""
    return mint_user_token(SECRET, user_id, email=email, issuer=ISSUER)


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def hs256_keyed_with(key: bytes, payload: dict[str, Any]) -> str:
    """HS256 signed by hand with `key` (PyJWT refuses a PEM as an HMAC secret)."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "ec-1"}).encode())
    signing_input = header + b"." + b64(json.dumps(payload).encode())
    return (
        signing_input + b"." + b64(hmac.new(key, signing_input, hashlib.sha256).digest())
    ).decode()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


NOW = int(time.time())
Metadata = tuple[tuple[str, str], ...]
# name -> (metadata built from the published keys, the ErrorInfo reason expected)
REJECTED: dict[str, tuple[Callable[[Keys], Metadata], str]] = {
    "missing header": (lambda _: (), "TOKEN_MISSING"),
    "wrong scheme": (lambda _: (("authorization", "Token x"),), "TOKEN_MISSING"),
    "scheme only": (lambda _: (("authorization", "Bearer"),), "TOKEN_MISSING"),
    "empty token": (lambda _: (("authorization", "Bearer "),), "TOKEN_MISSING"),
    "garbage token": (lambda _: bearer("garbage"), "TOKEN_INVALID"),
    "wrong secret": (lambda _: bearer(hs256(claims(), OTHER_SECRET)), "TOKEN_INVALID"),
    "expired": (lambda _: bearer(hs256(claims(exp=NOW - 120))), "TOKEN_EXPIRED"),
    "expired this second": (
        lambda _: bearer(hs256(claims(exp=int(time.time())))),
        "TOKEN_EXPIRED",
    ),
    "another project's issuer": (
        lambda _: bearer(hs256(claims(iss="https://elsewhere.supabase.co/auth/v1"))),
        "TOKEN_INVALID",
    ),
    "no issuer": (lambda _: bearer(hs256(claims(iss=None))), "TOKEN_INVALID"),
    "not yet valid": (lambda _: bearer(hs256(claims(nbf=NOW + 600))), "TOKEN_INVALID"),
    "wrong audience": (lambda _: bearer(hs256(claims(aud="elsewhere"))), "TOKEN_INVALID"),
    "missing audience": (lambda _: bearer(hs256(claims(aud=None))), "TOKEN_INVALID"),
    "alg none": (lambda _: bearer(jwt.encode(claims(), "", algorithm="none")), "TOKEN_INVALID"),
    "HS256 keyed with the JWKS public key": (
        lambda k: bearer(hs256_keyed_with(k.ec_public_pem(), claims())),
        "TOKEN_INVALID",
    ),
    "unknown kid": (
        lambda k: bearer(jwt.encode(claims(), k.ec, algorithm="ES256", headers={"kid": "gone"})),
        "TOKEN_INVALID",
    ),
    "anon role": (lambda _: bearer(hs256(claims(role="anon"))), "TOKEN_INVALID"),
    "missing sub": (lambda _: bearer(hs256(claims(sub=None))), "TOKEN_INVALID"),
    "non-UUID sub": (lambda _: bearer(hs256(claims(sub="ada"))), "TOKEN_INVALID"),
    "service token, wrong secret": (
        lambda _: bearer(mint_service_token(OTHER_SECRET)),
        "TOKEN_INVALID",
    ),
}


def assert_rejected(err: grpc.aio.AioRpcError, reason: str) -> None:
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin trailer"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.domain, info.reason) == ("credits.v1", reason)


@pytest.mark.parametrize("case", REJECTED)
async def test_unary_call_is_rejected(channel: grpc.aio.Channel, keys: Keys, case: str) -> None:
    metadata, reason = REJECTED[case][0](keys), REJECTED[case][1]
    stub = credit_service_pb2_grpc.CreditServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBalance(credit_service_pb2.GetBalanceRequest(), metadata=metadata)
    assert_rejected(caught.value, reason)


@pytest.mark.parametrize("case", REJECTED)
async def test_streaming_call_is_rejected(channel: grpc.aio.Channel, keys: Keys, case: str) -> None:
    metadata, reason = REJECTED[case][0](keys), REJECTED[case][1]
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    request = generation_service_pb2.WatchGenerationRequest(generation_id=str(uuid.uuid4()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchGeneration(request, metadata=metadata):
            pass
    assert_rejected(caught.value, reason)


ACCEPTED: dict[str, tuple[Callable[[Keys], Metadata], str]] = {
    "HS256 user token": (
        lambda _: bearer(user_token(USER_ID, email="ada@example.com")),
        str(USER_ID),
    ),
    "service_role token": (lambda _: bearer(mint_service_token(SECRET)), "service:service"),
    "service API key": (lambda _: bearer(API_KEY), "service:service"),
    "ES256 token from the JWKS": (
        lambda k: bearer(jwt.encode(claims(), k.ec, algorithm="ES256", headers={"kid": "ec-1"})),
        str(USER_ID),
    ),
    "RS256 token from the JWKS": (
        lambda k: bearer(jwt.encode(claims(), k.rsa, algorithm="RS256", headers={"kid": "rsa-1"})),
        str(USER_ID),
    ),
    "lower-case scheme": (lambda _: (("authorization", f"bearer {API_KEY}"),), "service:service"),
}


@pytest.mark.parametrize("case", ACCEPTED)
async def test_accepted_principal_reaches_the_handler(
    channel: grpc.aio.Channel, keys: Keys, case: str
) -> None:
    metadata, seen_as = ACCEPTED[case][0](keys), ACCEPTED[case][1]
    stub = credit_service_pb2_grpc.CreditServiceStub(channel)
    reply = await stub.GetBalance(credit_service_pb2.GetBalanceRequest(), metadata=metadata)
    assert reply.user_id == seen_as


@pytest.mark.parametrize("case", ACCEPTED)
async def test_accepted_streaming_call_reaches_the_handler(
    channel: grpc.aio.Channel, keys: Keys, case: str
) -> None:
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    request = generation_service_pb2.WatchGenerationRequest(generation_id=str(uuid.uuid4()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchGeneration(request, metadata=ACCEPTED[case][0](keys)):
            pass
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_check_needs_no_token(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest())  # type: ignore[attr-defined]
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_rejected_bidi_call_ends_without_reading_requests(
    channel: grpc.aio.Channel,
) -> None:
    # The client sends nothing and keeps its side open: only a rejection of the same
    # (streaming) kind ends the call; a unary one would wait for a request until the deadline.
    chat: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream("/test.Raw/Chat")
    call = chat(metadata=bearer("garbage"), timeout=3)
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_principal_is_bound_in_async_generator_handlers(channel: grpc.aio.Channel) -> None:
    chat: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream("/test.Raw/Chat")
    call = chat(metadata=bearer(user_token(USER_ID)))
    for _ in range(2):
        await call.write(b"hi")
        assert await call.read() == str(USER_ID).encode()
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_principal_does_not_leak_between_concurrent_calls(
    channel: grpc.aio.Channel,
) -> None:
    stub = credit_service_pb2_grpc.CreditServiceStub(channel)
    users = [uuid.uuid4() for _ in range(20)]
    replies = await asyncio.gather(
        *(
            stub.GetBalance(credit_service_pb2.GetBalanceRequest(), metadata=bearer(user_token(u)))
            for u in users
        )
    )
    assert [r.user_id for r in replies] == [str(u) for u in users]


# Not a GetBalanceRequest: field 1 (user_id, a string) sent as a varint.
NOT_A_MESSAGE = b"\x08\x01\xff\xff"


def raw_get_balance(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """GetBalance sending the request bytes as given."""
    return channel.unary_unary("/credits.v1.CreditService/GetBalance")


async def test_a_request_that_does_not_parse_is_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_get_balance(channel)(NOT_A_MESSAGE, metadata=bearer(user_token(USER_ID)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "INVALID_ARGUMENT"


async def test_a_rejected_caller_gets_unauthenticated_before_the_request_is_parsed(
    channel: grpc.aio.Channel,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_get_balance(channel)(NOT_A_MESSAGE, metadata=bearer("garbage"))
    assert_rejected(caught.value, "TOKEN_INVALID")
