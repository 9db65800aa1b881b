"""Where the key that signs page tokens comes from (server/auth/page_key.py), as the service
resolves its settings: the variable, the embedded key file, a key derived from a secret the
service keeps anyway, or a random one."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import stat
import uuid
from pathlib import Path

import pytest

from server import app
from server.auth.page_key import derive, page_token_key
from server.auth.secret_store import PAGE_TOKEN_KEY_FILE_NAME
from server.config import Settings

JWT_SECRET = "unit-test-jwt-secret-" + "x" * 40
SERVICE_KEY = "sb_secret_unit_test_service_role_key"
DIRECT = "postgresql://credits@localhost/credits"


def test_the_variable_wins_everywhere(tmp_path: Path) -> None:
    key = "k" * 40
    for settings in (
        Settings(data_dir=tmp_path, page_token_key=key),  # embedded
        Settings(database_url=DIRECT, jwt_secret=JWT_SECRET, page_token_key=key),
    ):
        assert page_token_key(settings) == key
    assert not (tmp_path / PAGE_TOKEN_KEY_FILE_NAME).exists()


def test_a_short_variable_is_refused_naming_it() -> None:
    settings = Settings(database_url=DIRECT, jwt_secret=JWT_SECRET, page_token_key="short")
    with pytest.raises(ValueError, match=r"^CREDITS_PAGE_TOKEN_KEY must be at least 32"):
        page_token_key(settings)


def test_embedded_mode_keeps_a_key_file_next_to_the_jwt_secret(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    key = page_token_key(settings)
    path = tmp_path / PAGE_TOKEN_KEY_FILE_NAME
    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32
    assert page_token_key(settings) == key  # kept: tokens survive a restart
    resolved = app.resolve(settings)
    assert resolved.page_token_key == key
    assert resolved.jwt_secret != key


def test_a_key_is_derived_from_the_jwt_secret_then_the_service_keys() -> None:
    by_jwt = Settings(database_url=DIRECT, jwt_secret=JWT_SECRET, supabase_service_role_key="s")
    assert page_token_key(by_jwt) == derive(JWT_SECRET.encode()).hex()
    by_service_role = Settings(
        database_url=DIRECT, jwks_url="https://x/jwks", supabase_service_role_key=SERVICE_KEY
    )
    assert page_token_key(by_service_role) == derive(SERVICE_KEY.encode()).hex()
    by_api_key = Settings(
        database_url=DIRECT, jwks_url="https://x/jwks", service_api_key=SERVICE_KEY
    )
    assert page_token_key(by_api_key) == derive(SERVICE_KEY.encode()).hex()


def test_the_derivation_is_hkdf_sha256_and_reveals_nothing_of_the_secret() -> None:
    prk = hmac.new(b"credits.v1", JWT_SECRET.encode(), hashlib.sha256).digest()
    expected = hmac.new(prk, b"page tokens\x01", hashlib.sha256).digest()
    assert derive(JWT_SECRET.encode()) == expected
    assert JWT_SECRET.encode() not in derive(JWT_SECRET.encode()).hex().encode()
    assert derive(b"one secret") != derive(b"another secret")


def test_with_nothing_to_derive_from_a_random_key_is_used_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(database_url=DIRECT, jwks_url="https://x/jwks")
    with caplog.at_level(logging.WARNING, logger="server.auth.page_key"):
        first, second = page_token_key(settings), page_token_key(settings)
    assert first != second
    assert len(first) >= 32
    assert "stop working when the service restarts" in caplog.text


def test_resolve_settles_the_key_once_for_every_process_it_starts() -> None:
    settings = app.resolve(Settings(database_url=DIRECT, jwks_url="https://x/jwks"))
    assert settings.page_token_key
    # A process started with resolved settings resolves them again to the same key.
    assert app.resolve(dataclasses.replace(settings)).page_token_key == settings.page_token_key


def test_the_service_signs_with_the_resolved_key() -> None:
    settings = app.resolve(Settings(database_url=DIRECT, jwt_secret=JWT_SECRET))
    user_id = uuid.uuid4()
    issued = app.page_tokens(settings).issue(user_id, "scope", 7)
    assert app.page_tokens(app.resolve(settings)).read(issued, user_id, "scope") == 7


def test_the_variables_are_read() -> None:
    settings = Settings.from_env(
        {
            "CREDITS_PAGE_TOKEN_KEY": "k" * 40,
            "CREDITS_MAX_PROMPT_BYTES": "100",
            "CREDITS_MAX_PARAMETERS_BYTES": "50",
        }
    )
    assert settings.page_token_key == "k" * 40
    assert (settings.max_prompt_bytes, settings.max_parameters_bytes) == (100, 50)
    defaults = Settings.from_env({})
    assert (defaults.page_token_key, defaults.max_prompt_bytes) == (None, 16 * 1024)
    assert defaults.max_parameters_bytes == 32 * 1024


@pytest.mark.parametrize("name", ["CREDITS_MAX_PROMPT_BYTES", "CREDITS_MAX_PARAMETERS_BYTES"])
def test_a_limit_must_be_a_whole_number_of_at_least_one(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be a whole number >= 1"):
        Settings.from_env({name: "0"})
