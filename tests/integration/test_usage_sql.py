"""GetUsage's SQL against a brute-force sum over the ledger (issue 20): hypothesis writes random
ledgers (grants of both categories, some expiring; scoped and unscoped debits; reservations
captured in part or released; refunds) while the SQL clock jumps by hours or weeks across day
and month boundaries, then compares `credit_get_usage` for every granularity and grouping with
the sums of the user's ledger entries and allocations, bucket by bucket.

This module has a database of its own (its tests move the SQL clock and commit), and calls the
functions as the database owner, as the service does.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.db.migrate import migrate
from tests.fixtures.database import create_database, drop_database

KINDS = {"debit": "spent", "capture": "spent", "grant": "granted", "refund": "refunded"}
KINDS |= {"expire": "expired", "void": "voided"}
GROUPS = ("none", "kind", "scope", "category")
HOUR = timedelta(hours=1)

step = st.one_of(
    st.tuples(
        st.just("grant"),
        st.integers(1, 50),
        st.sampled_from(["paid", "promotional"]),
        st.one_of(st.none(), st.integers(1, 60)),  # expires after so many hours
    ),
    st.tuples(st.just("debit"), st.integers(1, 20), st.sampled_from(["", "m1", "m2"])),
    st.tuples(st.just("hold"), st.integers(1, 20), st.integers(0, 20), st.sampled_from(["", "m1"])),
    st.tuples(st.just("refund"), st.integers(0, 5)),
    st.tuples(st.just("wait"), st.sampled_from([1, 5, 23, 24 * 3, 24 * 17, 24 * 40])),
)


@pytest.fixture(scope="module")
async def usage_db(postgres_admin_url: str) -> AsyncIterator[str]:
    url = await create_database(postgres_admin_url)
    try:
        await migrate(url)
        yield url
    finally:
        await drop_database(postgres_admin_url, url)


class Ledger:
    """One asyncpg connection as the owner, on an event loop of its own (hypothesis is sync)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(asyncpg.connect(url))
        self.hours = 0

    def run(self, query: str, *args: object) -> Any:
        return self.loop.run_until_complete(self.conn.fetchval(query, *args))

    def call(self, query: str, *args: object) -> Any:
        """A money function's result (None when it refused: a refusal changes nothing)."""
        try:
            return json.loads(self.run(query, *args))
        except asyncpg.PostgresError as error:
            refused = error
        assert refused.sqlstate in ("CR001", "CR007"), refused
        return None

    def wait(self, hours: int) -> None:
        self.hours += hours
        self.run('update credits_private.clock set "offset" = $1', timedelta(hours=self.hours))

    def close(self) -> None:
        self.run("""update credits_private.clock set "offset" = '0'""")
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def write(ledger: Ledger, user: uuid.UUID, steps: list[tuple[Any, ...]]) -> None:
    ledger.run("select public.credit_provision_profile($1, '')", user)
    spent: list[str] = []
    for n, (what, *args) in enumerate(steps):
        key = f"k{n}"
        if what == "grant":
            amount, category, hours = args
            expires = None
            if hours is not None:
                expires = ledger.run("select credits_private.now()") + timedelta(hours=hours)
            ledger.call(
                "select public.credit_grant($1, $2, $3, '', '{}', $4, null, 50, $5)",
                user,
                amount,
                key,
                expires,
                category,
            )
        elif what == "debit":
            amount, scope = args
            done = ledger.call(
                "select public.credit_debit($1, $2, $3, '', '{}', $4)", user, amount, key, scope
            )
            if done:
                spent.append(done["transaction"]["transaction_id"])
        elif what == "hold":
            amount, capture, scope = args
            held = ledger.call(
                "select public.credit_reserve($1, $2, $3, 3600, '', $4)", user, amount, key, scope
            )
            if held and capture and capture <= amount:
                done = ledger.call(
                    "select public.credit_capture($1, null, $2, $3)",
                    uuid.UUID(held["hold"]["hold_id"]),
                    capture,
                    key + "c",
                )
                spent.append(done["transaction"]["transaction_id"])
            elif held:
                ledger.call(
                    "select public.credit_release($1, null)", uuid.UUID(held["hold"]["hold_id"])
                )
        elif what == "refund" and spent:
            ledger.call(
                "select public.credit_refund($1, $2, 0, $3, '')",
                user,
                uuid.UUID(spent[args[0] % len(spent)]),
                key,
            )
        elif what == "wait":
            ledger.wait(args[0])
    # Whatever fell due is written (expiries), as any later call would.
    ledger.run("select public.credit_expire_holds(1000000)")


