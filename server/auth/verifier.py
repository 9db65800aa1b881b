"""Turns an `authorization` header into a Principal, by the rules of the public contract.

Accepted: the configured service keys (constant-time comparison), HS256 tokens signed with the
legacy Supabase secret, and ES256/RS256 tokens whose key the JWKS endpoint publishes. Errors are
the domain's TokenMissing/TokenInvalid/TokenExpired; their messages never contain the token. A
token of any other shape (header fields or claims of the wrong type, JSON nested too deep,
numbers too large) is TokenInvalid too: nothing an unauthenticated caller sends raises anything
else.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import jwt

from server import errors
from server.auth.cache import VerifiedTokens
from server.auth.principal import Principal, ServicePrincipal, UserPrincipal
from server.config import Settings

HS256 = "HS256"
# Algorithms taken from the JWKS. The key found by `kid` fixes which one verifies the token.
ASYMMETRIC_ALGORITHMS = frozenset({"ES256", "RS256"})
USER_ROLE = "authenticated"
SERVICE_ROLE = "service_role"
# Any whitespace (str.isspace's set): found by the regex engine, not char by char in Python.
_WHITESPACE = re.compile(r"\s")
# The longest token verified (a JWT is ASCII: characters are bytes). The server accepts metadata
# up to twice this (serving.py), so a longer token reaches this check and is refused with a
# reason, never at random by gRPC.
MAX_TOKEN_BYTES = 32 * 1024
# Claims whose type the contract fixes, when present: NumericDates, and strings.
TIME_CLAIMS = ("exp", "nbf", "iat")
STRING_CLAIMS = ("sub", "role", "iss", "email")
# What parsing a token's untrusted JSON may raise besides PyJWT's own errors: nesting past the
# decoder's recursion limit, and numbers that do not fit a float.
_MALFORMED = (jwt.PyJWTError, ValueError, TypeError, OverflowError, RecursionError)


def bearer_token(authorization: str | None) -> str:
    """The token of an `authorization: Bearer <token>` value; TokenMissing if malformed."""
    parts = (authorization or "").split(" ")
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise errors.TokenMissing()
    token = parts[1]
    if not token or _WHITESPACE.search(token):
        raise errors.TokenMissing()
    return token


class TokenVerifier:
    """Verifies bearer tokens against a fixed configuration (secret, JWKS, audience, keys)."""

    def __init__(
        self,
        *,
        hs256_secret: str | None = None,
        jwks_url: str | None = None,
        audience: str = "authenticated",
        issuer: str | None = None,
        service_keys: Iterable[str] = (),
        leeway: float = 10.0,
        jwks_lifespan: float = 600.0,
        jwks_timeout: float = 5.0,
        cache: VerifiedTokens | None = None,
    ) -> None:
        self._secret = hs256_secret.encode() if hs256_secret else None
        self._audience = audience
        self._issuer = issuer
        self._service_keys = tuple(key.encode() for key in service_keys if key)
        # Seconds of the issuer's clock skew allowed for `iat` and `nbf`; never for `exp`.
        self._leeway = leeway
        # No per-kid LRU (cache_keys): it never expires, so a revoked key would keep verifying.
        # The JWK set itself is cached for `jwks_lifespan` seconds.
        self._jwks = (
            jwt.PyJWKClient(jwks_url, lifespan=jwks_lifespan, timeout=jwks_timeout)
            if jwks_url
            else None
        )
        self._verified = cache if cache is not None else VerifiedTokens()

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """A verifier for the service's configuration.

        The configured service-role key is accepted as a static key whatever its format (a
        legacy JWT or the newer `sb_secret_...` key), so a JWKS-only project can still use it;
        any other service_role JWT must carry a valid signature.
        """
        keys = (settings.service_api_key, settings.supabase_service_role_key)
        return cls(
            hs256_secret=settings.jwt_secret,
            jwks_url=settings.jwks_url,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            service_keys=[key for key in keys if key],
        )

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal named by an `authorization` metadata value."""
        return await self.verify(bearer_token(authorization))

    async def verify(self, token: str) -> Principal:
        """The principal a bare token stands for. JWKS lookups run in a thread; a token that
        verified is remembered until it expires."""
        if len(token) > MAX_TOKEN_BYTES:
            raise errors.TokenInvalid("the token is larger than 32 KiB")
        if self._is_service_key(token):
            return ServicePrincipal()
        known = self._verified.get(token)
        if known is not None:
            return known
        alg, kid = self._read_header(token)
        key: bytes | jwt.PyJWK
        if alg == HS256 and self._secret is not None:
            key = self._secret
        else:
            key = await asyncio.to_thread(self._jwks_key, alg, kid)
        claims = self._decode(token, key, alg)
        expires_at = self._check_times(claims)
        principal = self._principal(token, claims)
        self._verified.put(token, principal, expires_at)
        return principal

    def _is_service_key(self, token: str) -> bool:
        # Compare against every key, without stopping early, so timing shows no match position.
        candidate = token.encode()
        matched = False
        for key in self._service_keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def _read_header(self, token: str) -> tuple[str, str | None]:
        """The token's `alg` and `kid`; any header of another shape is TokenInvalid."""
        try:
            header = jwt.get_unverified_header(token)
        except _MALFORMED:
            raise errors.TokenInvalid("the access token is not a well-formed JWT") from None
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if (
            not isinstance(alg, str)
            or not isinstance(kid, str | None)
            or not isinstance(typ, str | None)
        ):
            raise errors.TokenInvalid("the token's header is malformed")
        allowed = alg == HS256 and self._secret is not None
        allowed |= alg in ASYMMETRIC_ALGORITHMS and self._jwks is not None
        if not allowed:
            raise errors.TokenInvalid("the token's signing algorithm is not allowed")
        return alg, kid

    def _jwks_key(self, alg: str, kid: str | None) -> jwt.PyJWK:
        if self._jwks is None or kid is None:
            raise errors.TokenInvalid("the token names no signing key (kid)")
        try:
            key = self._jwks.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError:
            raise errors.BackendUnavailable("the signing keys could not be fetched") from None
        except jwt.PyJWTError:
            raise errors.TokenInvalid("no known signing key matches the token") from None
        if key.algorithm_name != alg:
            raise errors.TokenInvalid("the token's algorithm does not match its signing key")
        return key

    def _decode(self, token: str, key: bytes | jwt.PyJWK, alg: str) -> dict[str, Any]:
        """The claims of a token whose signature verifies, each of the type the contract
        names. The times are checked by `_check_times`, not PyJWT: its int() takes "123" and
        true for numbers."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                # aud and iss are checked per role below: service-role keys carry no aud, and
                # Supabase's legacy ones say iss "supabase".
                options={
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise errors.TokenInvalid("the token's signature does not verify") from None
        except _MALFORMED:
            raise errors.TokenInvalid() from None
        for name in TIME_CLAIMS:
            if name in claims and not _is_number(claims[name]):
                raise errors.TokenInvalid(f"the token's {name!r} claim is not a number")
        for name in STRING_CLAIMS:
            if name in claims and not isinstance(claims[name], str):
                raise errors.TokenInvalid(f"the token's {name!r} claim is not a string")
        aud = claims.get("aud")
        if not isinstance(aud, str | None) and not _is_list_of_strings(aud):
            raise errors.TokenInvalid("the token's 'aud' claim is not a string or a list of them")
        return claims

    def _check_times(self, claims: Mapping[str, Any]) -> float:
        """When the token expires: `exp`, required and strictly in the future (no leeway);
        `nbf` and `iat` may be up to `leeway` seconds ahead of this clock."""
        if "exp" not in claims:
            raise errors.TokenInvalid("the token lacks the 'exp' claim")
        now = time.time()
        expires_at = float(claims["exp"])
        if expires_at <= now:
            raise errors.TokenExpired()
        for name in ("nbf", "iat"):
            if name in claims and float(claims[name]) > now + self._leeway:
                raise errors.TokenInvalid("the access token is not valid yet")
        return expires_at

    def _principal(self, token: str, claims: Mapping[str, Any]) -> Principal:
        role = claims.get("role")
        if role == SERVICE_ROLE:
            return ServicePrincipal()
        if role != USER_ROLE:
            raise errors.TokenInvalid("the token's role may not use this service")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self._audience not in audiences:
            raise errors.TokenInvalid("the token is meant for another audience")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise errors.TokenInvalid("the token was issued by another project")
        email = claims.get("email", "")
        if "\x00" in email:
            email = ""  # a profile's email is PostgreSQL text, which cannot hold NUL
        return UserPrincipal(
            user_id=_user_id(claims.get("sub")),
            email=email,
            token=token,
            claims=claims,
        )


def _is_number(value: object) -> bool:
    """A JSON number usable as a NumericDate: not a boolean, finite as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


def _is_list_of_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _user_id(sub: object) -> uuid.UUID:
    """The `sub` claim as a UUID, accepted only in its canonical text form."""
    if isinstance(sub, str):
        try:
            user_id = uuid.UUID(sub)
        except ValueError:
            pass
        else:
            if str(user_id) == sub.lower():
                return user_id
    raise errors.TokenInvalid("the token's subject is not a user id")
