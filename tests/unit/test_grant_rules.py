"""Grants in CreditLedger over the in-memory FakeCreditStore: who may grant, void and list, what
is valid before the store, and the rules of grants the fake keeps as the SQL does (burn-down
order, allocations, holds pinning, expiry by time, void, refunds into grants).

No database and no gRPC; tests/integration/test_grants.py runs the same rules end to end.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest

from server.auth.principal import ServicePrincipal, UserPrincipal
from server.credit.ledger import CreditLedger, grant_bytes
from server.credit.models import (
    Allocation,
    Grant,
    GrantCategory,
    GrantResult,
    GrantState,
    HoldState,
    TransactionKind,
)
from server.errors import (
    GrantNotActive,
    GrantNotFound,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidArgument,
    PermissionDenied,
)
from tests.fakes.stores import FakeClock, FakeCreditStore

SERVICE = ServicePrincipal()
DAY = timedelta(days=1)


def a_user() -> UserPrincipal:
    user_id = uuid.uuid4()
    return UserPrincipal(user_id, "", token="jwt", claims={})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> FakeCreditStore:
    return FakeCreditStore(clock=clock)


@pytest.fixture
def ledger(store: FakeCreditStore, clock: FakeClock) -> CreditLedger:
    return CreditLedger(store)


@pytest.fixture
def alice(store: FakeCreditStore) -> UserPrincipal:
    principal = a_user()
    store.add_profile(principal.user_id)
    return principal


async def give(
    ledger: CreditLedger,
    user: UserPrincipal,
    amount: int,
    *,
    key: str | None = None,
    **options: Any,
) -> GrantResult:
    return await ledger.grant(
        SERVICE,
        str(user.user_id),
        amount=amount,
        idempotency_key=key or uuid.uuid4().hex,
        description="",
        metadata={},
        **options,
    )


async def spend(ledger: CreditLedger, user: UserPrincipal, amount: int, scope: str = "") -> Any:
    return await ledger.debit(
        user,
        "",
        amount=amount,
        idempotency_key=uuid.uuid4().hex,
        description="",
        metadata={},
        scope=scope,
    )


def drawn(allocations: Sequence[Allocation]) -> list[tuple[uuid.UUID, int]]:
    return [(part.grant_id, part.amount) for part in allocations]


async def grants_of(ledger: CreditLedger, user: UserPrincipal) -> dict[uuid.UUID, Grant]:
    page = await ledger.list_grants(user, "", 500, "")
    return {g.grant_id: g for g in page.grants}


# Who may grant, void and list


async def test_grant_and_void_are_for_services_only(
    ledger: CreditLedger, store: FakeCreditStore, alice: UserPrincipal
) -> None:
    granted = await give(ledger, alice, 10)
    store.calls.clear()
    with pytest.raises(PermissionDenied):
        await ledger.grant(
            alice, "", amount=5, idempotency_key="g", description="", metadata={}, priority=1
        )
    with pytest.raises(PermissionDenied):
        await ledger.void_grant(
            alice, str(granted.grant.grant_id), idempotency_key="v", description=""
        )
    assert store.calls == []


async def test_a_user_lists_their_own_grants_only(
    ledger: CreditLedger, store: FakeCreditStore, alice: UserPrincipal
) -> None:
    bob = a_user()
    store.add_profile(bob.user_id)
    await give(ledger, alice, 10)
    mine = await ledger.list_grants(alice, "", 0, "")
    assert [g.user_id for g in mine.grants] == [alice.user_id]
    with pytest.raises(PermissionDenied):
        await ledger.list_grants(alice, str(bob.user_id), 0, "")
    by_service = await ledger.list_grants(SERVICE, str(alice.user_id), 0, "")
    assert by_service.grants == mine.grants


# What is valid, judged before the store


def _invalid_calls(
    ledger: CreditLedger, user: UserPrincipal, now: datetime
) -> dict[str, Callable[[], Awaitable[object]]]:
    uid = str(user.user_id)

    def grant(**options: Any) -> Callable[[], Awaitable[object]]:
        return lambda: ledger.grant(
            SERVICE, uid, amount=5, idempotency_key="g", description="", metadata={}, **options
        )

    def debit(scope: str) -> Callable[[], Awaitable[object]]:
        return lambda: ledger.debit(
            user, "", amount=1, idempotency_key="d", description="", metadata={}, scope=scope
        )

    return {
        "priority below 0": grant(priority=-1),
        "priority above 100": grant(priority=101),
        "an empty scope": grant(scopes=["model-a", ""]),
        "a scope of 101 characters": grant(scopes=["x" * 101]),
        "21 scopes": grant(scopes=[f"s{n}" for n in range(21)]),
        "a scope with NUL": grant(scopes=["a\x00b"]),
        "a scope with a newline": grant(scopes=["a\nb"]),
        "expire_time before effective_time": grant(
            effective_time=now + 2 * DAY, expire_time=now + DAY
        ),
        "expire_time at effective_time": grant(effective_time=now + DAY, expire_time=now + DAY),
        "debit scope of 101 characters": debit("x" * 101),
        "debit scope with NUL": debit("a\x00"),
        "debit scope with a tab": debit("a\tb"),
        "reserve scope of 101 characters": lambda: ledger.reserve(
            user, "", amount=1, idempotency_key="h", ttl=None, description="", scope="x" * 101
        ),
        "check scope of 101 characters": lambda: ledger.check(user, "", 1, "x" * 101),
        "void grant_id": lambda: ledger.void_grant(
            SERVICE, "not-a-uuid", idempotency_key="v", description=""
        ),
        "void key": lambda: ledger.void_grant(
            SERVICE, str(uuid.uuid4()), idempotency_key="", description=""
        ),
        "void description": lambda: ledger.void_grant(
            SERVICE, str(uuid.uuid4()), idempotency_key="v", description="x" * 1001
        ),
        "list page_size": lambda: ledger.list_grants(user, "", -1, ""),
        "list page_token": lambda: ledger.list_grants(user, "", 0, "forged.token"),
    }


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("priority below 0", "priority"),
        ("priority above 100", "priority"),
        ("an empty scope", "scopes"),
        ("a scope of 101 characters", "scopes"),
        ("21 scopes", "scopes"),
        ("a scope with NUL", "scopes"),
        ("a scope with a newline", "scopes"),
        ("expire_time before effective_time", "expire_time"),
        ("expire_time at effective_time", "expire_time"),
        ("debit scope of 101 characters", "scope"),
        ("debit scope with NUL", "scope"),
        ("debit scope with a tab", "scope"),
        ("reserve scope of 101 characters", "scope"),
        ("check scope of 101 characters", "scope"),
        ("void grant_id", "grant_id"),
        ("void key", "idempotency_key"),
        ("void description", "description"),
        ("list page_size", "page_size"),
        ("list page_token", "page_token"),
    ],
)
async def test_an_invalid_grant_argument_names_its_field_before_the_store(
    ledger: CreditLedger,
    store: FakeCreditStore,
    clock: FakeClock,
    alice: UserPrincipal,
    case: str,
    field: str,
) -> None:
    store.calls.clear()
    with pytest.raises(InvalidArgument) as refused:
        await _invalid_calls(ledger, alice, clock.now())[case]()
    assert [v.field for v in refused.value.violations] == [field]
    assert store.calls == []


@pytest.mark.parametrize("ago", [timedelta(0), timedelta(seconds=1)])
async def test_an_expire_time_not_in_the_future_is_refused_by_the_store_and_changes_nothing(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal, ago: timedelta
) -> None:
    await give(ledger, alice, 1)
    with pytest.raises(InvalidArgument) as refused:
        await give(ledger, alice, 5, expire_time=clock.now() - ago)
    assert [v.field for v in refused.value.violations] == ["expire_time"]
    assert len((await ledger.list_grants(alice, "", 0, "")).grants) == 1


async def test_a_retried_grant_replays_after_its_expire_time_has_passed(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    ends = clock.now() + DAY
    first = await give(ledger, alice, 5, key="g", expire_time=ends)
    clock.advance(2 * DAY.total_seconds())
    again = await give(ledger, alice, 5, key="g", expire_time=ends)
    assert again.replayed
    assert first.grant is not None
    assert again.grant is not None
    assert again.grant.grant_id == first.grant.grant_id


async def test_the_edges_of_the_limits_are_accepted(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    scopes = [f"{n:02d}" + "x" * 98 for n in range(20)]
    low = await give(ledger, alice, 1, priority=0, scopes=scopes)
    high = await give(ledger, alice, 1, priority=100, expire_time=clock.now() + DAY)
    assert (low.grant.priority, len(low.grant.scopes)) == (0, 20)
    assert high.grant.priority == 100
    spent = await spend(ledger, alice, 1, scope="x" * 100)
    assert spent.transaction.amount == 1


async def test_defaults_priority_50_paid_unscoped_never_expiring_effective_now(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    result = await give(ledger, alice, 10)
    made = result.grant
    assert (made.priority, made.category, made.scopes, made.expire_time) == (
        50,
        GrantCategory.PAID,
        (),
        None,
    )
    assert made.state == GrantState.ACTIVE
    assert result.transaction is not None
    assert made.transaction_id == result.transaction.transaction_id
    assert made.effective_time == result.transaction.create_time
    assert drawn(result.transaction.allocations) == [(made.grant_id, 10)]


async def test_scopes_are_kept_sorted_and_without_repeats(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    made = (await give(ledger, alice, 10, scopes=["b", "a", "b"])).grant
    assert made.scopes == ("a", "b")


# The burn-down order, each of its rules


async def test_lower_priority_is_spent_first(ledger: CreditLedger, alice: UserPrincipal) -> None:
    later = (await give(ledger, alice, 10, priority=60)).grant
    first = (await give(ledger, alice, 10, priority=10)).grant
    spent = await spend(ledger, alice, 15)
    assert drawn(spent.transaction.allocations) == [(first.grant_id, 10), (later.grant_id, 5)]


async def test_scoped_grants_pay_before_unscoped_ones(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    anything = (await give(ledger, alice, 10)).grant
    model = (await give(ledger, alice, 10, scopes=["model-a"])).grant
    spent = await spend(ledger, alice, 12, scope="model-a")
    assert drawn(spent.transaction.allocations) == [(model.grant_id, 10), (anything.grant_id, 2)]


async def test_the_soonest_expiry_is_spent_first_and_never_expiring_last(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    never = (await give(ledger, alice, 10)).grant
    late = (await give(ledger, alice, 10, expire_time=clock.now() + 2 * DAY)).grant
    soon = (await give(ledger, alice, 10, expire_time=clock.now() + DAY)).grant
    spent = await spend(ledger, alice, 25)
    assert drawn(spent.transaction.allocations) == [
        (soon.grant_id, 10),
        (late.grant_id, 10),
        (never.grant_id, 5),
    ]


async def test_then_the_oldest_first(ledger: CreditLedger, alice: UserPrincipal) -> None:
    old = (await give(ledger, alice, 10)).grant
    new = (await give(ledger, alice, 10)).grant
    spent = await spend(ledger, alice, 12)
    assert drawn(spent.transaction.allocations) == [(old.grant_id, 10), (new.grant_id, 2)]


async def test_priority_outranks_scope_and_expiry(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    scoped_soon = (
        await give(ledger, alice, 10, priority=60, scopes=["m"], expire_time=clock.now() + DAY)
    ).grant
    plain = (await give(ledger, alice, 10, priority=40)).grant
    spent = await spend(ledger, alice, 15, scope="m")
    assert drawn(spent.transaction.allocations) == [(plain.grant_id, 10), (scoped_soon.grant_id, 5)]


# Scopes


async def test_a_scoped_grant_pays_only_for_its_scopes(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    await give(ledger, alice, 10, scopes=["model-a", "model-b"])
    for scope, named in (("", {}), ("model-c", {"scope": "model-c"})):
        with pytest.raises(InsufficientCredits) as refused:
            await spend(ledger, alice, 1, scope=scope)
        assert refused.value.scope == scope
        assert refused.value.metadata == {"required": "1", "available": "0", **named}
    assert (await ledger.check(alice, "", 10, "model-b")).sufficient
    checked = await ledger.check(alice, "", 10, "")
    assert (checked.sufficient, checked.available, checked.shortfall) == (False, 0, 10)
    # The balance counts every active grant, scoped or not.
    assert (await ledger.get_profile(alice, "")).balance == 10


async def test_unscoped_spending_is_paid_by_unscoped_grants_only(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    await give(ledger, alice, 5)
    await give(ledger, alice, 10, scopes=["model-a"])
    with pytest.raises(InsufficientCredits) as refused:
        await spend(ledger, alice, 6)
    assert (refused.value.required, refused.value.available, refused.value.scope) == (6, 5, "")
    assert (await ledger.check(alice, "", 15, "model-a")).sufficient


# Future grants


async def test_a_future_grant_counts_nowhere_until_its_effective_time(
    ledger: CreditLedger, store: FakeCreditStore, clock: FakeClock, alice: UserPrincipal
) -> None:
    result = await give(ledger, alice, 10, key="monthly", effective_time=clock.now() + DAY)
    assert result.transaction is None
    assert (result.grant.state, result.grant.transaction_id, result.balance) == (
        GrantState.PENDING,
        None,
        0,
    )
    assert (await ledger.get_profile(alice, "")).balance == 0
    with pytest.raises(InsufficientCredits):
        await spend(ledger, alice, 1)
    clock.advance(DAY.total_seconds())
    # A read judges by time: effective now, though nothing has been written yet.
    assert (await ledger.get_profile(alice, "")).balance == 10
    spent = await spend(ledger, alice, 4)
    assert drawn(spent.transaction.allocations) == [(result.grant.grant_id, 4)]
    replay = await give(
        ledger, alice, 10, key="monthly", effective_time=result.grant.effective_time
    )
    assert replay.replayed
    assert replay.transaction is not None
    assert replay.transaction.kind == TransactionKind.GRANT
    assert replay.grant.transaction_id == replay.transaction.transaction_id
    assert (replay.grant.remaining, replay.grant.state) == (6, GrantState.ACTIVE)


# Expiry


async def test_a_grant_expires_by_time_and_its_remainder_leaves_as_an_expire_entry(
    ledger: CreditLedger, store: FakeCreditStore, clock: FakeClock, alice: UserPrincipal
) -> None:
    await give(ledger, alice, 100)
    allowance = (await give(ledger, alice, 30, expire_time=clock.now() + DAY)).grant
    await spend(ledger, alice, 10)
    profile = await ledger.get_profile(alice, "")
    assert (profile.balance, profile.next_expire_time, profile.next_expire_amount) == (
        120,
        allowance.expire_time,
        20,
    )
    clock.advance(DAY.total_seconds())
    profile = await ledger.get_profile(alice, "")
    assert (profile.balance, profile.next_expire_time, profile.next_expire_amount) == (
        100,
        None,
        0,
    )
    listed = await grants_of(ledger, alice)
    assert (listed[allowance.grant_id].state, listed[allowance.grant_id].remaining) == (
        GrantState.EXPIRED,
        0,
    )
    spent = await spend(ledger, alice, 1)  # a money call settles the expiry first
    expired = (await ledger.list_transactions(alice, "", 2, "")).transactions[1]
    assert (expired.kind, expired.amount, expired.balance_after) == (
        TransactionKind.EXPIRE,
        20,
        100,
    )
    assert drawn(expired.allocations) == [(allowance.grant_id, 20)]
    assert spent.transaction.balance_after == 99


async def test_the_sweeper_writes_expiries_of_idle_users(
    ledger: CreditLedger, store: FakeCreditStore, clock: FakeClock, alice: UserPrincipal
) -> None:
    await give(ledger, alice, 30, expire_time=clock.now() + DAY)
    assert await store.expire_holds(10) == 0
    clock.advance(DAY.total_seconds())
    assert await store.expire_holds(10) == 1
    kinds = [t.kind for t in (await ledger.list_transactions(alice, "", 10, "")).transactions]
    assert kinds == [TransactionKind.EXPIRE, TransactionKind.GRANT]
    assert await store.expire_holds(10) == 0


async def test_next_expire_sums_the_grants_expiring_at_the_soonest_time(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    when = clock.now() + DAY
    await give(ledger, alice, 10, expire_time=when)
    await give(ledger, alice, 5, expire_time=when, scopes=["m"])
    await give(ledger, alice, 7, expire_time=when + DAY)
    await give(ledger, alice, 50)
    profile = await ledger.get_profile(alice, "")
    assert (profile.next_expire_time, profile.next_expire_amount) == (when, 15)


# Holds pin credits


async def test_a_hold_skips_grants_that_expire_before_it_and_capture_takes_its_pins(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    short = (await give(ledger, alice, 10, expire_time=clock.now() + timedelta(minutes=5))).grant
    lasting = (await give(ledger, alice, 10, expire_time=clock.now() + DAY)).grant
    with pytest.raises(InsufficientCredits) as refused:
        await ledger.reserve(
            alice, "", amount=11, idempotency_key="big", ttl=timedelta(minutes=15), description=""
        )
    assert (refused.value.available, refused.value.scope) == (10, "")
    held = await ledger.reserve(
        alice, "", amount=8, idempotency_key="h", ttl=timedelta(minutes=15), description=""
    )
    # The short grant, which the hold skipped, is still what a debit spends first.
    spent = await spend(ledger, alice, 10)
    assert drawn(spent.transaction.allocations) == [(short.grant_id, 10)]
    captured = await ledger.capture(alice, str(held.hold.hold_id), amount=5, idempotency_key="c")
    assert drawn(captured.transaction.allocations) == [(lasting.grant_id, 5)]
    profile = await ledger.get_profile(alice, "")
    assert (profile.balance, profile.held, profile.available) == (5, 0, 5)


async def test_expiry_never_takes_credits_a_pending_hold_pins(
    ledger: CreditLedger, store: FakeCreditStore, clock: FakeClock, alice: UserPrincipal
) -> None:
    ends = clock.now() + timedelta(minutes=20)
    grant = (await give(ledger, alice, 10, expire_time=ends)).grant
    held = await ledger.reserve(
        alice, "", amount=6, idempotency_key="h", ttl=timedelta(minutes=15), description=""
    )
    clock.advance(14 * 60)
    captured = await ledger.capture(alice, str(held.hold.hold_id), amount=0, idempotency_key="c")
    assert drawn(captured.transaction.allocations) == [(grant.grant_id, 6)]
    clock.advance(10 * 60)
    await store.expire_holds(10)
    entries = (await ledger.list_transactions(alice, "", 1, "")).transactions
    assert (entries[0].kind, entries[0].amount) == (TransactionKind.EXPIRE, 4)


# Refunds go back to their grants


async def test_a_refund_returns_credits_to_their_grants_and_expired_parts_leave_again(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    soon = (await give(ledger, alice, 10, expire_time=clock.now() + DAY)).grant
    lasting = (await give(ledger, alice, 10)).grant
    spent = await spend(ledger, alice, 15)
    assert drawn(spent.transaction.allocations) == [(soon.grant_id, 10), (lasting.grant_id, 5)]
    clock.advance(DAY.total_seconds())
    refund = await ledger.refund(
        SERVICE,
        str(alice.user_id),
        transaction_id=str(spent.transaction.transaction_id),
        amount=8,
        idempotency_key="r",
        description="",
    )
    # The grant drawn last gets its credits back first.
    assert drawn(refund.transaction.allocations) == [(lasting.grant_id, 5), (soon.grant_id, 3)]
    # The call answers with the balance after the companion EXPIRE entry.
    assert (refund.transaction.balance_after, refund.balance) == (13, 10)
    entries = (await ledger.list_transactions(alice, "", 2, "")).transactions
    assert (entries[0].kind, entries[0].amount, drawn(entries[0].allocations)) == (
        TransactionKind.EXPIRE,
        3,
        [(soon.grant_id, 3)],
    )
    assert (await ledger.get_profile(alice, "")).balance == 10
    listed = await grants_of(ledger, alice)
    assert listed[lasting.grant_id].remaining == 10
    assert listed[soon.grant_id].remaining == 0


# Void


async def test_void_removes_the_unpinned_remainder_and_pins_are_voided_when_freed(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    grant = (await give(ledger, alice, 20)).grant
    held = await ledger.reserve(alice, "", amount=5, idempotency_key="h", ttl=None, description="")
    voided = await ledger.void_grant(
        SERVICE, str(grant.grant_id), idempotency_key="v", description="fraud"
    )
    assert voided.transaction is not None
    assert (voided.transaction.kind, voided.transaction.amount, voided.balance) == (
        TransactionKind.VOID,
        15,
        5,
    )
    assert (voided.grant.state, voided.grant.remaining) == (GrantState.VOIDED, 5)
    replay = await ledger.void_grant(
        SERVICE, str(grant.grant_id), idempotency_key="v", description="fraud"
    )
    assert replay.replayed
    assert replay.transaction == voided.transaction
    released = await ledger.release(alice, str(held.hold.hold_id))
    assert (released.hold.state, released.available) == (HoldState.RELEASED, 0)
    last = (await ledger.list_transactions(alice, "", 1, "")).transactions[0]
    assert (last.kind, last.amount, drawn(last.allocations)) == (
        TransactionKind.VOID,
        5,
        [(grant.grant_id, 5)],
    )
    with pytest.raises(GrantNotActive) as again:
        await ledger.void_grant(SERVICE, str(grant.grant_id), idempotency_key="v2", description="")
    assert again.value.metadata == {"state": "voided"}


async def test_void_of_a_pending_grant_writes_nothing_and_it_never_activates(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    grant = (await give(ledger, alice, 10, effective_time=clock.now() + DAY)).grant
    voided = await ledger.void_grant(
        SERVICE, str(grant.grant_id), idempotency_key="v", description=""
    )
    assert (voided.transaction, voided.grant.state, voided.balance) == (None, GrantState.VOIDED, 0)
    clock.advance(2 * DAY.total_seconds())
    assert (await ledger.get_profile(alice, "")).balance == 0
    assert (await ledger.list_transactions(alice, "", 10, "")).transactions == []


async def test_void_refuses_unknown_depleted_and_expired_grants(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    with pytest.raises(GrantNotFound):
        await ledger.void_grant(SERVICE, str(uuid.uuid4()), idempotency_key="v", description="")
    used = (await give(ledger, alice, 5)).grant
    await spend(ledger, alice, 5)
    with pytest.raises(GrantNotActive) as depleted:
        await ledger.void_grant(SERVICE, str(used.grant_id), idempotency_key="v", description="")
    assert depleted.value.metadata == {"state": "depleted"}
    short = (await give(ledger, alice, 5, expire_time=clock.now() + DAY)).grant
    clock.advance(DAY.total_seconds())
    with pytest.raises(GrantNotActive) as expired:
        await ledger.void_grant(SERVICE, str(short.grant_id), idempotency_key="v", description="")
    assert expired.value.metadata == {"state": "expired"}


async def test_a_void_key_is_the_users_like_every_other_key(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    first = (await give(ledger, alice, 5, key="g1")).grant
    second = (await give(ledger, alice, 5, key="g2")).grant
    await ledger.void_grant(SERVICE, str(first.grant_id), idempotency_key="v", description="")
    with pytest.raises(IdempotencyKeyReused):
        await ledger.void_grant(SERVICE, str(second.grant_id), idempotency_key="v", description="")
    with pytest.raises(IdempotencyKeyReused):
        await ledger.void_grant(SERVICE, str(second.grant_id), idempotency_key="g1", description="")
    with pytest.raises(IdempotencyKeyReused):
        await ledger.debit(alice, "", amount=1, idempotency_key="v", description="", metadata={})


# Idempotency of grants


async def test_a_grant_replay_returns_the_same_grant_and_other_options_are_a_reused_key(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    ends = clock.now() + DAY
    first = await give(ledger, alice, 10, key="k", expire_time=ends, scopes=["m"])
    again = await give(ledger, alice, 10, key="k", expire_time=ends, scopes=["m"])
    assert again.replayed
    assert not first.replayed
    assert (again.grant.grant_id, again.balance) == (first.grant.grant_id, first.balance)
    with pytest.raises(IdempotencyKeyReused):
        await give(ledger, alice, 10, key="k", expire_time=ends, scopes=["n"])
    with pytest.raises(IdempotencyKeyReused):
        await give(ledger, alice, 10, key="k", expire_time=ends, scopes=["m"], priority=1)


# Listing


async def test_list_grants_pages_newest_first_and_filters_by_state(
    ledger: CreditLedger, clock: FakeClock, alice: UserPrincipal
) -> None:
    made = [(await give(ledger, alice, 1)).grant for _ in range(5)]
    pending = (await give(ledger, alice, 1, effective_time=clock.now() + DAY)).grant
    await spend(ledger, alice, 2)  # the two oldest are depleted
    seen: list[Grant] = []
    token = ""
    while True:
        page = await ledger.list_grants(alice, "", 2, token)
        seen += page.grants
        token = page.next_page_token
        if not token:
            break
    assert [g.grant_id for g in seen] == [pending.grant_id, *(g.grant_id for g in reversed(made))]
    active = await ledger.list_grants(alice, "", 0, "", frozenset({GrantState.ACTIVE}))
    assert [g.grant_id for g in active.grants] == [g.grant_id for g in reversed(made[2:])]
    some = frozenset({GrantState.PENDING, GrantState.DEPLETED})
    first = await ledger.list_grants(alice, "", 1, "", some)
    assert [g.state for g in first.grants] == [GrantState.PENDING]
    with pytest.raises(InvalidArgument) as other_filter:
        await ledger.list_grants(alice, "", 1, first.next_page_token)
    assert [v.field for v in other_filter.value.violations] == ["page_token"]
    rest = await ledger.list_grants(alice, "", 5, first.next_page_token, some)
    assert [g.state for g in rest.grants] == [GrantState.DEPLETED, GrantState.DEPLETED]


async def test_a_page_of_grants_holds_only_what_fits_the_response(
    store: FakeCreditStore, clock: FakeClock, alice: UserPrincipal
) -> None:
    wide = ["x" * 98 + f"{n:02d}" for n in range(19)]
    ledger = CreditLedger(store, max_page_bytes=3 * 4096)
    for _ in range(6):
        await give(ledger, alice, 1, scopes=wide)
    page = await ledger.list_grants(alice, "", 6, "")
    size = grant_bytes(page.grants[0])
    assert size > 19 * 100
    assert len(page.grants) == (3 * 4096) // size
    assert page.next_page_token


# Signup credits


async def test_signup_credits_are_a_promotional_grant_that_expires_after_the_ttl(
    clock: FakeClock,
) -> None:
    store = FakeCreditStore(signup_credits=25, signup_ttl=timedelta(hours=12), clock=clock)
    ledger = CreditLedger(store)
    user = a_user()
    await store.provision(user)
    [signup] = (await ledger.list_grants(user, "", 0, "")).grants
    assert (signup.category, signup.amount, signup.scopes, signup.priority) == (
        GrantCategory.PROMOTIONAL,
        25,
        (),
        50,
    )
    assert signup.expire_time == signup.effective_time + timedelta(hours=12)
    clock.advance(12 * 3600)
    assert (await ledger.get_profile(user, "")).balance == 0