def start_of(moment: datetime, granularity: str) -> datetime:
    moment = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if granularity in ("day", "month"):
        moment = moment.replace(hour=0)
    if granularity == "month":
        moment = moment.replace(day=1)
    return moment


def brute_force(rows: list[asyncpg.Record], granularity: str, group: str) -> dict[Any, Any]:
    """The buckets, summed from the ledger's entries and allocations."""
    sums: dict[tuple[datetime, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        key = {"none": "", "kind": row["kind"], "scope": row["scope"]}.get(group, row["category"])
        sums[(start_of(row["created_at"], granularity), key)][KINDS[row["kind"]]] += row["amount"]
    return {bucket: dict(values) for bucket, values in sums.items()}


def answered(buckets: list[dict[str, Any]], group: str) -> dict[Any, Any]:
    out = {}
    for b in buckets:
        assert [name for name in ("kind", "scope", "category") if b[name] is not None] == (
            [] if group == "none" else [group]
        )
        key = "" if group == "none" else b[group]
        amounts = {name: b[name] for name in set(KINDS.values()) if b[name]}
        out[(datetime.fromisoformat(b["start_time"]).astimezone(UTC), key)] = amounts
    return out


LEDGER_ROWS = """
    select t.created_at, t.kind, t.scope, coalesce(g.category, 'paid') as category,
           coalesce(a.amount, t.amount) as amount
      from public.credit_transactions t
      left join public.credit_allocations a on a.transaction_id = t.transaction_id
      left join public.credit_grants g on g.grant_id = a.grant_id
     where t.user_id = $1
"""


def test_get_usage_equals_the_ledger_summed_by_brute_force(usage_db: str) -> None:
    ledger = Ledger(usage_db)

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(steps=st.lists(step, min_size=1, max_size=14))
    def check(steps: list[tuple[Any, ...]]) -> None:
        user = uuid.uuid4()
        write(ledger, user, steps)
        rows = ledger.loop.run_until_complete(ledger.conn.fetch(LEDGER_ROWS, user))
        start = datetime(2000, 1, 1, tzinfo=UTC)
        end = datetime(2200, 1, 1, tzinfo=UTC)
        for granularity in ("hour", "day", "month"):
            for group in GROUPS:
                buckets = json.loads(
                    ledger.run(
                        "select public.credit_get_usage($1, $2, $3, $4, $5)",
                        user,
                        start,
                        end,
                        granularity,
                        group,
                    )
                )
                assert answered(buckets, group) == brute_force(rows, granularity, group), (
                    granularity,
                    group,
                )
        # A range of ragged days (not from midnight to midnight) counts the hours in it only.
        if rows:
            first = start_of(min(r["created_at"] for r in rows), "hour") + timedelta(hours=1)
            last = max(start_of(max(r["created_at"] for r in rows), "hour"), first + HOUR)
            inner = [r for r in rows if first <= r["created_at"] < last]
            for granularity in ("day", "month"):
                buckets = json.loads(
                    ledger.run(
                        "select public.credit_get_usage($1, $2, $3, $4, 'none')",
                        user,
                        first,
                        last,
                        granularity,
                    )
                )
                assert answered(buckets, "none") == brute_force(inner, granularity, "none")
        # A range covers the hours that begin in it, no others.
        if rows:
            first = start_of(min(r["created_at"] for r in rows), "hour")
            inside = json.loads(
                ledger.run(
                    "select public.credit_get_usage($1, $2, $3, 'hour', 'none')",
                    user,
                    first,
                    first + timedelta(hours=1),
                )
            )
            assert [datetime.fromisoformat(b["start_time"]) for b in inside] == [first]

    try:
        check()
    finally:
        ledger.close()
