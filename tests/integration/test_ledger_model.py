"""The ledger against a model: hypothesis drives the real server with random operations.

`LedgerMachine` is a hypothesis rule-based state machine over ONE fresh user per example. Every
step sends one real gRPC call (grant, debit, reserve, capture, release, refund, an exact replay of
an earlier mutation, or an earlier idempotency key with other parameters), predicts its answer
from a small pure-Python model of the account (`Account`), compares the two, and only then
updates the model. After every step the invariants compare the server's balance and its whole
ledger (all pages) with the model.

The model follows the SQL functions in `supabase/migrations/` (they are the truth of the
semantics): the order of their checks decides which error wins, a failed call consumes no
idempotency key, and keys are scoped to the user across every kind of mutation.

The server runs on the session's event loop, and hypothesis' state machines are synchronous, so
the async test hands the machine to a worker thread (`asyncio.to_thread`): the event loop stays
free to serve while the machine calls the server through a synchronous channel of its own.

A second test races 400 identical-by-key debits to check that each key takes effect exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import partial
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, ledger_pb2
from server import app as application
from tests.fixtures.errors import Failure, failure
from tests.fixtures.server import SERVICE, Metadata, new_user

Stub = credit_service_pb2_grpc.CreditServiceStub
Response = TypeVar("Response")

# A key is a fresh one (None: the machine makes one up), or one of a small pool shared by every
# kind of mutation, so that keys also collide across kinds. Replays and reuse of keys happen
# through their own rules too.
KEYS = st.one_of(st.none(), st.none(), st.sampled_from([f"k{i}" for i in range(8)]))
# Long enough that no hold expires during a run: the model has no clock.
TTLS = st.integers(min_value=60, max_value=3600)
PAGE_SIZE = 7

MACHINE_SETTINGS = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,  # nothing written into the working tree
    print_blob=True,
)

Operation = Literal["grant", "debit", "reserve", "capture", "refund"]
KeyStatus = Literal["new", "replay", "reused"]
HoldState = Literal["pending", "captured", "released"]
Kind = Literal["grant", "debit", "capture", "refund"]

KINDS: dict[Kind, ledger_pb2.TransactionKind.ValueType] = {
    "grant": ledger_pb2.TRANSACTION_KIND_GRANT,
    "debit": ledger_pb2.TRANSACTION_KIND_DEBIT,
    "capture": ledger_pb2.TRANSACTION_KIND_CAPTURE,
    "refund": ledger_pb2.TRANSACTION_KIND_REFUND,
}
KIND_NAMES: dict[ledger_pb2.TransactionKind.ValueType, Kind] = {
    number: name for name, number in KINDS.items()
}


# The model


@dataclass
class Hold:
    hold_id: str
    amount: int
    state: HoldState = "pending"


@dataclass(frozen=True)
class Entry:
    """One ledger row as the model expects ListTransactions to show it."""

    transaction_id: str
    kind: Kind
    amount: int
    balance_after: int
    refunded_transaction_id: str = ""
    hold_id: str = ""


@dataclass(frozen=True)
class KeyUse:
    """What an idempotency key was first used for, and the answer it got."""

    operation: Operation
    params: tuple[Any, ...]
    response: Any


@dataclass
class Account:
    """One user's account as the contract and the SQL functions say it must behave."""

    balance: int = 0
    holds: dict[str, Hold] = field(default_factory=dict)
    ledger: list[Entry] = field(default_factory=list)
    keys: dict[str, KeyUse] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return sum(h.amount for h in self.holds.values() if h.state == "pending")

    @property
    def available(self) -> int:
        return self.balance - self.held

    def key_status(self, key: str, operation: Operation, params: tuple[Any, ...]) -> KeyStatus:
        use = self.keys.get(key)
        if use is None:
            return "new"
        return "replay" if (use.operation, use.params) == (operation, params) else "reused"

    def refundable(self) -> list[Entry]:
        return [e for e in self.ledger if e.kind in ("debit", "capture")]

    def remaining(self, entry: Entry) -> int:
        """What is left to refund of a debit or capture."""
        refunded = sum(
            e.amount for e in self.ledger if e.refunded_transaction_id == entry.transaction_id
        )
        return entry.amount - refunded

    def append(self, entry: Entry) -> None:
        self.ledger.append(entry)
        self.balance = entry.balance_after


# What the server should refuse with


@dataclass(frozen=True)
class Expected:
    code: grpc.StatusCode
    reason: str
    metadata: dict[str, str] | None = None
    fields: list[str] | None = None


