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
