"""Mints HS256 tokens shaped like Supabase's, for local use (embedded mode, CLI) and tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

DEFAULT_ISSUER = "supabase"


def _sign(secret: str, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers={"typ": "JWT"})


def mint_user_token(
    secret: str,
    user_id: uuid.UUID,
    *,
    email: str | None = None,
    ttl: timedelta = timedelta(hours=1),
    audience: str = "authenticated",
    issuer: str = DEFAULT_ISSUER,
) -> str:
    """An access token for `user_id`, like the one Supabase Auth issues after a sign-in."""
    now = datetime.now(UTC)
    return _sign(
        secret,
        {
            "iss": issuer,
            "sub": str(user_id),
            "aud": audience,
            "exp": now + ttl,
            "iat": now,
            "email": email or "",
            "phone": "",
            "app_metadata": {"provider": "email", "providers": ["email"]},
            "user_metadata": {},
            "role": "authenticated",
            "aal": "aal1",
            "session_id": str(uuid.uuid4()),
            "is_anonymous": False,
        },
    )


def mint_service_token(
    secret: str,
    *,
    ttl: timedelta = timedelta(days=365),
    issuer: str = DEFAULT_ISSUER,
) -> str:
    """A service-role token, like Supabase's legacy service-role key (no `aud`, no `sub`)."""
    now = datetime.now(UTC)
    return _sign(secret, {"iss": issuer, "role": "service_role", "iat": now, "exp": now + ttl})
