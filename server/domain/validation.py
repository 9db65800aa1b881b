"""Checks of request arguments, each failure naming its field (BadRequest)."""

from __future__ import annotations

import math
import unicodedata
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from server.errors import InvalidArgument

MAX_KEY_LENGTH = 255
MAX_DESCRIPTION_LENGTH = 1000
MAX_METADATA_ENTRIES = 50
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 500
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
DEFAULT_HOLD_TTL = timedelta(minutes=15)
MAX_HOLD_TTL = timedelta(hours=24)
MAX_SCOPE_LENGTH = 100
MAX_SCOPES = 20
MIN_PRIORITY, MAX_PRIORITY = 0, 100


def parse_uuid(field: str, value: str) -> uuid.UUID:
    """`value` in the canonical 8-4-4-4-12 form (either case), as the service writes ids; the
    braced, URN and undashed forms uuid.UUID also reads are refused."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != value.lower():
        raise InvalidArgument.one(field, "must be a UUID (8-4-4-4-12 hex digits)")
    return parsed


def positive_amount(amount: int, field: str = "amount") -> int:
    if amount <= 0:
        raise InvalidArgument.one(field, "must be a positive whole number of credits")
    return amount


def amount_or_zero(amount: int, meaning: str) -> int:
    """An amount where 0 has a meaning (`meaning`: what 0 stands for)."""
    if amount < 0:
        raise InvalidArgument.one("amount", f"must be 0 ({meaning}) or positive")
    return amount


def hold_ttl_seconds(ttl: timedelta | None) -> int:
    """Whole seconds a hold stays pending: the default when unset, fractions rounded up."""
    ttl = DEFAULT_HOLD_TTL if ttl is None else ttl
    if not timedelta(0) < ttl <= MAX_HOLD_TTL:
        raise InvalidArgument.one("ttl", "must be more than 0 and at most 24 hours")
    return math.ceil(ttl.total_seconds())


def time_range(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and start >= end:
        raise InvalidArgument.one("end_time", "must be after start_time")


def idempotency_key(key: str, field: str = "idempotency_key") -> str:
    """A key of 1 to 255 printable characters (`field` names it in the error)."""
    if not key:
        raise InvalidArgument.one(field, "is required")
    if len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidArgument.one(field, f"must be 1 to {MAX_KEY_LENGTH} printable characters")
    return key


def utf8_size(*texts: str) -> int:
    """The bytes `texts` take in UTF-8 (as protobuf strings and PostgreSQL text hold them)."""
    return sum(len(text.encode()) for text in texts)


def storable(field: str, *texts: str) -> None:
    """PostgreSQL's text and jsonb cannot hold the NUL character (a protobuf string can): it is
    refused as the field's error rather than failing in the database."""
    if any("\x00" in text for text in texts):
        raise InvalidArgument.one(field, "must not contain the NUL character")


def description(text: str) -> str:
    if len(text) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument.one(
            "description", f"must be at most {MAX_DESCRIPTION_LENGTH} characters"
        )
    storable("description", text)
    return text


def metadata(entries: Mapping[str, str]) -> dict[str, str]:
    if len(entries) > MAX_METADATA_ENTRIES:
        raise InvalidArgument.one("metadata", f"at most {MAX_METADATA_ENTRIES} entries")
    for key, value in entries.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY_LENGTH or len(value) > MAX_METADATA_VALUE_LENGTH:
            raise InvalidArgument.one(
                "metadata",
                f"keys must be 1 to {MAX_METADATA_KEY_LENGTH} characters and values at most "
                f"{MAX_METADATA_VALUE_LENGTH}",
            )
        storable("metadata", key, value)
    return dict(entries)


def page_size(size: int) -> int:
    """The page size to use: 0 means the default, larger than the maximum is capped."""
    if size < 0:
        raise InvalidArgument.one("page_size", "must not be negative")
    return min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def spending_scope(text: str) -> str:
    """What a spending is for (a model's name, say): at most 100 characters, none a control
    character; "" is unscoped."""
    if len(text) > MAX_SCOPE_LENGTH or any(map(_is_control, text)):
        raise InvalidArgument.one(
            "scope", f"must be at most {MAX_SCOPE_LENGTH} characters, none a control character"
        )
    return text


def grant_scopes(values: Sequence[str]) -> tuple[str, ...]:
    """A grant's scopes, sorted and without repeats: at most 20, each 1 to 100 characters."""
    if len(values) > MAX_SCOPES:
        raise InvalidArgument.one("scopes", f"at most {MAX_SCOPES} scopes")
    for value in values:
        if not 1 <= len(value) <= MAX_SCOPE_LENGTH or any(map(_is_control, value)):
            raise InvalidArgument.one(
                "scopes",
                f"each scope must be 1 to {MAX_SCOPE_LENGTH} characters, none a control character",
            )
    # Code point order is the byte order of UTF-8: the database's order of stored scopes.
    return tuple(sorted(set(values)))


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc"


def priority(value: int) -> int:
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidArgument.one(
            "priority", f"must be {MIN_PRIORITY} to {MAX_PRIORITY} (lower is spent first)"
        )
    return value


def grant_times(effective: datetime | None, expire: datetime | None) -> None:
    """A grant's expiry, when it has one, comes after it takes effect. Whether it is still to
    come is the store's to judge, after the idempotency key: a retry is answered whatever time
    it is now."""
    if expire is not None and effective is not None and expire <= effective:
        raise InvalidArgument.one("expire_time", "must be after effective_time")
