"""CreditLedger over the in-memory FakeCreditStore: who may call, what is valid, the money rules.

No database and no gRPC: the rules of server/credit/ledger.py and server/domain, with the
store's documented behaviour kept by the fake (tests/fakes/stores.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from server.auth.principal import Principal, ServicePrincipal, UserPrincipal
from server.credit.ledger import CreditLedger
from server.credit.models import (
    HoldState,
    LedgerResult,
    Transaction,
    TransactionFilter,
    TransactionKind,
)
from server.credit.sweeper import HoldSweeper
from server.errors import (
    HoldNotFound,
    HoldNotPending,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidArgument,
    PermissionDenied,
    ProfileNotFound,
    RefundExceedsDebit,
    TransactionNotFound,
)
from tests.fakes.stores import FakeCreditStore

SERVICE = ServicePrincipal()


def a_user() -> UserPrincipal:
    user_id = uuid.uuid4()
    return UserPrincipal(user_id, f"{user_id.hex[:8]}@example.com", token="jwt", claims={})


@pytest.fixture
def store() -> FakeCreditStore:
    return FakeCreditStore()


@pytest.fixture
def ledger(store: FakeCreditStore) -> CreditLedger:
    return CreditLedger(store)


@pytest.fixture
def alice(store: FakeCreditStore) -> UserPrincipal:
    principal = a_user()
    store.add_profile(principal.user_id, balance=100)
    return principal


@pytest.fixture
def bob(store: FakeCreditStore) -> UserPrincipal:
    principal = a_user()
    store.add_profile(principal.user_id, balance=100)
    return principal


async def debit(
    ledger: CreditLedger,
    principal: Principal,
    user_id: str = "",
    *,
    amount: int = 10,
    idempotency_key: str = "k1",
    description: str = "",
    metadata: Mapping[str, str] | None = None,
) -> LedgerResult:
    return await ledger.debit(
        principal,
        user_id,
        amount=amount,
        idempotency_key=idempotency_key,
        description=description,
        metadata=metadata or {},
    )


# Who may act on whose credits


async def test_a_user_acts_on_their_own_id_and_an_empty_id_means_themselves(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    by_id = await ledger.debit(
        alice, str(alice.user_id), amount=10, idempotency_key="a", description="", metadata={}
    )
    by_empty = await ledger.debit(
        alice, "", amount=10, idempotency_key="b", description="", metadata={}
    )
    assert by_id.transaction.user_id == by_empty.transaction.user_id == alice.user_id
    assert by_empty.balance == 80


async def test_a_user_naming_another_user_is_denied_before_the_store(
    ledger: CreditLedger, store: FakeCreditStore, alice: UserPrincipal, bob: UserPrincipal
) -> None:
    store.calls.clear()
    with pytest.raises(PermissionDenied):
        await ledger.get_profile(alice, str(bob.user_id))
    with pytest.raises(PermissionDenied):
        await debit(ledger, alice, str(bob.user_id))
    assert store.calls == []
    assert (await ledger.get_profile(bob, "")).balance == 100


async def test_a_service_must_name_a_user(ledger: CreditLedger) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await ledger.get_profile(SERVICE, "")
    assert [v.field for v in refused.value.violations] == ["user_id"]


async def test_a_service_may_act_on_any_user(
    ledger: CreditLedger, alice: UserPrincipal, bob: UserPrincipal
) -> None:
    for principal in (alice, bob):
        result = await debit(ledger, SERVICE, str(principal.user_id))
        assert result.transaction.user_id == principal.user_id


async def test_grant_is_for_services_only(
    ledger: CreditLedger, store: FakeCreditStore, alice: UserPrincipal
) -> None:
    store.calls.clear()
    with pytest.raises(PermissionDenied):
        await ledger.grant(alice, "", amount=5, idempotency_key="g", description="", metadata={})
    assert store.calls == []


async def test_refund_is_for_services_only(
    ledger: CreditLedger, store: FakeCreditStore, alice: UserPrincipal
) -> None:
    spent = await debit(ledger, alice, "")
    store.calls.clear()
    with pytest.raises(PermissionDenied):
        await ledger.refund(
            alice,
            "",
            transaction_id=str(spent.transaction.transaction_id),
            amount=0,
            idempotency_key="r",
            description="",
        )
    assert store.calls == []


async def test_a_user_cannot_capture_or_release_another_users_hold(
    ledger: CreditLedger, alice: UserPrincipal, bob: UserPrincipal
) -> None:
    held = await ledger.reserve(bob, "", amount=10, idempotency_key="h", ttl=None, description="")
    hold_id = str(held.hold.hold_id)
    with pytest.raises(HoldNotFound):
        await ledger.capture(alice, hold_id, amount=0, idempotency_key="c")
    with pytest.raises(HoldNotFound):
        await ledger.release(alice, hold_id)
    released = await ledger.release(SERVICE, hold_id)  # a service may settle anyone's
    assert released.hold.state == HoldState.RELEASED


# Validation: each error names its field, and nothing reaches the store

LONG = "x" * 1001
EARLIER, LATER = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"amount": 0}, "amount"),
        ({"amount": -5}, "amount"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"idempotency_key": "new\nline"}, "idempotency_key"),
        ({"description": LONG}, "description"),
        ({"description": "nul\x00"}, "description"),
        ({"metadata": {"": "v"}}, "metadata"),
        ({"metadata": {"k": "v\x00"}}, "metadata"),
        ({"metadata": {f"k{i}": "v" for i in range(51)}}, "metadata"),
    ],
)
async def test_a_debit_argument_error_names_its_field(
    ledger: CreditLedger,
    store: FakeCreditStore,
    alice: UserPrincipal,
    fields: dict[str, Any],
    field: str,
) -> None:
    store.calls.clear()
    with pytest.raises(InvalidArgument) as refused:
        await debit(ledger, alice, "", **fields)
    assert [v.field for v in refused.value.violations] == [field]
    assert store.calls == []


def _calls(ledger: CreditLedger, who: UserPrincipal) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "user_id": lambda: ledger.get_profile(who, "{" + str(who.user_id) + "}"),
        "check amount": lambda: ledger.check(who, "", 0),
        "transaction_id": lambda: ledger.refund(
            SERVICE,
            str(who.user_id),
            transaction_id="123",
            amount=0,
            idempotency_key="r",
            description="",
        ),
        "refund amount": lambda: ledger.refund(
            SERVICE,
            str(who.user_id),
            transaction_id=str(uuid.uuid4()),
            amount=-1,
            idempotency_key="r",
            description="",
        ),
        "hold_id": lambda: ledger.capture(who, "not-a-uuid", amount=0, idempotency_key="c"),
        "capture amount": lambda: ledger.capture(
            who, str(uuid.uuid4()), amount=-1, idempotency_key="c"
        ),
        "ttl zero": lambda: ledger.reserve(
            who, "", amount=1, idempotency_key="h", ttl=timedelta(0), description=""
        ),
        "ttl too long": lambda: ledger.reserve(
            who,
            "",
            amount=1,
            idempotency_key="h",
            ttl=timedelta(hours=24, seconds=1),
            description="",
        ),
        "page_size": lambda: ledger.list_transactions(who, "", -1, ""),
        "end_time": lambda: ledger.list_transactions(
            who, "", 10, "", TransactionFilter(start=LATER, end=EARLIER)
        ),
        "page_size before end_time": lambda: ledger.list_transactions(
            who, "", -1, "", TransactionFilter(start=LATER, end=EARLIER)
        ),
        "page_token": lambda: ledger.list_transactions(who, "", 10, "not a token!"),
    }


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("user_id", "user_id"),
        ("check amount", "amount"),
        ("transaction_id", "transaction_id"),
        ("refund amount", "amount"),
        ("hold_id", "hold_id"),
        ("capture amount", "amount"),
        ("ttl zero", "ttl"),
        ("ttl too long", "ttl"),
        ("page_size", "page_size"),
        ("end_time", "end_time"),
        ("page_size before end_time", "page_size"),  # fields are judged as they come
        ("page_token", "page_token"),
    ],
)
async def test_an_argument_error_names_its_field(
    ledger: CreditLedger, store: FakeCreditStore, alice: UserPrincipal, case: str, field: str
) -> None:
    store.calls.clear()
    with pytest.raises(InvalidArgument) as refused:
        await _calls(ledger, alice)[case]()
    assert [v.field for v in refused.value.violations] == [field]
    assert store.calls == []


# Debits, grants, replays


async def test_a_debit_lowers_the_balance_and_records_an_entry(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    result = await ledger.debit(
        alice, "", amount=30, idempotency_key="d1", description="photo", metadata={"job": "7"}
    )
    assert (result.balance, result.replayed) == (70, False)
    entry = result.transaction
    assert (entry.kind, entry.amount, entry.balance_after) == (TransactionKind.DEBIT, 30, 70)
    assert (entry.description, dict(entry.metadata)) == ("photo", {"job": "7"})
    profile = await ledger.get_profile(alice, "")
    assert (profile.balance, profile.held, profile.available) == (70, 0, 70)


async def test_a_grant_raises_the_balance(ledger: CreditLedger, alice: UserPrincipal) -> None:
    result = await ledger.grant(
        SERVICE, str(alice.user_id), amount=25, idempotency_key="g1", description="", metadata={}
    )
    assert result.transaction.kind == TransactionKind.GRANT
    assert result.balance == 125


async def test_a_replay_returns_the_original_result_and_moves_nothing(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    first = await debit(ledger, alice, "", amount=30, idempotency_key="same")
    again = await debit(ledger, alice, "", amount=30, idempotency_key="same")
    assert again.replayed is True
    assert again.transaction == first.transaction
    assert again.balance == 70
    assert (await ledger.get_profile(alice, "")).balance == 70


async def test_a_key_reused_with_other_parameters_is_refused(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    await debit(ledger, alice, "", amount=30, idempotency_key="same")
    with pytest.raises(IdempotencyKeyReused):
        await debit(ledger, alice, "", amount=31, idempotency_key="same")
    with pytest.raises(IdempotencyKeyReused):  # a reservation under a ledger entry's key too
        await ledger.reserve(alice, "", amount=30, idempotency_key="same", ttl=None, description="")
    assert (await ledger.get_profile(alice, "")).balance == 70


async def test_keys_are_per_user(
    ledger: CreditLedger, alice: UserPrincipal, bob: UserPrincipal
) -> None:
    await debit(ledger, alice, "", amount=30, idempotency_key="same")
    theirs = await debit(ledger, bob, "", amount=40, idempotency_key="same")
    assert theirs.replayed is False
    assert theirs.balance == 60


async def test_an_overdraft_is_insufficient_credits_and_moves_nothing(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    with pytest.raises(InsufficientCredits) as refused:
        await debit(ledger, alice, "", amount=101)
    assert (refused.value.required, refused.value.available) == (101, 100)
    assert (await ledger.get_profile(alice, "")).balance == 100


async def test_a_debit_may_spend_only_what_holds_leave_available(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    await ledger.reserve(alice, "", amount=60, idempotency_key="h", ttl=None, description="")
    with pytest.raises(InsufficientCredits) as refused:
        await debit(ledger, alice, "", amount=50)
    assert (refused.value.required, refused.value.available) == (50, 40)


async def test_an_unknown_user_has_no_profile(ledger: CreditLedger) -> None:
    with pytest.raises(ProfileNotFound):
        await ledger.get_profile(SERVICE, str(uuid.uuid4()))


# Holds: reserve, capture, release


async def test_a_reservation_sets_credits_aside(ledger: CreditLedger, alice: UserPrincipal) -> None:
    reserved = await ledger.reserve(
        alice, "", amount=30, idempotency_key="h", ttl=timedelta(seconds=90), description="job"
    )
    assert (reserved.available, reserved.replayed) == (70, False)
    assert reserved.hold.state == HoldState.PENDING
    assert reserved.hold.expire_time - reserved.hold.create_time == timedelta(seconds=90)
    profile = await ledger.get_profile(alice, "")
    assert (profile.balance, profile.held, profile.available) == (100, 30, 70)


async def test_a_reservation_replay_returns_the_original_result(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    first = await ledger.reserve(
        alice, "", amount=30, idempotency_key="h", ttl=None, description=""
    )
    await ledger.release(alice, str(first.hold.hold_id))
    again = await ledger.reserve(
        alice, "", amount=30, idempotency_key="h", ttl=None, description=""
    )
    assert again.replayed is True
    assert (again.hold, again.available) == (first.hold, first.available)
    assert (await ledger.get_profile(alice, "")).held == 0  # no second hold


async def test_a_reservation_beyond_what_is_available_is_refused(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    with pytest.raises(InsufficientCredits) as refused:
        await ledger.reserve(alice, "", amount=101, idempotency_key="h", ttl=None, description="")
    assert (refused.value.required, refused.value.available) == (101, 100)


async def test_a_partial_capture_charges_its_amount_and_frees_the_rest(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    held = await ledger.reserve(alice, "", amount=30, idempotency_key="h", ttl=None, description="")
    captured = await ledger.capture(alice, str(held.hold.hold_id), amount=10, idempotency_key="c")
    assert captured.hold.state == HoldState.CAPTURED
    assert (captured.transaction.kind, captured.transaction.amount) == (TransactionKind.CAPTURE, 10)
    assert captured.transaction.hold_id == held.hold.hold_id
    assert captured.balance == 90
    profile = await ledger.get_profile(alice, "")
    assert (profile.balance, profile.held, profile.available) == (90, 0, 90)


async def test_a_capture_of_zero_charges_the_whole_hold(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    held = await ledger.reserve(alice, "", amount=30, idempotency_key="h", ttl=None, description="")
    captured = await ledger.capture(alice, str(held.hold.hold_id), amount=0, idempotency_key="c")
    assert (captured.transaction.amount, captured.balance) == (30, 70)


async def test_a_capture_larger_than_its_hold_is_refused(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    held = await ledger.reserve(alice, "", amount=30, idempotency_key="h", ttl=None, description="")
    with pytest.raises(InvalidArgument) as refused:
        await ledger.capture(alice, str(held.hold.hold_id), amount=31, idempotency_key="c")
    assert [v.field for v in refused.value.violations] == ["amount"]
    assert (await ledger.get_profile(alice, "")).held == 30


async def test_a_capture_replay_returns_the_original_capture(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    held = await ledger.reserve(alice, "", amount=30, idempotency_key="h", ttl=None, description="")
    hold_id = str(held.hold.hold_id)
    first = await ledger.capture(alice, hold_id, amount=10, idempotency_key="c")
    again = await ledger.capture(alice, hold_id, amount=10, idempotency_key="c")
    assert again.replayed is True
    assert (again.transaction, again.balance) == (first.transaction, 90)
    with pytest.raises(HoldNotPending) as second:  # another key: the hold is settled
        await ledger.capture(alice, hold_id, amount=10, idempotency_key="c2")
    assert second.value.metadata == {"state": "captured"}


async def test_a_release_frees_the_hold_once(ledger: CreditLedger, alice: UserPrincipal) -> None:
    held = await ledger.reserve(alice, "", amount=30, idempotency_key="h", ttl=None, description="")
    released = await ledger.release(alice, str(held.hold.hold_id))
    assert (released.hold.state, released.available) == (HoldState.RELEASED, 100)
    with pytest.raises(HoldNotPending) as again:
        await ledger.release(alice, str(held.hold.hold_id))
    assert again.value.metadata == {"state": "released"}
    with pytest.raises(HoldNotPending):
        await ledger.capture(alice, str(held.hold.hold_id), amount=0, idempotency_key="c")
    assert (await ledger.get_profile(alice, "")).balance == 100


async def test_a_hold_past_its_expiry_counts_nowhere_and_cannot_be_captured(
    ledger: CreditLedger, store: FakeCreditStore, alice: UserPrincipal
) -> None:
    held = await ledger.reserve(
        alice, "", amount=30, idempotency_key="h", ttl=timedelta(seconds=60), description=""
    )
    store.clock.advance(61)
    assert (await ledger.get_profile(alice, "")).available == 100
    with pytest.raises(HoldNotPending) as refused:
        await ledger.capture(alice, str(held.hold.hold_id), amount=0, idempotency_key="c")
    assert refused.value.metadata == {"state": "expired"}


async def test_the_sweeper_marks_overdue_holds_expired_in_batches(
    ledger: CreditLedger, store: FakeCreditStore
) -> None:
    users = [a_user() for _ in range(3)]
    for user in users:
        store.add_profile(user.user_id, balance=10)
        await ledger.reserve(
            user, "", amount=10, idempotency_key="h", ttl=timedelta(seconds=60), description=""
        )
    sweeper = HoldSweeper(store, batch=2)
    assert await sweeper.sweep() == 0  # nothing overdue yet
    store.clock.advance(61)
    store.calls.clear()
    assert await sweeper.sweep() == 3
    # A full batch, then the rest; then how far behind settlement is left.
    assert store.calls == ["expire_holds", "expire_holds", "settlement_lag"]
    assert await sweeper.sweep() == 0


async def test_an_unknown_hold_is_not_found(ledger: CreditLedger, alice: UserPrincipal) -> None:
    with pytest.raises(HoldNotFound):
        await ledger.release(alice, str(uuid.uuid4()))


# Refunds


async def test_refunds_are_bounded_by_what_is_left_of_the_debit(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    spent = await debit(ledger, alice, "", amount=30)
    debit_id = str(spent.transaction.transaction_id)
    user_id = str(alice.user_id)

    async def refund(amount: int, key: str) -> LedgerResult:
        return await ledger.refund(
            SERVICE,
            user_id,
            transaction_id=debit_id,
            amount=amount,
            idempotency_key=key,
            description="",
        )

    part = await refund(10, "r1")
    assert part.balance == 80
    assert part.transaction.kind == TransactionKind.REFUND
    with pytest.raises(RefundExceedsDebit):
        await refund(21, "r2")
    rest = await refund(0, "r3")  # 0: what is left
    assert (rest.transaction.amount, rest.balance) == (20, 100)
    with pytest.raises(RefundExceedsDebit):
        await refund(0, "r4")


async def test_a_refund_names_its_transactions_user_or_leaves_it_to_the_transaction(
    ledger: CreditLedger, alice: UserPrincipal, bob: UserPrincipal
) -> None:
    spent = await debit(ledger, alice, "", amount=30)
    debit_id = str(spent.transaction.transaction_id)
    with pytest.raises(TransactionNotFound):  # another user's is like an unknown one
        await ledger.refund(
            SERVICE,
            str(bob.user_id),
            transaction_id=debit_id,
            amount=5,
            idempotency_key="r",
            description="",
        )
    refunded = await ledger.refund(  # no user named: the transaction's owner
        SERVICE, "", transaction_id=debit_id, amount=5, idempotency_key="r", description=""
    )
    assert (refunded.transaction.user_id, refunded.balance) == (alice.user_id, 75)
    assert (await ledger.get_profile(bob, "")).balance == 100


async def test_only_a_debit_or_a_capture_can_be_refunded(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    granted = await ledger.grant(
        SERVICE, str(alice.user_id), amount=5, idempotency_key="g", description="", metadata={}
    )
    with pytest.raises(InvalidArgument) as refused:
        await ledger.refund(
            SERVICE,
            str(alice.user_id),
            transaction_id=str(granted.transaction.transaction_id),
            amount=0,
            idempotency_key="r",
            description="",
        )
    assert [v.field for v in refused.value.violations] == ["transaction_id"]


# Check


async def test_check_reports_the_shortfall(ledger: CreditLedger, alice: UserPrincipal) -> None:
    await ledger.reserve(alice, "", amount=30, idempotency_key="h", ttl=None, description="")
    enough = await ledger.check(alice, "", 70)
    assert (enough.sufficient, enough.available, enough.shortfall) == (True, 70, 0)
    short = await ledger.check(alice, "", 95)
    assert (short.sufficient, short.available, short.shortfall) == (False, 70, 25)


# Listing the ledger


async def test_pages_chain_without_gaps_or_repeats(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    for n in range(7):
        await debit(ledger, alice, "", amount=1, idempotency_key=f"d{n}")
    everything = (await ledger.list_transactions(alice, "", 100, "")).transactions
    assert len(everything) == 8  # the opening grant and seven debits
    assert [t.seq for t in everything] == sorted((t.seq for t in everything), reverse=True)

    seen: list[Transaction] = []
    token, pages = "", 0
    while True:
        page = await ledger.list_transactions(alice, "", 3, token)
        seen.extend(page.transactions)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == list(everything)


async def test_a_page_of_exactly_the_rest_has_no_next_token(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    await debit(ledger, alice, "")
    page = await ledger.list_transactions(alice, "", 2, "")
    assert len(page.transactions) == 2
    assert page.next_page_token == ""


async def test_a_listing_filters_by_kind(ledger: CreditLedger, alice: UserPrincipal) -> None:
    await debit(ledger, alice, "")
    debits = TransactionFilter(kinds=frozenset({TransactionKind.DEBIT}))
    page = await ledger.list_transactions(alice, "", 10, "", debits)
    assert [t.kind for t in page.transactions] == [TransactionKind.DEBIT]


async def test_a_token_from_another_user_is_refused(
    ledger: CreditLedger, alice: UserPrincipal, bob: UserPrincipal
) -> None:
    await debit(ledger, alice, "")
    token = (await ledger.list_transactions(alice, "", 1, "")).next_page_token
    assert token
    with pytest.raises(InvalidArgument) as refused:
        await ledger.list_transactions(bob, "", 1, token)
    assert [v.field for v in refused.value.violations] == ["page_token"]


async def test_a_token_from_another_filter_is_refused(
    ledger: CreditLedger, alice: UserPrincipal
) -> None:
    await debit(ledger, alice, "")
    token = (await ledger.list_transactions(alice, "", 1, "")).next_page_token
    debits = TransactionFilter(kinds=frozenset({TransactionKind.DEBIT}))
    with pytest.raises(InvalidArgument) as refused:
        await ledger.list_transactions(alice, "", 1, token, debits)
    assert [v.field for v in refused.value.violations] == ["page_token"]
