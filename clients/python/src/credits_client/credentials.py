"""How a client proves who it is: a bearer token sent as ``authorization: Bearer <token>``.

Three kinds, all sent per call as metadata (so a refreshed token is used by the next call):

- :class:`BearerToken`: a fixed token (a user's access token, or a service-role JWT);
- :class:`TokenProvider`: a callable, or an async callable for the async client, that returns a
  fresh token for each call (wrap your Supabase session's refresh logic in it);
- :class:`ServiceKey`: the service's secret API key, for trusted back ends.

Tokens are never logged, and ``repr()`` of a credential does not show them.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TypeAlias

AUTHORIZATION = "authorization"

TokenCallable: TypeAlias = Callable[[], str] | Callable[[], Awaitable[str]]
"""A function returning a token; the async client also accepts an async one."""


class Credentials:
    """Base class of the credentials a client sends."""

    __slots__ = ()

    def token(self) -> str:
        """The token for the next call (sync clients)."""
        raise NotImplementedError

    async def token_async(self) -> str:
        """The token for the next call (async clients)."""
        return self.token()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<redacted>)"


class BearerToken(Credentials):
    """A fixed bearer token."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        self._token = _checked(token)

    def token(self) -> str:
        return self._token


class ServiceKey(BearerToken):
    """The service's secret API key (or a Supabase service-role key). A service must name the
    ``user_id`` in every call."""

    __slots__ = ()


class TokenProvider(Credentials):
    """A callable that returns the current token, called before every call (and every stream).

    The sync client needs a plain function; the async client takes either a function or an
    ``async def`` one. Cache the token yourself if getting one is expensive.
    """

    __slots__ = ("_provider",)

    def __init__(self, provider: TokenCallable) -> None:
        if not callable(provider):
            raise TypeError("TokenProvider needs a callable that returns a token")
        self._provider = provider

    def token(self) -> str:
        value = self._provider()
        if inspect.isawaitable(value):
            close = getattr(value, "close", None)
            if callable(close):
                close()  # do not leave a never-awaited coroutine behind
            raise TypeError("an async token provider needs AsyncCreditsClient")
        return _checked(value)

    async def token_async(self) -> str:
        value = self._provider()
        if inspect.isawaitable(value):
            value = await value
        return _checked(value)


CredentialsLike: TypeAlias = Credentials | str | TokenCallable
"""What the clients accept: credentials, a token string, or a token callable."""


def as_credentials(value: CredentialsLike | None) -> Credentials | None:
    """`value` as Credentials: a string is a bearer token, a callable a token provider."""
    if value is None or isinstance(value, Credentials):
        return value
    if isinstance(value, str):
        return BearerToken(value)
    if callable(value):
        return TokenProvider(value)
    raise TypeError(f"unsupported credentials: {type(value).__name__}")


def authorization(token: str) -> tuple[str, str]:
    """The metadata entry that carries `token`."""
    return (AUTHORIZATION, f"Bearer {token}")


def _checked(token: object) -> str:
    """`token` if it is a usable token; the error never shows it."""
    if not isinstance(token, str) or not token.strip():
        raise ValueError("a token must be a non-empty string")
    if any(c in token for c in "\r\n"):
        raise ValueError("a token must not contain line breaks")
    return token.strip()
