"""Layered access: the service layer, then the user's own JWT.

The user layer is a fallback for refused service credentials only, never for a business error
or a timeout. A refusal trips the breaker, so later calls go straight to the user layer for a
while instead of paying a refused round trip each.
"""

from __future__ import annotations

import uuid
from typing import TypeVar

from server.auth.principal import Principal, UserPrincipal
from server.errors import ProfileNotFound, ServiceCredentialsRejected
from server.observability import metrics
from server.repository.breaker import CredentialBreaker
from server.repository.functions import SqlCall
from server.repository.transport import CredentialsRejected, Transport

T = TypeVar("T")


class LayeredRepository:
    def __init__(self, transport: Transport, breaker: CredentialBreaker) -> None:
        self._transport = transport
        self._breaker = breaker

    async def call(self, principal: Principal, call: SqlCall[T]) -> T:
        """`call` for `principal`: as the service, or as the user when the service is refused.
        A missing profile is reported with the user the call was about."""
        try:
            return await self._call_layers(principal, call)
        except ProfileNotFound as missing:
            user_id = getattr(call, "user_id", None)
            if missing.user_id is None and isinstance(user_id, uuid.UUID):
                raise ProfileNotFound(missing.message, user_id=user_id) from None
            raise

    async def _call_layers(self, principal: Principal, call: SqlCall[T]) -> T:
        if not self._breaker.is_open:
            try:
                return call.decode(await self._transport.service().call(call))
            except CredentialsRejected as rejected:
                self._breaker.trip(str(rejected))
        if not isinstance(principal, UserPrincipal):
            raise ServiceCredentialsRejected()
        metrics.USER_LAYER_CALLS.inc()
        return call.decode(await self._transport.as_user(principal).call(call))

    async def call_as_service(self, call: SqlCall[T]) -> T:
        """`call` with the service role only (configuration, sweeping, the workers' queue)."""
        try:
            return call.decode(await self._transport.service().call(call))
        except CredentialsRejected as rejected:
            self._breaker.trip(str(rejected))
            raise ServiceCredentialsRejected() from None
