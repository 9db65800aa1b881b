"""Layered access: the service layer, then the user's own JWT, then provisioning.

The user layer is a fallback for refused service credentials only, never for a business error
or a timeout. A missing profile is created only for the authenticated caller's own id: when a
call of theirs finds it missing, and after any call of theirs that did not see it
(`ensure_profile`), so that a user's first call creates it whatever it asks.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from server.auth.principal import Principal, UserPrincipal
from server.errors import ProfileNotFound, ServiceCredentialsRejected
from server.observability import metrics
from server.repository import functions
from server.repository.breaker import CredentialBreaker
from server.repository.functions import SqlFunction
from server.repository.transport import CredentialsRejected, Transport

# Users whose profile this process has made sure of, oldest first out past this many.
KNOWN_PROFILES = 100_000


class LayeredRepository:
    def __init__(self, transport: Transport, breaker: CredentialBreaker) -> None:
        self._transport = transport
        self._breaker = breaker
        self._known: dict[uuid.UUID, None] = {}  # insertion-ordered: a bounded set

    async def ensure_profile(self, principal: UserPrincipal) -> None:
        """Create the caller's profile unless this process has seen it: a user's first call
        creates their profile, whatever it asks (the contract). Free for a user whose calls
        have read or written their own profile before."""
        if principal.user_id not in self._known:
            await self._provision(principal)

    async def call(
        self, principal: Principal, function: SqlFunction, args: Mapping[str, object]
    ) -> Any:
        """Calls `function` for `principal`, creating the caller's own missing profile once."""
        caller = _own(principal, args.get("p_user_id"))
        try:
            result = await self._call_layers(principal, function, args)
        except ProfileNotFound:
            if caller is None:
                raise
            await self._provision(caller)
            return await self._call_layers(principal, function, args)
        if caller is not None:  # a function of a p_user_id answers only if the profile exists
            self._remember(caller.user_id)
        return result

    async def call_as_service(self, function: SqlFunction, args: Mapping[str, object]) -> Any:
        """Calls `function` with the service role only (start-up configuration, sweeping)."""
        try:
            return await self._transport.service().call(function, args)
        except CredentialsRejected as rejected:
            self._breaker.trip(str(rejected))
            raise ServiceCredentialsRejected() from None

    async def _provision(self, principal: UserPrincipal) -> None:
        await self._call_layers(
            principal,
            functions.PROVISION_PROFILE,
            {"p_user_id": principal.user_id, "p_email": principal.email},
        )
        self._remember(principal.user_id)

    def _remember(self, user_id: uuid.UUID) -> None:
        """`user_id` has a profile (a call of theirs found it, or made it)."""
        if user_id not in self._known:
            self._known[user_id] = None
            if len(self._known) > KNOWN_PROFILES:
                del self._known[next(iter(self._known))]

    async def _call_layers(
        self, principal: Principal, function: SqlFunction, args: Mapping[str, object]
    ) -> Any:
        if not self._breaker.is_open:
            try:
                return await self._transport.service().call(function, args)
            except CredentialsRejected as rejected:
                self._breaker.trip(str(rejected))
        if not isinstance(principal, UserPrincipal):
            raise ServiceCredentialsRejected()
        metrics.USER_LAYER_CALLS.inc()
        return await self._transport.as_user(principal).call(function, args)


def _own(principal: Principal, user_id: object) -> UserPrincipal | None:
    """The calling user, if `user_id` is theirs."""
    if isinstance(principal, UserPrincipal) and user_id == principal.user_id:
        return principal
    return None
