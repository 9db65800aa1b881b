"""Remembers that the service credentials were rejected, so later calls skip that layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from server.observability import metrics

log = logging.getLogger(__name__)


class CredentialBreaker:
    """Open for `cooldown` seconds after a rejection; then the service layer is tried again."""

    def __init__(self, cooldown: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._cooldown = cooldown
        self._clock = clock
        self._open_until = 0.0
        metrics.BREAKER_OPEN.set_function(lambda: float(self.is_open))

    @property
    def is_open(self) -> bool:
        return self._clock() < self._open_until

    def trip(self, reason: str) -> None:
        if not self.is_open:
            metrics.CREDENTIAL_REJECTIONS.inc()
            log.error(
                "service credentials rejected by the database (%s); using the user layer for "
                "%.0f s. Check SUPABASE_SERVICE_ROLE_KEY / the database role.",
                reason,
                self._cooldown,
            )
        self._open_until = self._clock() + self._cooldown
