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
TOKENS = paging.PageTokens(b"unit-test-page-token-key-0123456789")


def test_a_token_reads_back_for_its_user_and_listing() -> None:
    token = TOKENS.issue(USER_ID, SCOPE, 42)
    assert TOKENS.read(token, USER_ID, SCOPE) == 42
    assert TOKENS.read("", USER_ID, SCOPE) is None  # the first page


def test_a_token_is_bound_to_its_user() -> None:
    token = TOKENS.issue(USER_ID, SCOPE, 42)
    with pytest.raises(InvalidArgument) as refused:
        TOKENS.read(token, uuid.uuid4(), SCOPE)
    assert refused_field(refused) == ["page_token"]


def test_a_token_is_bound_to_its_listing() -> None:
    token = TOKENS.issue(USER_ID, SCOPE, 42)
    other = paging.listing("transactions", ["grant"], None, None)
    assert other != SCOPE
    with pytest.raises(InvalidArgument) as refused:
        TOKENS.read(token, USER_ID, other)
    assert refused_field(refused) == ["page_token"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unsigned(fields: object) -> str:
    """A token as this service wrote them before they were signed: base64 JSON alone."""
    return _b64(json.dumps(fields).encode())


def _signed(fields: object) -> str:
    """A token of any content, signed with the right key: only its payload is wrong."""
    return TOKENS.seal(json.dumps(fields).encode())


def _edited(token: str) -> str:
    """`token` with its position changed and its MAC kept."""
    payload, mac = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{_b64(json.dumps({**fields, 's': 41}).encode())}.{mac}"


GOOD = TOKENS.issue(USER_ID, SCOPE, 42)


@pytest.mark.parametrize(
    "token",
    [
        "not a token!",
        "%%%%",
        "a.b.c",
        "." * 3,
        "é." + GOOD.split(".")[1],
        GOOD[:-3],  # cut short
        GOOD + "x" * 600,  # longer than any token issued
        _edited(GOOD),
        paging.PageTokens(b"another-service-key-0123456789abcdef").issue(USER_ID, SCOPE, 42),
        _unsigned({"u": str(USER_ID), "f": SCOPE, "s": 42}),
        _signed("just a string"),
        _signed([1, 2]),
        _signed({"u": str(USER_ID), "f": SCOPE}),  # no position
        _signed({"u": "nobody", "f": SCOPE, "s": 1}),
        _signed({"u": str(USER_ID), "f": SCOPE, "s": "41"}),
        _signed({"u": str(USER_ID), "f": SCOPE, "s": True}),
        _signed({"u": str(USER_ID), "f": SCOPE, "s": 4.5}),
        _signed({"u": str(USER_ID), "f": SCOPE, "s": 0}),
        _signed({"u": str(USER_ID), "f": SCOPE, "s": -1}),
        _signed({"u": str(USER_ID), "f": SCOPE, "s": 2**63}),
        _signed({"u": str(USER_ID), "f": SCOPE, "s": 10**400}),
        _signed({"u": [str(USER_ID)], "f": SCOPE, "s": 1}),
        TOKENS.seal(b"[" * 100_000 + b"]" * 100_000),  # nested past the decoder's limit
        TOKENS.seal(b"\xff\xfe"),  # not UTF-8
    ],
)
def test_a_tampered_token_is_refused(token: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        TOKENS.read(token, USER_ID, SCOPE)
    assert refused_field(refused) == ["page_token"]


def test_the_largest_position_is_read() -> None:
    assert TOKENS.read(_signed({"u": str(USER_ID), "f": SCOPE, "s": 2**63 - 1}), USER_ID, SCOPE)


def test_a_key_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        paging.PageTokens(b"short")


# paging: read_page


@dataclass(frozen=True)
class Row:
    seq: int
    size: int = 100


class Rows:
    """Rows 1..n, read newest first as the SQL reads them; records each fetch."""

    def __init__(self, count: int, size: int = 100) -> None:
        self.rows = [Row(seq, size) for seq in range(count, 0, -1)]
        self.fetches: list[tuple[int, int | None]] = []

    async def fetch(self, limit: int, before: int | None) -> list[Row]:
        self.fetches.append((limit, before))
        return [r for r in self.rows if before is None or r.seq < before][:limit]


async def test_read_page_asks_for_one_more_row_than_the_page() -> None:
    rows = Rows(10)
    page, token = await TOKENS.read_page(
        rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=3, page_token=""
    )
    assert rows.fetches == [(4, None)]
    assert [r.seq for r in page] == [10, 9, 8]
    assert TOKENS.read(token, USER_ID, SCOPE) == 8  # the next page starts before the last row


async def test_read_page_continues_before_the_tokens_position() -> None:
    rows = Rows(10)
    _, token = await TOKENS.read_page(
        rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=3, page_token=""
    )
    page, _ = await TOKENS.read_page(
        rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=3, page_token=token
    )
    assert rows.fetches[-1] == (4, 8)
    assert [r.seq for r in page] == [7, 6, 5]


@pytest.mark.parametrize("count", [0, 2, 3])
async def test_read_page_gives_no_token_when_no_more_rows_exist(count: int) -> None:
    rows = Rows(count)
    page, token = await TOKENS.read_page(
        rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=3, page_token=""
    )
    assert len(page) == count
    assert token == ""


async def test_read_page_uses_the_default_page_size() -> None:
    rows = Rows(0)
    await TOKENS.read_page(rows.fetch, user_id=USER_ID, scope=SCOPE, page_size=0, page_token="")
    assert rows.fetches == [(validation.DEFAULT_PAGE_SIZE + 1, None)]


async def _all_pages(rows: Rows, page_size: int, max_bytes: int) -> list[list[int]]:
    pages: list[list[int]] = []
    token = ""
    while True:
        page, token = await TOKENS.read_page(
            rows.fetch,
            user_id=USER_ID,
            scope=SCOPE,
            page_size=page_size,
            page_token=token,
            size_of=lambda row: row.size,
            max_bytes=max_bytes,
        )
        pages.append([r.seq for r in page])
        if not token:
            return pages


async def test_a_page_holds_only_the_rows_that_fit_its_bytes() -> None:
    pages = await _all_pages(Rows(10, size=100), page_size=4, max_bytes=250)
    assert pages == [[10, 9], [8, 7], [6, 5], [4, 3], [2, 1]]


async def test_a_page_cut_by_count_is_not_cut_by_bytes_that_fit() -> None:
    pages = await _all_pages(Rows(5, size=100), page_size=2, max_bytes=1000)
    assert pages == [[5, 4], [3, 2], [1]]


async def test_a_row_larger_than_the_budget_still_makes_a_page_of_its_own() -> None:
    pages = await _all_pages(Rows(3, size=5000), page_size=10, max_bytes=1000)
    assert pages == [[3], [2], [1]]


async def test_the_last_page_cut_by_bytes_gives_a_token_for_the_rest() -> None:
    rows = Rows(3, size=100)
    page, token = await TOKENS.read_page(
        rows.fetch,
        user_id=USER_ID,
        scope=SCOPE,
        page_size=3,
        page_token="",
        size_of=lambda row: row.size,
        max_bytes=200,
    )
    assert [r.seq for r in page] == [3, 2]
    assert TOKENS.read(token, USER_ID, SCOPE) == 2
