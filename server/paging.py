"""Opaque page tokens for listing a user's ledger.

A token is bound to the user and the filter it was issued for, and every query is filtered by
the authorised user, so a token edited or taken from another listing can never reach other
rows: it is refused as INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid

from server.credit.models import TransactionFilter
from server.errors import InvalidArgument


def _filter_digest(where: TransactionFilter) -> str:
    canonical = json.dumps(
        [
            sorted(where.kinds),
            where.start.isoformat() if where.start else None,
            where.end.isoformat() if where.end else None,
        ]
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode(user_id: uuid.UUID, where: TransactionFilter, before_seq: int) -> str:
    fields = {"u": str(user_id), "f": _filter_digest(where), "s": before_seq}
    raw = json.dumps(fields, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, user_id: uuid.UUID, where: TransactionFilter) -> int | None:
    """The ledger position a page starts before; None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        fields = json.loads(raw)
        owner, digest, before = uuid.UUID(fields["u"]), fields["f"], fields["s"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument.one("page_token", "is not a token this service issued") from None
    if owner != user_id or digest != _filter_digest(where):
        raise InvalidArgument.one("page_token", "belongs to another listing")
    if not isinstance(before, int) or isinstance(before, bool):
        raise InvalidArgument.one("page_token", "is not a token this service issued")
    return before
