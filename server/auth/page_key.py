"""The key that signs page tokens (server/domain/paging.py), kept like the JWT secret.

In order: CREDITS_PAGE_TOKEN_KEY; in embedded mode, a key made once in
`<data dir>/page_token_key`; a key derived from SUPABASE_JWT_SECRET, SUPABASE_SERVICE_ROLE_KEY
or CREDITS_SERVICE_API_KEY (HKDF-SHA256, so the key reveals nothing of the secret and signs
nothing else); and as a last resort a random key, with which tokens stop working when the
service restarts. Every process of one `credits serve` gets the same key: the supervisor
resolves it once, before it starts them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from pathlib import Path

from server.auth.secret_store import load_or_create_page_token_key
from server.config import Settings

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 32
# HKDF's salt and info (RFC 5869): a key derived for page tokens, version 1.
_SALT = b"credits.v1"
_INFO = b"page tokens"


def page_token_key(settings: Settings) -> str:
    """The page token key for `settings`; ValueError naming CREDITS_PAGE_TOKEN_KEY if the one
    it gives is too short to be a key."""
    if settings.page_token_key:
        if len(settings.page_token_key) < MIN_KEY_LENGTH:
            raise ValueError(f"CREDITS_PAGE_TOKEN_KEY must be at least {MIN_KEY_LENGTH} characters")
        return settings.page_token_key
    if settings.embedded:
        return load_or_create_page_token_key(Path(settings.data_dir))
    for secret in (
        settings.jwt_secret,
        settings.supabase_service_role_key,
        settings.service_api_key,
    ):
        if secret:
            return derive(secret.encode()).hex()
    log.warning(
        "no CREDITS_PAGE_TOKEN_KEY and no secret to derive one from: page tokens are signed with "
        "a random key and stop working when the service restarts"
    )
    return secrets.token_hex(32)


def derive(secret: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of `secret`: 32 bytes of key for page tokens only."""
    pseudo_random_key = hmac.new(_SALT, secret, hashlib.sha256).digest()
    return hmac.new(pseudo_random_key, _INFO + b"\x01", hashlib.sha256).digest()
