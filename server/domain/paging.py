"""Opaque, signed page tokens for listings of a user's rows (the ledger, generations), and pages
capped by count and by size.

A token is `<payload>.<mac>` (both base64url): the payload names the user, the listing (its
filter) and the position the next page starts before; the MAC is an HMAC-SHA256 of the payload
with a key the service keeps. A token whose MAC does not verify (forged, edited, or made with
another key) is refused before its payload is decoded, and a payload is read only if it has
exactly the shape this module writes. Every query is also filtered by the authorised user, so
even a token of another user or listing can never reach other rows. All of these are
INVALID_ARGUMENT `page_token`.

The key comes from the caller (the composition root builds a `PageTokens`): the domain knows
nothing of settings or where the key is kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from server.domain import validation
from server.errors import InvalidArgument

# Positions are bigint sequence numbers (PostgreSQL identities start at 1).
MAX_POSITION = 2**63 - 1
# The tokens this module issues are about 150 characters; anything much longer is not one.
MAX_TOKEN_LENGTH = 512
MIN_KEY_BYTES = 16
# What a page's rows may take when the caller names no budget.
DEFAULT_MAX_PAGE_BYTES = 4 * 1024 * 1024
# Of a response's size limit, what is kept for the response's own fields (the next page token)
# and its framing, beyond the rows' own estimates.
RESPONSE_RESERVE_BYTES = 1024

_NOT_ISSUED = "is not a token this service issued"


def listing(*parts: object) -> str:
    """A short digest naming a listing: what is listed and with which filter."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def page_budget(max_message_bytes: int) -> int:
    """The bytes a page's rows may take in a response of at most `max_message_bytes`."""
    return max(1, max_message_bytes - RESPONSE_RESERVE_BYTES)


def entries_bytes(entries: Mapping[str, str], per_entry: int = 20) -> int:
    """An upper bound of a protobuf map<string, string>'s size: keys and values, and
    `per_entry` bytes of framing each (tags and lengths: at most 18)."""
    return sum(validation.utf8_size(key, value) + per_entry for key, value in entries.items())


class Positioned(Protocol):
    """A listed row: its position in the listing's total order."""

    @property
    def seq(self) -> int: ...


R = TypeVar("R", bound=Positioned)


class PageTokens:
    """Issues and reads the page tokens of one service, signed with its key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a page token key needs at least {MIN_KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def ephemeral(cls) -> PageTokens:
        """Tokens under a random key: they are valid only in this process, while it runs."""
        return cls(secrets.token_bytes(32))

    def __repr__(self) -> str:
        return "PageTokens(<key>)"

    def issue(self, user_id: uuid.UUID, scope: str, before_seq: int) -> str:
        """The token of the page of listing `scope` that starts before `before_seq`."""
        fields = {"u": str(user_id), "f": scope, "s": before_seq}
        return self.seal(json.dumps(fields, separators=(",", ":")).encode())

    def seal(self, payload: bytes) -> str:
        """A token carrying `payload` as it is, signed (what `issue` makes of its fields)."""
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def read(self, token: str, user_id: uuid.UUID, scope: str) -> int | None:
        """The position a page starts before; None for the first page (no token)."""
        if not token:
            return None
        fields = _fields(self._open(token))
        owner, digest, before = fields.get("u"), fields.get("f"), fields.get("s")
        if not isinstance(owner, str) or not isinstance(digest, str):
            raise InvalidArgument.one("page_token", _NOT_ISSUED)
        if isinstance(before, bool) or not isinstance(before, int):
            raise InvalidArgument.one("page_token", _NOT_ISSUED)
        if not 0 < before <= MAX_POSITION:
            raise InvalidArgument.one("page_token", _NOT_ISSUED)
        if owner != str(user_id) or digest != scope:
            raise InvalidArgument.one("page_token", "belongs to another listing")
        return before

    async def read_page(
        self,
        fetch: Callable[[int, int | None], Awaitable[Sequence[R]]],
        *,
        user_id: uuid.UUID,
        scope: str,
        page_size: int,
        page_token: str,
        size_of: Callable[[R], int] | None = None,
        max_bytes: int = DEFAULT_MAX_PAGE_BYTES,
    ) -> tuple[Sequence[R], str]:
        """One page of `user_id`'s rows of listing `scope`, and the token of the next one ("" when
        none follows). `fetch(limit, before_seq)` reads the rows, newest first.

        A page holds at most `page_size` rows and, when `size_of` estimates a row's size in a
        response, only as many as fit `max_bytes` (at least one, so that paging always moves
        on); the next page starts after the last row it holds. The cut is made here, on the
        domain's values, rather than on serialized messages at the edge: the token must name
        the last row kept, and only the domain issues tokens. `size_of` must not under-count.
        """
        limit = validation.page_size(page_size)
        before = self.read(page_token, user_id, scope)
        # One extra row tells whether another page follows.
        rows = await fetch(limit + 1, before)
        page = _fitting(rows[:limit], size_of, max_bytes)
        more = len(rows) > len(page)
        return page, self.issue(user_id, scope, page[-1].seq) if more else ""

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def _open(self, token: str) -> bytes:
        """The payload of a token whose MAC verifies; anything else is INVALID_ARGUMENT."""
        payload_text, dot, mac_text = token.partition(".")
        if len(token) > MAX_TOKEN_LENGTH or not dot or not token.isascii():
            raise InvalidArgument.one("page_token", _NOT_ISSUED)
        try:
            payload, mac = _unb64(payload_text), _unb64(mac_text)
        except (binascii.Error, ValueError):
            raise InvalidArgument.one("page_token", _NOT_ISSUED) from None
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise InvalidArgument.one("page_token", _NOT_ISSUED)
        return payload


def _fields(payload: bytes) -> dict[str, object]:
    """The JSON object a signed payload holds. Signed payloads are this module's own, so this
    guards against a leaked key or a bug only; nothing it reads may raise anything else."""
    try:
        fields = json.loads(payload)
    except (ValueError, RecursionError):
        raise InvalidArgument.one("page_token", _NOT_ISSUED) from None
    if not isinstance(fields, dict):
        raise InvalidArgument.one("page_token", _NOT_ISSUED)
    return fields


def _fitting(rows: Sequence[R], size_of: Callable[[R], int] | None, max_bytes: int) -> Sequence[R]:
    """The longest run of `rows` from the first whose sizes add up to `max_bytes` at most
    (never fewer than one row)."""
    if size_of is None:
        return rows
    total = 0
    for count, row in enumerate(rows):
        total += size_of(row)
        if total > max_bytes and count > 0:
            return rows[:count]
    return rows


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
