"""The typed identity of a caller, set once by the auth interceptor and read below it."""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class UserPrincipal:
    """An end user, authenticated by a Supabase access token for `user_id`."""

    user_id: uuid.UUID
    email: str
    # The verified token, passed on to the database's user layer so row-level security applies.
    token: str = field(repr=False)
    claims: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ServicePrincipal:
    """A trusted backend: a service_role token or the configured secret API key."""

    name: str = "service"


Principal = UserPrincipal | ServicePrincipal

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "credits_principal", default=None
)


def current_principal() -> Principal:
    """The principal of the RPC being served; raises if the auth interceptor did not run."""
    principal = _current.get()
    if principal is None:
        raise LookupError("no principal: the auth interceptor did not authenticate this call")
    return principal


def set_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Bind `principal` to the current context (the auth interceptor's job)."""
    return _current.set(principal)
