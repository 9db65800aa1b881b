"""Cross-origin access for browser apps calling the Connect edge with the user's own token
(CREDITS_HTTP_CORS_ORIGINS): the origins allowed, the preflight's answer, and the headers an
allowed origin's responses carry. An origin not listed gets no CORS header at all, so the
browser keeps the response from the page; nothing is allowed when no origin is configured.
No cookies are involved (the token travels in `authorization`), so no credentials are allowed.
"""

from __future__ import annotations

from collections.abc import Iterable

# What Connect clients send (connect-es: the protocol's own headers), and the service's own.
ALLOWED_HEADERS = (
    "Content-Type, Connect-Protocol-Version, Connect-Timeout-Ms, Connect-Accept-Encoding, "
    "Connect-Content-Encoding, Accept-Encoding, Content-Encoding, Authorization, X-Request-Id, "
    "X-User-Agent"
)
# Response headers Connect clients read besides the safelisted ones.
EXPOSED_HEADERS = "X-Request-Id, Content-Encoding, Connect-Content-Encoding"
ALLOWED_METHODS = "POST"
# How long a browser may keep a preflight's answer.
MAX_AGE_SECONDS = 7200

RawHeaders = list[tuple[bytes, bytes]]


class Cors:
    """The CORS policy of `origins` (exact `scheme://host[:port]` values, or `*` for any)."""

    def __init__(self, origins: Iterable[str]) -> None:
        allowed = frozenset(origins)
        self._any = "*" in allowed
        self._allowed = frozenset(origin.encode() for origin in allowed - {"*"})

    @property
    def enabled(self) -> bool:
        return self._any or bool(self._allowed)

    def allows(self, origin: bytes) -> bool:
        return self._any or origin in self._allowed

    def preflight(self, origin: bytes) -> tuple[int, RawHeaders]:
        """The answer to a preflight from `origin`: 204 with what it may send, or 403 and no
        CORS header for an origin not allowed."""
        if not self.allows(origin):
            return 403, [(b"vary", b"Origin")]
        return 204, [
            *self._origin_headers(origin),
            (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
            (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
            (b"access-control-max-age", str(MAX_AGE_SECONDS).encode()),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ]

    def response_headers(self, origin: bytes) -> RawHeaders:
        """The headers an allowed `origin`'s response carries (none for another)."""
        if not self.allows(origin):
            return [(b"vary", b"Origin")]
        return [
            *self._origin_headers(origin),
            (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
            (b"vary", b"Origin"),
        ]

    def _origin_headers(self, origin: bytes) -> RawHeaders:
        return [(b"access-control-allow-origin", b"*" if self._any else origin)]
