"""Opaque page tokens for listing a user's ledger.

A token is bound to the user it was issued for, and every query is filtered by the authorised
user, so a token edited or taken from another user can never reach another user's rows.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid

from server.errors import InvalidArgument


def encode(user_id: uuid.UUID, before_seq: int) -> str:
    raw = json.dumps({"u": str(user_id), "s": before_seq}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(token: str, user_id: uuid.UUID) -> int | None:
    """The ledger position a page starts before; None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        fields = json.loads(raw)
        owner, before = uuid.UUID(fields["u"]), fields["s"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument.one("page_token", "is not a token this service issued") from None
    if owner != user_id or not isinstance(before, int) or isinstance(before, bool):
        raise InvalidArgument.one("page_token", "does not belong to this listing")
    return before