KEY_REUSED = Expected(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
HOLD_NOT_PENDING = Expected(grpc.StatusCode.FAILED_PRECONDITION, "HOLD_NOT_PENDING")
REFUND_EXCEEDS_DEBIT = Expected(grpc.StatusCode.FAILED_PRECONDITION, "REFUND_EXCEEDS_DEBIT")
AMOUNT_ABOVE_HOLD = Expected(
    grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", fields=["amount"]
)


def insufficient(required: int, available: int) -> Expected:
    return Expected(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
        metadata={"required": str(required), "available": str(available)},
    )


def attempt(
    method: Callable[..., Response], request: object, metadata: Metadata
) -> Response | Failure:
    """The answer of a synchronous unary call, or the failure it raised."""
    try:
        return method(request, metadata=metadata)
    except grpc.RpcError as error:
        # A synchronous call's error is a grpc.Call too, which is all `failure` reads.
        return failure(error)  # type: ignore[arg-type]


def assert_refused(outcome: object, expected: Expected) -> None:
    assert isinstance(outcome, Failure), f"expected {expected.reason}, got {outcome}"
    event(f"refused: {expected.reason}")
    assert (outcome.code, outcome.reason, outcome.domain) == (
        expected.code,
        expected.reason,
        "credits.v1",
    ), outcome
    if expected.metadata is not None:
        assert outcome.metadata == expected.metadata, outcome
    if expected.fields is not None:
        assert outcome.field_violations == expected.fields, outcome


def succeeded(outcome: Response | Failure) -> Response:
    assert not isinstance(outcome, Failure), f"unexpected failure: {outcome}"
    return outcome


def ttl(seconds: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration


# The state machine


class LedgerMachine(RuleBasedStateMachine):
    """Random operations on one fresh user, each checked against `Account`."""

    def __init__(self, stub: Stub) -> None:
        super().__init__()
        self.stub = stub
        self.user = new_user()
        self.account = Account()
        self.fresh_keys = 0
        # The first call of a user creates their profile (with the signup credits, if any).
        first = self.stub.GetBalance(pb.GetBalanceRequest(), metadata=self.user.metadata)
        for tx in reversed(self.list_transactions()):
            self.account.append(entry_of(tx))
        assert first.balance == self.account.balance

    @initialize(amount=st.integers(0, 300))
    def fund(self, amount: int) -> None:
        """Starts most examples with some credits, so that spending rules do not all fail."""
        if amount:
            self.grant(amount, None)

    # Rules: each sends one call, compares it with the model, then updates the model.

    @rule(amount=st.integers(1, 50), key=KEYS)
    def grant(self, amount: int, key: str | None) -> None:
        key = key or self.fresh_key()
        status = self.account.key_status(key, "grant", (amount,))
        request = pb.GrantCreditsRequest(
            user_id=self.user.user_id, amount=amount, idempotency_key=key
        )
        outcome = attempt(self.stub.GrantCredits, request, SERVICE)
        if self.check_key_status(outcome, key, status):
            return
        response = succeeded(outcome)
        self.check_new_transaction(response, "grant", amount, key, self.account.balance + amount)
        self.record(key, "grant", (amount,), response)

    @rule(amount=st.integers(1, 60), key=KEYS)
    def debit(self, amount: int, key: str | None) -> None:
        key = key or self.fresh_key()
        status = self.account.key_status(key, "debit", (amount,))
        request = pb.DebitCreditsRequest(amount=amount, idempotency_key=key)
        outcome = attempt(self.stub.DebitCredits, request, self.user.metadata)
        if self.check_key_status(outcome, key, status):
            return
        if amount > self.account.available:
            assert_refused(outcome, insufficient(amount, self.account.available))
            return
        response = succeeded(outcome)
        self.check_new_transaction(response, "debit", amount, key, self.account.balance - amount)
        self.record(key, "debit", (amount,), response)

    @rule(amount=st.integers(1, 60), key=KEYS, seconds=TTLS)
    def reserve(self, amount: int, key: str | None, seconds: int) -> None:
        key = key or self.fresh_key()
        status = self.account.key_status(key, "reserve", (amount, seconds))
        request = pb.ReserveCreditsRequest(amount=amount, idempotency_key=key, ttl=ttl(seconds))
        outcome = attempt(self.stub.ReserveCredits, request, self.user.metadata)
        if status == "reused":
            assert_refused(outcome, KEY_REUSED)
            return
        if status == "replay":
            # A replayed reservation: the original answer (the hold as created, pending, and
            # the available it returned), whatever became of the hold since.
            response = succeeded(outcome)
            original = self.account.keys[key].response
            hold = self.account.holds[original.hold.hold_id]
            event(f"replayed: reserve of a {hold.state} hold")
            assert response.replayed
            assert response.hold == original.hold
            assert response.available == original.available
            return
        if amount > self.account.available:
            assert_refused(outcome, insufficient(amount, self.account.available))
            return
        response = succeeded(outcome)
        created = response.hold
        event("done: reserve")
        assert not response.replayed
        assert (created.user_id, created.amount, created.state, created.idempotency_key) == (
            self.user.user_id,
            amount,
            ledger_pb2.HOLD_STATE_PENDING,
            key,
        )
        assert created.expire_time.ToDatetime() - created.create_time.ToDatetime() == timedelta(
            seconds=seconds
        )
        assert created.hold_id not in self.account.holds
        self.account.holds[created.hold_id] = Hold(created.hold_id, amount)
        assert response.available == self.account.available
        self.record(key, "reserve", (amount, seconds), response)

    @precondition(lambda self: self.account.holds)
    @rule(data=st.data(), key=KEYS)
    def capture(self, data: st.DataObject, key: str | None) -> None:
        key = key or self.fresh_key()
        hold = self.pick_hold(data)
        amount = data.draw(st.integers(0, hold.amount + 5), label="amount")
        self.do_capture(hold, amount, key)

    @precondition(lambda self: self.account.holds)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        hold = self.pick_hold(data)
        request = pb.ReleaseCreditsRequest(hold_id=hold.hold_id)
        outcome = attempt(self.stub.ReleaseCredits, request, self.user.metadata)
        if hold.state != "pending":
            # Captured or released already: refused, saying which.
            state = {"state": hold.state}
            assert_refused(outcome, replace(HOLD_NOT_PENDING, metadata=state))
            return
        response = succeeded(outcome)
        event("done: release")
        hold.state = "released"
        assert (response.hold.hold_id, response.hold.amount, response.hold.state) == (
            hold.hold_id,
            hold.amount,
            ledger_pb2.HOLD_STATE_RELEASED,
        )
        assert response.available == self.account.available

    @precondition(lambda self: self.account.refundable())
    @rule(data=st.data(), key=KEYS)
    def refund(self, data: st.DataObject, key: str | None) -> None:
        key = key or self.fresh_key()
        entry = self.pick_refundable(data)
        amount = data.draw(st.integers(0, entry.amount + 5), label="amount")
        self.do_refund(entry, amount, key)

    @precondition(lambda self: self.account.keys)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """Resend an earlier mutation exactly: its original answer, and no effect."""
        operation = data.draw(
            st.sampled_from(sorted({u.operation for u in self.account.keys.values()})),
            label="operation",
        )
        key = data.draw(
            st.sampled_from(
                sorted(k for k, u in self.account.keys.items() if u.operation == operation)
            ),
            label="key",
        )
        use = self.account.keys[key]
        if use.operation == "grant":
            self.grant(use.params[0], key)
        elif use.operation == "debit":
            self.debit(use.params[0], key)
        elif use.operation == "reserve":
            self.reserve(use.params[0], key, use.params[1])
        elif use.operation == "capture":
            self.do_capture(self.account.holds[use.params[0]], use.params[1], key)
        else:
            entry = next(e for e in self.account.ledger if e.transaction_id == use.params[0])
            self.do_refund(entry, use.params[1], key)

    @precondition(lambda self: self.account.keys)
    @rule(
        data=st.data(),
        operation=st.sampled_from(["grant", "debit", "reserve", "capture", "refund"]),
    )
    def reuse(self, data: st.DataObject, operation: Operation) -> None:
        """An earlier key with other parameters, or for another operation, is refused."""
        key = data.draw(st.sampled_from(sorted(self.account.keys)), label="key")
        use = self.account.keys[key]
        # The same operation with another amount, or another operation with any amount.
        amount = use.params[1 if use.operation in ("capture", "refund") else 0] + 1
        if operation == "capture" and self.account.holds:
            hold = self.pick_hold(data)
            assert self.account.key_status(key, "capture", (hold.hold_id, amount)) == "reused"
            self.do_capture(hold, amount, key)
        elif operation == "refund" and self.account.refundable():
            entry = self.pick_refundable(data)
            assert (
                self.account.key_status(key, "refund", (entry.transaction_id, amount)) == "reused"
            )
            self.do_refund(entry, amount, key)
        elif operation == "reserve":
            assert self.account.key_status(key, "reserve", (amount, 60)) == "reused"
            self.reserve(amount, key, 60)
        elif operation == "debit":
            assert self.account.key_status(key, "debit", (amount,)) == "reused"
            self.debit(amount, key)
        else:
            assert self.account.key_status(key, "grant", (amount,)) == "reused"
            self.grant(amount, key)

    # The operations that take an object of the model

    def do_capture(self, hold: Hold, amount: int, key: str) -> None:
        params = (hold.hold_id, amount)
        status = self.account.key_status(key, "capture", params)
        request = pb.CaptureCreditsRequest(hold_id=hold.hold_id, amount=amount, idempotency_key=key)
        outcome = attempt(self.stub.CaptureCredits, request, self.user.metadata)
        if status == "replay":
            # The original transaction, and the hold as it is now (captured by that call).
            response = succeeded(outcome)
            original = self.account.keys[key].response
            event("replayed: capture")
            assert response.replayed
            assert (response.transaction, response.balance) == (
                original.transaction,
                original.balance,
            )
            assert response.hold == original.hold
            return
        if self.check_key_status(outcome, key, status):
            return
        if hold.state != "pending":
            assert_refused(outcome, HOLD_NOT_PENDING)
            return
        charge = amount or hold.amount
        if charge > hold.amount:
            assert_refused(outcome, AMOUNT_ABOVE_HOLD)
            return
        response = succeeded(outcome)
        event("done: partial capture" if charge < hold.amount else "done: whole capture")
        hold.state = "captured"  # before the balance moves, so `held` drops with it
        self.check_new_transaction(
            response, "capture", charge, key, self.account.balance - charge, hold_id=hold.hold_id
        )
        assert (response.hold.hold_id, response.hold.amount, response.hold.state) == (
            hold.hold_id,
            hold.amount,
            ledger_pb2.HOLD_STATE_CAPTURED,
        )
        self.record(key, "capture", params, response)

    def do_refund(self, entry: Entry, amount: int, key: str) -> None:
        params = (entry.transaction_id, amount)
        status = self.account.key_status(key, "refund", params)
        request = pb.RefundCreditsRequest(
            user_id=self.user.user_id,
            transaction_id=entry.transaction_id,
            amount=amount,
            idempotency_key=key,
        )
        outcome = attempt(self.stub.RefundCredits, request, SERVICE)
        if self.check_key_status(outcome, key, status):
            return
        remaining = self.account.remaining(entry)
        credit = amount or remaining
        if credit == 0 or credit > remaining:
            assert_refused(outcome, REFUND_EXCEEDS_DEBIT)
            return
        response = succeeded(outcome)
        self.check_new_transaction(
            response,
            "refund",
            credit,
            key,
            self.account.balance + credit,
            refunded_transaction_id=entry.transaction_id,
        )
        self.record(key, "refund", params, response)

    def pick_hold(self, data: st.DataObject) -> Hold:
        """One of the holds, by number in order of creation; pending ones more often."""
        holds = list(self.account.holds.values())
        pending = [i for i, h in enumerate(holds) if h.state == "pending"]
        numbers = st.integers(0, len(holds) - 1)
        if pending:
            numbers = st.sampled_from(pending) | numbers
        return holds[data.draw(numbers, label="hold number")]

    def pick_refundable(self, data: st.DataObject) -> Entry:
        """One of the debits and captures, by number in ledger order."""
        entries = self.account.refundable()
        return entries[data.draw(st.integers(0, len(entries) - 1), label="debit or capture number")]

    def fresh_key(self) -> str:
        self.fresh_keys += 1
        return f"fresh-{self.fresh_keys}"

    # Checks shared by the rules

    def check_key_status(self, outcome: Any, key: str, status: KeyStatus) -> bool:
        """Checks a refused reuse or a replayed ledger mutation; True if that was the case."""
        if status == "reused":
            assert_refused(outcome, KEY_REUSED)
            return True
        if status == "replay":
            response = succeeded(outcome)
            original = self.account.keys[key].response
            event(f"replayed: {self.account.keys[key].operation}")
            assert response.replayed
            assert (response.transaction, response.balance) == (
                original.transaction,
                original.balance,
            )
            return True
        return False

    def check_new_transaction(
        self,
        response: Any,
        kind: Kind,
        amount: int,
        key: str,
        balance: int,
        *,
        refunded_transaction_id: str = "",
        hold_id: str = "",
    ) -> None:
        """Checks a fresh ledger entry against the model, then appends it to the model."""
        tx = response.transaction
        event(f"done: {kind}")
        assert not response.replayed
        assert response.balance == balance
        entry = Entry(tx.transaction_id, kind, amount, balance, refunded_transaction_id, hold_id)
        assert entry_of(tx) == entry
        assert (tx.user_id, tx.idempotency_key) == (self.user.user_id, key)
        assert all(e.transaction_id != entry.transaction_id for e in self.account.ledger)
        self.account.append(entry)

    def record(
        self, key: str, operation: Operation, params: tuple[Any, ...], response: Any
    ) -> None:
        assert key not in self.account.keys
        self.account.keys[key] = KeyUse(operation, params, response)

    def list_transactions(self) -> list[ledger_pb2.Transaction]:
        """The user's whole ledger, newest first, read page by page as the service."""
        transactions: list[ledger_pb2.Transaction] = []
        token = ""
        while True:
            page = self.stub.ListTransactions(
                pb.ListTransactionsRequest(
                    user_id=self.user.user_id, page_size=PAGE_SIZE, page_token=token
                ),
                metadata=SERVICE,
            )
            transactions.extend(page.transactions)
            token = page.next_page_token
            if not token:
                return transactions

    # Invariants, checked after every step

    @invariant()
    def balance_matches_the_model(self) -> None:
        reply = self.stub.GetBalance(pb.GetBalanceRequest(), metadata=self.user.metadata)
        assert (reply.balance, reply.held, reply.available) == (
            self.account.balance,
            self.account.held,
            self.account.available,
        )
        assert reply.balance >= reply.held >= 0

    @invariant()
    def ledger_matches_the_model(self) -> None:
        transactions = self.list_transactions()
        signed = {"grant": 1, "refund": 1, "debit": -1, "capture": -1}
        total = sum(signed[KIND_NAMES[t.kind]] * t.amount for t in transactions)
        assert total == self.account.balance
        assert len(transactions) == len(self.account.ledger)
        assert [entry_of(t) for t in reversed(transactions)] == self.account.ledger


def entry_of(tx: ledger_pb2.Transaction) -> Entry:
    return Entry(
        tx.transaction_id,
        KIND_NAMES[tx.kind],
        tx.amount,
        tx.balance_after,
        tx.refunded_transaction_id,
        tx.hold_id,
    )


def run_machine(port: int) -> None:
    """Runs the state machine to completion (in a worker thread) over a synchronous channel."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = Stub(channel)
        # Any factory of machines will do, not just the class (hypothesis' hint is narrower).
        factory = partial(LedgerMachine, stub)
        run_state_machine_as_test(factory, settings=MACHINE_SETTINGS)  # type: ignore[arg-type]


async def test_the_ledger_behaves_like_its_model(server: application.Application) -> None:
    # The event loop keeps serving while the machine runs in a thread.
    await asyncio.to_thread(run_machine, server.port)


# Idempotency under a race


async def test_racing_replays_of_a_hundred_debits_take_effect_once_each(credits: Stub) -> None:
    user = new_user()
    await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    await credits.GrantCredits(
        pb.GrantCreditsRequest(user_id=user.user_id, amount=1000, idempotency_key="funds"),
        metadata=SERVICE,
    )
    keys = [f"race-{i}" for i in range(100)]
    replies = await asyncio.gather(
        *(
            credits.DebitCredits(
                pb.DebitCreditsRequest(amount=1, idempotency_key=key), metadata=user.metadata
            )
            for _ in range(4)
            for key in keys
        )
    )
    assert len(replies) == 400
    assert sum(r.replayed for r in replies) == 300
    by_key: dict[str, set[str]] = {}
    for reply in replies:
        by_key.setdefault(reply.transaction.idempotency_key, set()).add(
            reply.transaction.transaction_id
        )
    assert sorted(by_key) == sorted(keys)
    assert all(len(ids) == 1 for ids in by_key.values())

    debits: list[ledger_pb2.Transaction] = []
    token = ""
    while True:
        page = await credits.ListTransactions(
            pb.ListTransactionsRequest(
                user_id=user.user_id,
                page_size=30,
                page_token=token,
                kinds=[ledger_pb2.TRANSACTION_KIND_DEBIT],
            ),
            metadata=SERVICE,
        )
        debits.extend(page.transactions)
        token = page.next_page_token
        if not token:
            break
    assert len(debits) == 100
    assert {t.idempotency_key for t in debits} == set(keys)
    assert {t.transaction_id for t in debits} == set().union(*by_key.values())
    balance = await credits.GetBalance(pb.GetBalanceRequest(), metadata=user.metadata)
    assert (balance.balance, balance.held, balance.available) == (900, 0, 900)
