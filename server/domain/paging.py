"""Opaque page tokens for listings of a user's rows (the ledger, generations).

A token is bound to the user and to the listing (its filter) it was issued for, and every query
is filtered by the authorised user, so a token edited or taken from another listing can never
reach other rows: it is refused as INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from server.domain import validation
from server.errors import InvalidArgument


def listing(*parts: object) -> str:
    """A short digest naming a listing: what is listed and with which filter."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def encode(user_id: uuid.UUID, scope: str, before_seq: int) -> str:
    fields = {"u": str(user_id), "f": scope, "s": before_seq}
    raw = json.dumps(fields, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, user_id: uuid.UUID, scope: str) -> int | None:
    """The position a page starts before; None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        fields = json.loads(raw)
        owner, digest, before = uuid.UUID(fields["u"]), fields["f"], fields["s"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument.one("page_token", "is not a token this service issued") from None
    if owner != user_id or digest != scope:
        raise InvalidArgument.one("page_token", "belongs to another listing")
    if not isinstance(before, int) or isinstance(before, bool):
        raise InvalidArgument.one("page_token", "is not a token this service issued")
    return before


class Positioned(Protocol):
    """A listed row: its position in the listing's total order."""

    @property
    def seq(self) -> int: ...


R = TypeVar("R", bound=Positioned)


async def read_page(
    fetch: Callable[[int, int | None], Awaitable[Sequence[R]]],
    *,
    user_id: uuid.UUID,
    scope: str,
    page_size: int,
    page_token: str,
) -> tuple[Sequence[R], str]:
    """One page of `user_id`'s rows of listing `scope`, and the token of the next one ("" when
    none follows). `fetch(limit, before_seq)` reads the rows, newest first."""
    limit = validation.page_size(page_size)
    before = decode(page_token, user_id, scope)
    # One extra row tells whether another page follows.
    rows = await fetch(limit + 1, before)
    page = rows[:limit]
    return page, encode(user_id, scope, page[-1].seq) if len(rows) > limit else ""
