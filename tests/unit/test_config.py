"""Settings.from_env refuses what cannot be meant: a variable set but blank (every variable the
service reads), and URLs that are not URLs, each with one message naming the variable."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from server.config import Settings


class _Recorded(dict[str, str]):
    """An environment that remembers every variable asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.append(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.append(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.asked.append(str(key))
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the settings name each variable; they do not list the environment")


def variables_read() -> list[str]:
    env = _Recorded()
    Settings.from_env(env)
    return sorted(set(env.asked))


def test_the_settings_read_the_variables_of_the_contract() -> None:
    read = variables_read()
    assert {"SUPABASE_URL", "DATABASE_URL", "CREDITS_LISTEN", "CREDITS_DATA_DIR"} <= set(read)
    assert all(name.startswith(("CREDITS_", "SUPABASE_", "DATABASE_")) for name in read), read


@pytest.mark.parametrize("name", variables_read())
@pytest.mark.parametrize("value", ["", " ", "\t\n"])
def test_a_variable_set_but_blank_is_an_error(name: str, value: str) -> None:
    if (name, value) == ("CREDITS_HTTP_LISTEN", ""):
        return  # the one exception: empty turns the Connect edge off (below)
    with pytest.raises(
        ValueError, match=rf"^{name} is set but empty; unset it or give it a value$"
    ):
        Settings.from_env({name: value})


def test_the_connect_edge_listens_on_8080_unless_told_otherwise_or_off() -> None:
    assert Settings.from_env({}).http_listen == "127.0.0.1:8080"
    assert Settings.from_env({"CREDITS_HTTP_LISTEN": ":9090"}).http_listen == ":9090"
    assert Settings.from_env({"CREDITS_HTTP_LISTEN": ""}).http_listen is None
    assert Settings().http_listen is None  # servers built in code bind no fixed port
    with pytest.raises(ValueError, match=r"^CREDITS_HTTP_LISTEN must be host:port"):
        Settings.from_env({"CREDITS_HTTP_LISTEN": "8080"})


def test_cors_origins_are_comma_separated_web_origins() -> None:
    assert Settings.from_env({}).http_cors_origins == ()
    read = Settings.from_env(
        {"CREDITS_HTTP_CORS_ORIGINS": "https://app.example.com, http://localhost:3000"}
    )
    assert read.http_cors_origins == ("https://app.example.com", "http://localhost:3000")
    assert Settings.from_env({"CREDITS_HTTP_CORS_ORIGINS": "*"}).http_cors_origins == ("*",)
    for bad in ("app.example.com", "https://app.example.com/", "ftp://x", "https://a.com,"):
        with pytest.raises(ValueError, match=r"^CREDITS_HTTP_CORS_ORIGINS must be"):
            Settings.from_env({"CREDITS_HTTP_CORS_ORIGINS": bad})


def test_blank_supabase_url_does_not_fall_back_to_embedded_mode() -> None:
    keys = {"SUPABASE_ANON_KEY": "anon", "SUPABASE_SERVICE_ROLE_KEY": "service"}
    with pytest.raises(ValueError, match=r"^SUPABASE_URL is set but empty"):
        Settings.from_env({"SUPABASE_URL": "", **keys})
    assert Settings.from_env(keys).embedded  # unset is still unset


@pytest.mark.parametrize("name", ["SUPABASE_URL", "CREDITS_JWKS_URL"])
@pytest.mark.parametrize(
    "url",
    [
        "notaurl",
        "http://",
        "https://",
        "ftp://x.supabase.co",
        "x.supabase.co",
        "http://[::1",
        "https://x:99999",
    ],
)
def test_a_url_needs_http_or_https_and_a_host(name: str, url: str) -> None:
    message = f"{name} must be an http:// or https:// URL with a host (got '{url}')"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Settings.from_env({name: url})


@pytest.mark.parametrize(
    "url", ["https://abc.supabase.co", "http://127.0.0.1:54321/", "HTTPS://Abc.Supabase.co"]
)
def test_good_urls_are_kept(url: str) -> None:
    settings = Settings.from_env({"SUPABASE_URL": url, "CREDITS_JWKS_URL": url})
    assert (settings.supabase_url, settings.jwks_url) == (url, url)


@pytest.mark.parametrize("url", ["notaurl", "http://db/credits", "mysql://u:secret@db/x"])
def test_database_url_must_be_postgresql_and_is_never_echoed(url: str) -> None:
    with pytest.raises(ValueError, match=r"^DATABASE_URL must be a postgresql://") as refused:
        Settings.from_env({"DATABASE_URL": url})
    assert url not in str(refused.value)
    assert "secret" not in str(refused.value)


def test_a_bad_signup_credits_value_is_echoed() -> None:
    with pytest.raises(ValueError, match=r"^CREDITS_SIGNUP_CREDITS must be .* \(got '-5'\)$"):
        Settings.from_env({"CREDITS_SIGNUP_CREDITS": "-5"})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 12 * 3600), ("90m", 5400), ("45s", 45), ("3600", 3600)],
)
def test_the_signup_credits_ttl_is_a_duration(text: str, seconds: int) -> None:
    settings = Settings.from_env({"CREDITS_SIGNUP_CREDITS_TTL": text})
    assert settings.signup_credits_ttl_seconds == seconds


def test_signup_credits_never_expire_by_default() -> None:
    assert Settings.from_env({}).signup_credits_ttl_seconds is None


@pytest.mark.parametrize("text", ["0", "0d", "-5", "12x", "1.5h", "d", "1d12h", "40000d"])
def test_a_bad_signup_credits_ttl_is_refused_and_echoed(text: str) -> None:
    with pytest.raises(ValueError, match=r"^CREDITS_SIGNUP_CREDITS_TTL must be .*\(got '") as bad:
        Settings.from_env({"CREDITS_SIGNUP_CREDITS_TTL": text})
    assert repr(text) in str(bad.value)
