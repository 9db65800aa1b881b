"""Verified tokens remembered until they expire, so a caller's token is checked once, not on
every RPC.

An entry answers only for the exact token string that verified, and never past the token's own
`exp` nor past `max_age` (so a signing key withdrawn from the JWKS stops verifying within that
time, as it would once the JWK set cache refreshes). Failures are never cached. The cache is
bounded: when full, the entries nearest to expiry go first.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

from server.auth.principal import Principal


class VerifiedTokens:
    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_age: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._entries: dict[str, tuple[float, Principal]] = {}
        # (valid_until, token) of every entry: the eviction order.
        self._deadlines: list[tuple[float, str]] = []
        self._max_entries = max_entries
        self._max_age = max_age
        self._clock = clock

    def get(self, token: str) -> Principal | None:
        """The principal `token` verified as, while its entry is still valid."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        valid_until, principal = entry
        if self._clock() < valid_until:
            return principal
        del self._entries[token]
        return None

    def put(self, token: str, principal: Principal, expires_at: float) -> None:
        """Remember that `token` verified as `principal`; it expires at `expires_at` (epoch s)."""
        now = self._clock()
        valid_until = min(expires_at, now + self._max_age)
        if self._max_entries <= 0 or valid_until <= now:
            return
        while len(self._deadlines) >= self._max_entries:
            self._evict_first()
        self._entries[token] = (valid_until, principal)
        heapq.heappush(self._deadlines, (valid_until, token))

    def __len__(self) -> int:
        return len(self._entries)

    def _evict_first(self) -> None:
        valid_until, token = heapq.heappop(self._deadlines)
        entry = self._entries.get(token)
        # A token put twice has two deadlines; only the one matching its entry removes it.
        if entry is not None and entry[0] == valid_until:
            del self._entries[token]
