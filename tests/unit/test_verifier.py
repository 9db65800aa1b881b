"""TokenVerifier against the contract's principal rules, with real keys and a local JWKS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from server import errors
from server.auth.principal import ServicePrincipal, UserPrincipal
from server.auth.tokens import mint_service_token, mint_user_token
from server.auth.verifier import TokenVerifier, bearer_token
from server.config import Settings

SECRET = "unit-test-jwt-secret-" + "x" * 64
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256"
API_KEY = "sb_secret_unit_test_api_key"
USER_ID = uuid.UUID("5b0c6b4e-3f0a-4d8e-9a51-0c1d2e3f4a5b")


class Jwks:
    """Signing keys plus a local HTTP server that publishes their public halves as a JWKS."""

    def __init__(self) -> None:
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        keys = [
            {**ECAlgorithm.to_jwk(self.ec_key.public_key(), as_dict=True), "kid": "ec-1"},
            {**RSAAlgorithm.to_jwk(self.rsa_key.public_key(), as_dict=True), "kid": "rsa-1"},
        ]
        body = json.dumps({"keys": [{**k, "use": "sig"} for k in keys]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ec_public_pem(self) -> bytes:
        return self.ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def jwks() -> Iterator[Jwks]:
    published = Jwks()
    yield published
    published.server.shutdown()
    published.server.server_close()


@pytest.fixture(scope="module")
def verifier(jwks: Jwks) -> TokenVerifier:
    return TokenVerifier(hs256_secret=SECRET, jwks_url=jwks.url, service_keys=["other", API_KEY])


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid user claims; an override of None drops that claim."""
    now = int(time.time())
    base = {
        "sub": str(USER_ID),
        "aud": "authenticated",
        "role": "authenticated",
        "email": "ada@example.com",
        "iat": now,
        "exp": now + 3600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def hs256_raw(payload: dict[str, Any], key: bytes) -> str:
    """HS256 signed by hand, for keys PyJWT refuses to use as HMAC secrets (a PEM)."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "ec-1"}).encode())
    signing_input = header + b"." + b64(json.dumps(payload).encode())
    signature = b64(hmac.new(key, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode()


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER a.b.c", "a.b.c")],
)
def test_bearer_token_accepts(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    "header",
    [
        *(None, "", "Bearer", "Bearer ", "Token abc", "Bearer a b", "Bearer  abc", "abc"),
        # Whitespace inside the token, of every kind str.isspace knows.
        *("Bearer a\tb", "Bearer a\nb", "Bearer ab\r", "Bearer a\u00a0b", "Bearer a\u2003b"),
    ],
)
def test_bearer_token_rejects_malformed_headers(header: str | None) -> None:
    with pytest.raises(errors.TokenMissing):
        bearer_token(header)


async def test_hs256_user_token_gives_user_principal(verifier: TokenVerifier) -> None:
    token = mint_user_token(SECRET, USER_ID, email="ada@example.com")
    principal = await verifier.authenticate(f"Bearer {token}")
    assert isinstance(principal, UserPrincipal)
    assert principal.user_id == USER_ID
    assert principal.email == "ada@example.com"
    assert principal.token == token
    assert principal.claims["role"] == "authenticated"


async def test_audience_list_containing_ours_is_accepted(verifier: TokenVerifier) -> None:
    principal = await verifier.verify(hs256(claims(aud=["other", "authenticated"])))
    assert isinstance(principal, UserPrincipal)


async def test_service_role_token_needs_no_audience(verifier: TokenVerifier) -> None:
    assert isinstance(await verifier.verify(mint_service_token(SECRET)), ServicePrincipal)


async def test_service_api_key_gives_service_principal(verifier: TokenVerifier) -> None:
    assert isinstance(await verifier.authenticate(f"Bearer {API_KEY}"), ServicePrincipal)


async def test_a_token_past_its_exp_by_a_moment_is_expired(verifier: TokenVerifier) -> None:
    # PyJWT's leeway (for the issuer's clock skew in iat and nbf) does not stretch `exp`.
    with pytest.raises(errors.TokenExpired):
        await verifier.verify(hs256(claims(exp=int(time.time()))))


async def test_an_iat_a_moment_ahead_of_this_clock_is_accepted(verifier: TokenVerifier) -> None:
    now = int(time.time())
    assert isinstance(await verifier.verify(hs256(claims(iat=now + 5))), UserPrincipal)


ISSUER = "https://abcdefghijklmnopqrst.supabase.co/auth/v1"


async def test_a_configured_issuer_is_required_of_user_tokens() -> None:
    checked = TokenVerifier(hs256_secret=SECRET, issuer=ISSUER)
    assert isinstance(await checked.verify(hs256(claims(iss=ISSUER))), UserPrincipal)
    for iss in ("https://another-project.supabase.co/auth/v1", ISSUER + "/", None):
        with pytest.raises(errors.TokenInvalid, match="issued by another project"):
            await checked.verify(hs256(claims(iss=iss)))


async def test_service_role_tokens_keep_supabases_own_issuer() -> None:
    # Supabase's legacy service-role key says iss "supabase", not the auth endpoint.
    checked = TokenVerifier(hs256_secret=SECRET, issuer=ISSUER)
    assert isinstance(await checked.verify(mint_service_token(SECRET)), ServicePrincipal)


async def test_without_a_configured_issuer_any_is_accepted(verifier: TokenVerifier) -> None:
    principal = await verifier.verify(hs256(claims(iss="https://elsewhere.example/auth/v1")))
    assert isinstance(principal, UserPrincipal)


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
async def test_jwks_tokens_are_accepted(verifier: TokenVerifier, jwks: Jwks, alg: str) -> None:
    key, kid = (jwks.ec_key, "ec-1") if alg == "ES256" else (jwks.rsa_key, "rsa-1")
    token = jwt.encode(claims(), key, algorithm=alg, headers={"kid": kid})
    principal = await verifier.verify(token)
    assert isinstance(principal, UserPrincipal)
    assert principal.user_id == USER_ID


def _foreign_es256(payload: dict[str, Any]) -> str:
    foreign = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(payload, foreign, algorithm="ES256", headers={"kid": "nope"})


def now() -> int:
    """The time when a case's token is made (at test time, not at collection: a long session
    reaches these tests more than 300 s after it collected them)."""
    return int(time.time())


Invalid, Expired = errors.TokenInvalid, errors.TokenExpired
# name -> (token built from the published keys, the error it raises, a piece of its message)
BAD_TOKENS: dict[str, tuple[Callable[[Jwks], str], type[errors.CreditsError], str]] = {
    "garbage": (lambda _: "not-a-jwt", Invalid, "well-formed"),
    "wrong secret": (lambda _: hs256(claims(), OTHER_SECRET), Invalid, "signature"),
    "expired": (lambda _: hs256(claims(exp=now() - 60)), Expired, "expired"),
    "missing exp": (lambda _: hs256(claims(exp=None)), Invalid, "'exp'"),
    "nbf in the future": (lambda _: hs256(claims(nbf=now() + 300)), Invalid, "not valid yet"),
    "iat in the future": (lambda _: hs256(claims(iat=now() + 300)), Invalid, "not valid yet"),
    "wrong audience": (lambda _: hs256(claims(aud="someone-else")), Invalid, "audience"),
    "missing audience": (lambda _: hs256(claims(aud=None)), Invalid, "audience"),
    "alg none": (lambda _: jwt.encode(claims(), "", algorithm="none"), Invalid, "algorithm"),
    "alg HS512": (
        lambda _: jwt.encode(claims(), SECRET, algorithm="HS512"),
        Invalid,
        "algorithm is not allowed",
    ),
    "HS256 keyed with the public PEM": (
        lambda keys: hs256_raw(claims(), keys.ec_public_pem()),
        Invalid,
        "signature",
    ),
    "unknown kid": (lambda _: _foreign_es256(claims()), Invalid, "no known signing key"),
    "no kid": (
        lambda keys: jwt.encode(claims(), keys.ec_key, algorithm="ES256"),
        Invalid,
        "(kid)",
    ),
    "alg differs from the key's": (
        lambda keys: jwt.encode(claims(), keys.rsa_key, algorithm="RS256", headers={"kid": "ec-1"}),
        Invalid,
        "does not match its signing key",
    ),
    "anon role": (lambda _: hs256(claims(role="anon")), Invalid, "role"),
    "missing role": (lambda _: hs256(claims(role=None)), Invalid, "role"),
    "missing sub": (lambda _: hs256(claims(sub=None)), Invalid, "subject"),
    "non-UUID sub": (lambda _: hs256(claims(sub="ada")), Invalid, "subject"),
    "non-canonical UUID sub": (lambda _: hs256(claims(sub=USER_ID.hex)), Invalid, "subject"),
    "service token, wrong secret": (
        lambda _: mint_service_token(OTHER_SECRET),
        Invalid,
        "signature",
    ),
    "near-miss service key": (lambda _: API_KEY + "x", Invalid, "well-formed"),
}


@pytest.mark.parametrize("name", BAD_TOKENS)
async def test_bad_tokens_are_rejected_without_echoing_them(
    verifier: TokenVerifier, jwks: Jwks, name: str
) -> None:
    build, expected, message = BAD_TOKENS[name]
    token = build(jwks)
    with pytest.raises(errors.CreditsError) as caught:
        await verifier.verify(token)
    assert type(caught.value) is expected
    assert message in caught.value.message
    assert token not in str(caught.value)


async def test_hs256_is_refused_without_a_secret(jwks: Jwks) -> None:
    jwks_only = TokenVerifier(jwks_url=jwks.url)
    for token in (hs256(claims()), hs256_raw(claims(), jwks.ec_public_pem())):
        with pytest.raises(errors.TokenInvalid):
            await jwks_only.verify(token)


async def test_asymmetric_tokens_are_refused_without_a_jwks(jwks: Jwks) -> None:
    secret_only = TokenVerifier(hs256_secret=SECRET)
    token = jwt.encode(claims(), jwks.ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    with pytest.raises(errors.TokenInvalid):
        await secret_only.verify(token)


async def test_unreachable_jwks_is_unavailable_not_invalid(jwks: Jwks) -> None:
    unreachable = TokenVerifier(jwks_url="http://127.0.0.1:9/jwks.json", jwks_timeout=1)
    token = jwt.encode(claims(), jwks.ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    with pytest.raises(errors.BackendUnavailable):
        await unreachable.verify(token)


async def test_from_settings_uses_opaque_service_role_key_as_static_key() -> None:
    settings = Settings(jwt_secret=SECRET, supabase_service_role_key="sb_secret_abc")
    assert isinstance(
        await TokenVerifier.from_settings(settings).verify("sb_secret_abc"), ServicePrincipal
    )


async def test_from_settings_accepts_the_configured_jwt_service_role_key_verbatim() -> None:
    # A JWKS-only project cannot verify its legacy HS256 service key by signature; the
    # configured key itself is still the service's credential.
    configured = mint_service_token(OTHER_SECRET)
    settings = Settings(jwt_secret=SECRET, supabase_service_role_key=configured)
    verifier = TokenVerifier.from_settings(settings)
    assert isinstance(await verifier.verify(configured), ServicePrincipal)
    assert isinstance(await verifier.verify(mint_service_token(SECRET)), ServicePrincipal)
    # Any other service_role JWT must carry a valid signature.
    with pytest.raises(errors.TokenInvalid):
        await verifier.verify(mint_service_token(OTHER_SECRET, ttl=timedelta(hours=2)))


def test_a_supabase_project_sets_the_issuer_and_the_jwks_of_its_auth_endpoint() -> None:
    settings = Settings.from_env({"SUPABASE_URL": "https://abcdefghijklmnopqrst.supabase.co/"})
    assert settings.jwt_issuer == ISSUER
    assert settings.jwks_url == ISSUER + "/.well-known/jwks.json"


def test_the_issuer_can_be_named_and_is_unchecked_by_default() -> None:
    named = {"SUPABASE_URL": "https://x.supabase.co", "CREDITS_JWT_ISSUER": "https://auth.example"}
    assert Settings.from_env(named).jwt_issuer == "https://auth.example"
    assert Settings.from_env({"DATABASE_URL": "postgresql://db/credits"}).jwt_issuer is None


async def test_credits_token_mints_for_the_configured_issuer() -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": "postgresql://unused/credits",  # not embedded: nothing is started
        "SUPABASE_JWT_SECRET": SECRET,
        "CREDITS_JWT_ISSUER": ISSUER,
    }
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "server", "token", "--user", str(USER_ID)),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0
    minted = output.decode().strip()
    principal = await TokenVerifier.from_settings(Settings.from_env(env)).verify(minted)
    assert isinstance(principal, UserPrincipal)
    assert principal.claims["iss"] == ISSUER
