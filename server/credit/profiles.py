"""When a profile is made, decided here: a user's first call creates their profile, whatever it
asks, and a service's call for a user the identity provider knows creates theirs (the contract).

Every call runs through the keeper. A call that finds the profile it needs missing has it
created (the caller's own; for a service, one of a user in auth.users) and runs once more; any
other call of a user this process has not seen yet makes sure of the profile as it ends,
before its answer goes out. Users seen are remembered
(a bounded set), so steady-state calls pay no extra round trip. Services never have a profile
made for them, and nothing is made while the database is unavailable: a second wait for it
would only double the caller's.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from server.auth.principal import Principal, UserPrincipal
from server.credit.ports import ProfileStore
from server.errors import BackendUnavailable, CreditsError, ProfileNotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

# Users whose profile this process has made sure of, oldest first out past this many.
KNOWN_PROFILES = 100_000


class ProfileKeeper:
    def __init__(self, store: ProfileStore, capacity: int = KNOWN_PROFILES) -> None:
        self._store = store
        self._capacity = capacity
        self._known: dict[uuid.UUID, None] = {}  # insertion-ordered: a bounded set

    async def run(self, principal: Principal, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` for `principal`, with the profiles it needs made sure of."""
        try:
            result = await call()
        except ProfileNotFound as missing:
            await self._create(principal, missing)
            return await call()
        except Exception as error:
            await self.settle(principal, error)
            raise
        if isinstance(principal, UserPrincipal) and principal.user_id not in self._known:
            await self.settle(principal)  # checked here first: the steady state awaits nothing
        return result

    async def settle(self, principal: Principal, error: BaseException | None = None) -> None:
        """As a call of `principal` ends (with `error`, if it failed): make sure of the
        profile, unless known, or the call was cancelled or found the database unavailable.
        A failure here is logged and left to the user's next call."""
        if not isinstance(principal, UserPrincipal) or principal.user_id in self._known:
            return
        if error is not None and (
            not isinstance(error, Exception) or isinstance(error, BackendUnavailable)
        ):
            return
        try:
            await self._provision(principal)
        except CreditsError as failed:
            log.warning("the profile of %s is not made yet (%s)", principal.user_id, failed.reason)

    async def _create(self, principal: Principal, missing: ProfileNotFound) -> None:
        """Create the profile `missing` asked for, or raise it again if it cannot be made."""
        if isinstance(principal, UserPrincipal):
            await self._provision(principal)
            return
        if missing.user_id is None:
            raise missing
        try:
            await self._store.provision_known(missing.user_id)
        except ProfileNotFound:
            raise missing from None

    async def _provision(self, principal: UserPrincipal) -> None:
        await self._store.provision(principal)
        if principal.user_id not in self._known:
            self._known[principal.user_id] = None
            if len(self._known) > self._capacity:
                del self._known[next(iter(self._known))]
