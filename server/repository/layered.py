"""Layered access: the service layer, then the user's own JWT, then provisioning.

The user layer is a fallback for refused service credentials only, never for a business error
or a timeout. A missing profile is created only for the authenticated caller's own id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.auth.principal import Principal, UserPrincipal
from server.errors import ProfileNotFound, ServiceCredentialsRejected
from server.observability import metrics
from server.repository import functions
from server.repository.breaker import CredentialBreaker
from server.repository.functions import SqlFunction
from server.repository.transport import CredentialsRejected, Transport


class LayeredRepository:
    def __init__(self, transport: Transport, breaker: CredentialBreaker) -> None:
        self._transport = transport
        self._breaker = breaker

    async def call(
        self, principal: Principal, function: SqlFunction, args: Mapping[str, object]
    ) -> Any:
        """Calls `function` for `principal`, creating the caller's own missing profile once."""
        try:
            return await self._call_layers(principal, function, args)
        except ProfileNotFound:
            if not _is_own(principal, args.get("p_user_id")):
                raise
        assert isinstance(principal, UserPrincipal)
        await self._call_layers(
            principal,
            functions.PROVISION_PROFILE,
            {"p_user_id": principal.user_id, "p_email": principal.email},
        )
        return await self._call_layers(principal, function, args)

    async def call_as_service(self, function: SqlFunction, args: Mapping[str, object]) -> Any:
        """Calls `function` with the service role only (start-up configuration, sweeping)."""
        try:
            return await self._transport.service().call(function, args)
        except CredentialsRejected as rejected:
            self._breaker.trip(str(rejected))
            raise ServiceCredentialsRejected() from None

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


def _is_own(principal: Principal, user_id: object) -> bool:
    return isinstance(principal, UserPrincipal) and user_id == principal.user_id
