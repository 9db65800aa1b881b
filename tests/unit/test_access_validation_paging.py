"""The helpers both domains share (server/domain): access rules, argument checks, page tokens."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta

import pytest

from server.auth.principal import ServicePrincipal, UserPrincipal
from server.domain import access, paging, validation
from server.errors import InvalidArgument, PermissionDenied

USER_ID = uuid.UUID("0b6c1a52-5d1f-4c43-9a4e-2f0d6f3f7a11")
USER = UserPrincipal(USER_ID, "u@example.com", token="jwt", claims={})
SERVICE = ServicePrincipal()


def refused_field(error: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in error.value.violations]


# access


def test_a_user_targets_themselves_by_empty_or_own_id() -> None:
    assert access.target_user(USER, "") == USER_ID
    assert access.target_user(USER, str(USER_ID)) == USER_ID


def test_a_user_naming_another_id_is_denied() -> None:
    with pytest.raises(PermissionDenied):
        access.target_user(USER, str(uuid.uuid4()))


def test_a_service_names_any_user_and_must_name_one() -> None:
    other = uuid.uuid4()
    assert access.target_user(SERVICE, str(other)) == other
    with pytest.raises(InvalidArgument) as refused:
        access.target_user(SERVICE, "")
    assert refused_field(refused) == ["user_id"]


def test_only_a_service_passes_require_service() -> None:
    access.require_service(SERVICE)
    with pytest.raises(PermissionDenied):
        access.require_service(USER)


def test_the_owner_is_the_users_own_id_and_none_for_a_service() -> None:
    assert access.owner(USER) == USER_ID
    assert access.owner(SERVICE) is None


# validation: ids


@pytest.mark.parametrize("text", [str(USER_ID), str(USER_ID).upper()])
def test_a_canonical_uuid_is_read_in_either_case(text: str) -> None:
    assert validation.parse_uuid("hold_id", text) == USER_ID


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not-a-uuid",
        USER_ID.hex,  # undashed
        "{" + str(USER_ID) + "}",  # braced
        USER_ID.urn,
        str(USER_ID) + " ",
    ],
)
def test_only_the_canonical_uuid_form_is_accepted(text: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validation.parse_uuid("hold_id", text)
    assert refused_field(refused) == ["hold_id"]


# validation: idempotency keys


@pytest.mark.parametrize("key", ["k", "k" * 255, "order 42: café ✓"])
def test_a_key_of_1_to_255_printable_characters_is_accepted(key: str) -> None:
    assert validation.idempotency_key(key) == key


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there", "nul\x00", "line\n"])
def test_other_keys_are_refused_naming_the_field(key: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validation.idempotency_key(key)
    assert refused_field(refused) == ["idempotency_key"]
    with pytest.raises(InvalidArgument) as named:
        validation.idempotency_key(key, "request_id")
    assert refused_field(named) == ["request_id"]


# validation: amounts


def test_amounts() -> None:
    assert validation.positive_amount(1) == 1
    assert validation.amount_or_zero(0, "all of it") == 0
    with pytest.raises(InvalidArgument) as zero:
        validation.positive_amount(0)
    assert refused_field(zero) == ["amount"]
    with pytest.raises(InvalidArgument) as negative:
        validation.amount_or_zero(-1, "all of it")
    assert refused_field(negative) == ["amount"]
    assert "all of it" in negative.value.violations[0].description


# validation: hold ttl


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [
        (None, 15 * 60),  # the default
        (timedelta(seconds=1), 1),
        (timedelta(microseconds=1), 1),  # fractions round up, never to 0
        (timedelta(seconds=1.2), 2),
        (timedelta(hours=24), 86400),
    ],
)
def test_a_hold_ttl_is_whole_seconds_rounded_up(ttl: timedelta | None, seconds: int) -> None:
    assert validation.hold_ttl_seconds(ttl) == seconds


@pytest.mark.parametrize(
    "ttl", [timedelta(0), timedelta(seconds=-1), timedelta(hours=24, microseconds=1)]
)
def test_a_hold_ttl_outside_its_bounds_is_refused(ttl: timedelta) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validation.hold_ttl_seconds(ttl)
    assert refused_field(refused) == ["ttl"]


# validation: page size


@pytest.mark.parametrize(
    ("size", "used"),
    [
        (0, validation.DEFAULT_PAGE_SIZE),
        (1, 1),
        (validation.MAX_PAGE_SIZE, validation.MAX_PAGE_SIZE),
        (validation.MAX_PAGE_SIZE + 1, validation.MAX_PAGE_SIZE),
    ],
)
def test_page_size_defaults_and_caps(size: int, used: int) -> None:
    assert validation.page_size(size) == used


def test_a_negative_page_size_is_refused() -> None:
    with pytest.raises(InvalidArgument) as refused:
        validation.page_size(-1)
    assert refused_field(refused) == ["page_size"]


# validation: what PostgreSQL cannot store


def test_nul_is_refused_in_every_text_it_could_reach() -> None:
    validation.storable("prompt", "fine", "also fine")
    with pytest.raises(InvalidArgument) as prompt:
        validation.storable("prompt", "fine", "not\x00fine")
    assert refused_field(prompt) == ["prompt"]
    with pytest.raises(InvalidArgument) as description:
        validation.description("a\x00b")
    assert refused_field(description) == ["description"]
    for entries in ({"k\x00": "v"}, {"k": "\x00"}):
        with pytest.raises(InvalidArgument) as metadata:
            validation.metadata(entries)
        assert refused_field(metadata) == ["metadata"]


# paging: tokens

SCOPE = paging.listing("transactions", ["debit"], None, None)


def test_a_token_reads_back_for_its_user_and_listing() -> None:
    token = paging.encode(USER_ID, SCOPE, 42)
    assert paging.decode(token, USER_ID, SCOPE) == 42
    assert paging.decode("", USER_ID, SCOPE) is None  # the first page


def test_a_token_is_bound_to_its_user() -> None:
    token = paging.encode(USER_ID, SCOPE, 42)
    with pytest.raises(InvalidArgument) as refused:
        paging.decode(token, uuid.uuid4(), SCOPE)
    assert refused_field(refused) == ["page_token"]


def test_a_token_is_bound_to_its_listing() -> None:
    token = paging.encode(USER_ID, SCOPE, 42)
    other = paging.listing("transactions", ["grant"], None, None)
    assert other != SCOPE
    with pytest.raises(InvalidArgument) as refused:
        paging.decode(token, USER_ID, other)
    assert refused_field(refused) == ["page_token"]


def _token(fields: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "not a token!",
        "%%%%",
        _token("just a string"),
        _token({"u": str(USER_ID), "f": SCOPE}),  # no position
        _token({"u": "nobody", "f": SCOPE, "s": 1}),
        _token({"u": str(USER_ID), "f": SCOPE, "s": "41"}),
        _token({"u": str(USER_ID), "f": SCOPE, "s": True}),
        _token({"u": str(USER_ID), "f": SCOPE, "s": 4.5}),
        paging.encode(USER_ID, SCOPE, 42)[:-3],  # cut short
    ],
)
def test_a_tampered_token_is_refused(token: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        paging.decode(token, USER_ID, SCOPE)
    assert refused_field(refused) == ["page_token"]


# paging: read_page


@dataclass(frozen=True)
class Row:
    seq: int


class Rows:
    """Rows 1..n, read newest first as the SQL reads them; records each fetch."""

    def __init__(self, count: int) -> None:
        self.rows = [Row(seq) for seq in range(count, 0, -1)]
        self.fetches: list[tuple[int, int | None]] = []

    async def fetch(self, limit: int, before: int | None) -> list[Row]:
        self.fetches.append((limit, before))
        return [r for r in self.rows if before is None or r.seq < before][:limit]


async def test_read_page_asks_for_one_more_row_than_the_page() -> None:
    rows = Rows(10)
    page, token = await paging.read_page(
        rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=3, page_token=""
    )
    assert rows.fetches == [(4, None)]
    assert [r.seq for r in page] == [10, 9, 8]
    assert paging.decode(token, USER_ID, SCOPE) == 8  # the next page starts before the last row


async def test_read_page_continues_before_the_tokens_position() -> None:
    rows = Rows(10)
    _, token = await paging.read_page(
        rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=3, page_token=""
    )
    page, _ = await paging.read_page(
        rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=3, page_token=token
    )
    assert rows.fetches[-1] == (4, 8)
    assert [r.seq for r in page] == [7, 6, 5]


@pytest.mark.parametrize("count", [0, 2, 3])
async def test_read_page_gives_no_token_when_no_more_rows_exist(count: int) -> None:
    rows = Rows(count)
    page, token = await paging.read_page(
        rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=3, page_token=""
    )
    assert len(page) == count
    assert token == ""


async def test_read_page_uses_the_default_page_size() -> None:
    rows = Rows(0)
    await paging.read_page(rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=0, page_token="")
    assert rows.fetches == [(validation.DEFAULT_PAGE_SIZE + 1, None)]
