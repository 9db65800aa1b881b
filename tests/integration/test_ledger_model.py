"""The ledger against a model: hypothesis drives the real server with random operations.

`LedgerMachine` is a hypothesis rule-based state machine over ONE fresh user per example. Every
step sends one real gRPC call (a grant with a priority, scopes, an effective and an expire time;
a debit or reservation with a scope; a capture, release, refund or VoidGrant; an exact replay of
an earlier mutation, or an earlier idempotency key with other parameters), or moves the SQL
clock (`credits_private.clock`, as the database owner), or runs the sweeper. It predicts each
answer from a small pure-Python model of the account (`Account`), compares the two, and only
then updates the model. After every step the invariants compare the server's balance (counted
by time), its whole ledger (all pages), its grants (all pages) and the stored books (read as the
owner) with the model, and check what must always hold: balance = the ledger's sum = the
remaining of the active grants; 0 <= remaining <= amount; held = the pending holds = their pins.

The model follows the SQL functions in `supabase/migrations/` (they are the truth of the
semantics): the order of their checks decides which error wins, a failed call consumes no
idempotency key and writes nothing (not even the settlement of what fell due: the transaction
rolls back), and keys are scoped to the user across every kind of mutation. Settlement ("time
decides"): a successful money call first settles, under the user's lock, everything that fell
due (holds past expiry, grants that took effect, grants that expired) in the order it happened;
reads count by time without writing.

Time: the model's clock counts seconds from the SQL clock at the example's start. Grants' times
are sent as whole minutes on it, so they fall exactly there; a hold expires at the instant of
its reservation plus its ttl, a whole number of minutes and a half: never at a grant's instant,
and the few seconds the example really takes never carry anything across a minute. The
server's own sweeper is stopped while the machine runs (a `sweep` rule runs the sweeper instead,
at steps hypothesis chooses), so that what is settled when is the model's to predict.

The server runs on the session's event loop, and hypothesis' state machines are synchronous, so
the async test hands the machine to a worker thread (`asyncio.to_thread`): the event loop stays
free to serve while the machine calls the server through a synchronous channel of its own.

A second test races 400 identical-by-key debits to check that each key takes effect exactly once.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal, TypeVar

import asyncpg
import grpc
import grpc.aio
from google.protobuf import duration_pb2, timestamp_pb2
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
from credits.v1 import credit_service_pb2_grpc, grant_pb2, ledger_pb2
from server import app as application
from tests.fixtures.errors import Failure, failure
from tests.fixtures.server import SERVICE, Metadata, new_user

Stub = credit_service_pb2_grpc.CreditServiceStub
Response = TypeVar("Response")

# A key is a fresh one (None: the machine makes one up), or one of a small pool shared by every
# kind of mutation, so that keys also collide across kinds. Replays and reuse of keys happen
# through their own rules too.
KEYS = st.one_of(st.none(), st.none(), st.sampled_from([f"k{i}" for i in range(8)]))
# A hold's ttl: whole minutes and a half (see the module's docstring).
TTLS = st.integers(min_value=1, max_value=59).map(lambda minutes: 60 * minutes + 30)
PRIORITIES = st.sampled_from([10, 50, 50, 90])
SPEND_SCOPES = st.sampled_from(["", "", "m1", "m2"])
GRANT_SCOPES = st.sampled_from([(), (), (), ("m1",), ("m2",), ("m1", "m2")])
# Minutes ahead of the clock, for grants' effective and expire times.
MINUTES = st.integers(min_value=1, max_value=240)
PAGE_SIZE = 25

MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,  # nothing written into the working tree
    print_blob=True,
)

Operation = Literal["grant", "debit", "reserve", "capture", "refund", "void"]
KeyStatus = Literal["new", "replay", "reused"]
HoldState = Literal["pending", "captured", "released", "expired"]
Kind = Literal["grant", "debit", "capture", "refund", "expire", "void"]
GrantState = Literal["pending", "active", "depleted", "expired", "voided"]

KINDS: dict[Kind, ledger_pb2.TransactionKind.ValueType] = {
    "grant": ledger_pb2.TRANSACTION_KIND_GRANT,
    "debit": ledger_pb2.TRANSACTION_KIND_DEBIT,
    "capture": ledger_pb2.TRANSACTION_KIND_CAPTURE,
    "refund": ledger_pb2.TRANSACTION_KIND_REFUND,
    "expire": ledger_pb2.TRANSACTION_KIND_EXPIRE,
    "void": ledger_pb2.TRANSACTION_KIND_VOID,
}
KIND_NAMES: dict[ledger_pb2.TransactionKind.ValueType, Kind] = {
    number: name for name, number in KINDS.items()
}
SIGN: dict[Kind, int] = {
    "grant": 1,
    "refund": 1,
    "debit": -1,
    "capture": -1,
    "expire": -1,
    "void": -1,
}
GRANT_STATES: dict[GrantState, grant_pb2.GrantState.ValueType] = {
    "pending": grant_pb2.GRANT_STATE_PENDING,
    "active": grant_pb2.GRANT_STATE_ACTIVE,
    "depleted": grant_pb2.GRANT_STATE_DEPLETED,
    "expired": grant_pb2.GRANT_STATE_EXPIRED,
    "voided": grant_pb2.GRANT_STATE_VOIDED,
}
HOLD_STATES: dict[HoldState, ledger_pb2.HoldState.ValueType] = {
    "pending": ledger_pb2.HOLD_STATE_PENDING,
    "captured": ledger_pb2.HOLD_STATE_CAPTURED,
    "released": ledger_pb2.HOLD_STATE_RELEASED,
    "expired": ledger_pb2.HOLD_STATE_EXPIRED,
}


# The model


@dataclass
class Grant:
    grant_id: str
    amount: int
    priority: int
    scopes: tuple[str, ...]
    effective: int  # seconds on the model's clock (the time it was made, if it gave none)
    expires: int | None  # None: never
    order: int  # when it was made, among grants and holds
    key: str
    remaining: int = 0
    pinned: int = 0
    activated: bool = False
    expired: bool = False  # its expiry is settled
    voided: bool = False
    void_key: str = ""

    @property
    def live(self) -> bool:
        return self.remaining > 0 or (not self.activated and not self.voided)

    def expired_at(self, now: int) -> bool:
        return self.expired or (self.expires is not None and self.expires <= now)

    def state(self, now: int) -> GrantState:
        """The state the server shows at `now` (after settling what is due)."""
        if self.voided:
            return "voided"
        if not self.activated and self.effective > now:
            return "pending"
        if self.expired_at(now):
            return "expired"
        return "depleted" if self.remaining == 0 else "active"

    def settled_state(self, now: int) -> GrantState:
        """The state at `now`, roughly, without settling (to pick grants worth voiding)."""
        if not self.activated and not self.voided and self.effective <= now:
            return "expired" if self.expired_at(now) else "active"
        return self.state(now)

    def shown_remaining(self, now: int) -> int:
        state = self.state(now)
        if state == "expired" or (state == "voided" and not self.activated):
            return 0
        return self.remaining


@dataclass
class Hold:
    hold_id: str
    amount: int
    expires: int  # seconds on the model's clock (the real instant is a few seconds later)
    order: int
    pins: list[tuple[str, int]]
    state: HoldState = "pending"


@dataclass(frozen=True)
class Entry:
    """One ledger row as the model expects ListTransactions to show it. The model knows the ids
    of the entries its calls returned; settlement's own entries it learns from the server."""

    kind: Kind
    amount: int
    balance_after: int
    key: str = ""
    refunded_transaction_id: str = ""
    hold_id: str = ""
    allocations: tuple[tuple[str, int], ...] = ()
    transaction_id: str = field(default="", compare=False)


@dataclass(frozen=True)
class KeyUse:
    """What an idempotency key was first used for, and the answer it got."""

    operation: Operation
    params: tuple[Any, ...]
    response: Any


@dataclass
class Account:
    """One user's account as the contract and the SQL functions say it must behave. `balance`
    is as stored (settled up to the last money call); `settled()` is the account as a read
    sees it now."""

    now: int = 0
    balance: int = 0
    grants: dict[str, Grant] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    ledger: list[Entry] = field(default_factory=list)
    keys: dict[str, KeyUse] = field(default_factory=dict)
    made: int = 0

    @property
    def held(self) -> int:
        return sum(h.amount for h in self.holds.values() if h.state == "pending")

    @property
    def available(self) -> int:
        return self.balance - self.held

    def next_order(self) -> int:
        self.made += 1
        return self.made

    def key_status(self, key: str, operation: Operation, params: tuple[Any, ...]) -> KeyStatus:
        use = self.keys.get(key)
        if use is None:
            return "new"
        return "replay" if (use.operation, use.params) == (operation, params) else "reused"

    def refundable(self) -> list[Entry]:
        return [e for e in self.ledger if e.kind in ("debit", "capture")]

    def refunds_of(self, entry: Entry) -> list[Entry]:
        return [
            e
            for e in self.ledger
            if e.kind == "refund" and e.refunded_transaction_id == entry.transaction_id
        ]

    def remaining(self, entry: Entry) -> int:
        """What is left to refund of a debit or capture."""
        return entry.amount - sum(e.amount for e in self.refunds_of(entry))

    def append(self, kind: Kind, delta: int, **fields: Any) -> Entry:
        self.balance += delta
        entry = Entry(kind, abs(delta), self.balance, **fields)
        self.ledger.append(entry)
        return entry

    # Time

    def settled(self) -> Account:
        """The account as everything due at `now` settled would leave it."""
        account = copy.deepcopy(self)
        account.settle()
        return account

    def settle(self) -> None:
        """Settles what fell due, in the order it fell due (hold expiries never share an
        instant with a grant's events; a grant's activation goes before an expiry)."""
        now = self.now
        events: list[tuple[int, int, int, str]] = []
        for hold in self.holds.values():
            if hold.state == "pending" and hold.expires <= now:
                events.append((hold.expires, 0, hold.order, hold.hold_id))
        for grant in self.grants.values():
            if not grant.live:
                continue
            if not grant.activated and not grant.voided and grant.effective <= now:
                events.append((grant.effective, 1, grant.order, grant.grant_id))
            if (
                not grant.expired
                and not grant.voided
                and grant.expires is not None
                and grant.expires <= now
            ):
                events.append((grant.expires, 2, grant.order, grant.grant_id))
        for _, what, _, ident in sorted(events):
            if what == 0:
                self.close(self.holds[ident], "expired", 0)
            elif what == 1:
                grant = self.grants[ident]
                grant.activated = True
                self.append(
                    "grant",
                    grant.amount,
                    key=grant.key,
                    allocations=((grant.grant_id, grant.amount),),
                )
            else:
                grant = self.grants[ident]
                assert grant.pinned == 0, "a pinned credit expired"
                if grant.remaining:
                    self.append(
                        "expire",
                        -grant.remaining,
                        allocations=((grant.grant_id, grant.remaining),),
                    )
                grant.remaining, grant.expired = 0, True

    # Spending

    def eligible(self, scope: str, until: int | None = None) -> list[Grant]:
        """The grants spending of `scope` may draw on (lasting past `until`), in burn-down
        order. The account is settled."""
        usable = [
            g
            for g in self.grants.values()
            if g.activated
            and not g.expired
            and not g.voided
            and g.remaining > g.pinned
            and (not g.scopes or scope in g.scopes)
            and (until is None or g.expires is None or g.expires > until)
        ]
        return sorted(
            usable,
            key=lambda g: (
                g.priority,
                0 if g.scopes else 1,
                g.expires is None,
                g.expires or 0,
                g.order,
            ),
        )

    @staticmethod
    def draw(grants: list[Grant], amount: int) -> list[tuple[str, int]]:
        parts: list[tuple[str, int]] = []
        for grant in grants:
            if amount == 0:
                break
            part = min(grant.remaining - grant.pinned, amount)
            parts.append((grant.grant_id, part))
            amount -= part
        assert amount == 0
        return parts

    def close(self, hold: Hold, state: HoldState, charge: int, key: str = "") -> Entry | None:
        """Settles a pending hold: `charge` of it captured (in pin order), every pin freed,
        what was pinned of voided grants voided. Returns the capture's entry."""
        hold.state = state
        taken: list[tuple[str, int]] = []
        voided: list[tuple[str, int]] = []
        left = charge
        for grant_id, pinned in hold.pins:
            grant = self.grants[grant_id]
            take = min(pinned, left)
            left -= take
            grant.pinned -= pinned
            grant.remaining -= take
            if take:
                taken.append((grant_id, take))
            if grant.voided and pinned > take:
                grant.remaining -= pinned - take
                voided.append((grant_id, pinned - take))
        captured = None
        if charge:
            captured = self.append(
                "capture", -charge, key=key, hold_id=hold.hold_id, allocations=tuple(taken)
            )
        if voided:
            self.append("void", -sum(v for _, v in voided), allocations=tuple(voided))
        return captured

    def refund(self, entry: Entry, amount: int, key: str) -> Entry:
        """Returns `amount` of `entry` to the grants it drew on, the last drawn first; what
        went to grants expired or voided since leaves again at once."""
        back: dict[str, int] = {}
        for earlier in self.refunds_of(entry):
            for grant_id, part in earlier.allocations:
                back[grant_id] = back.get(grant_id, 0) + part
        parts: list[tuple[str, int]] = []
        left = amount
        for grant_id, drawn in reversed(entry.allocations):
            still = drawn - back.get(grant_id, 0)
            if left and still > 0:
                parts.append((grant_id, min(still, left)))
                left -= min(still, left)
        assert left == 0
        expired: list[tuple[str, int]] = []
        voided: list[tuple[str, int]] = []
        for grant_id, part in parts:
            grant = self.grants[grant_id]
            if grant.voided:
                voided.append((grant_id, part))
            elif grant.expired_at(self.now):
                expired.append((grant_id, part))
            else:
                grant.remaining += part
        refunded = self.append(
            "refund",
            amount,
            key=key,
            refunded_transaction_id=entry.transaction_id,
            allocations=tuple(parts),
        )
        if expired:
            self.append("expire", -sum(p for _, p in expired), allocations=tuple(expired))
        if voided:
            self.append("void", -sum(p for _, p in voided), allocations=tuple(voided))
        return refunded

    def next_expiry(self) -> tuple[int | None, int]:
        """The soonest expiry among active grants with credits left, and how much then. The
        account is settled."""
        soonest: int | None = None
        amount = 0
        for grant in self.grants.values():
            if grant.state(self.now) != "active" or grant.expires is None:
                continue
            if soonest is None or grant.expires < soonest:
                soonest, amount = grant.expires, grant.remaining
            elif grant.expires == soonest:
                amount += grant.remaining
        return soonest, amount


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
GRANT_NOT_ACTIVE = Expected(grpc.StatusCode.FAILED_PRECONDITION, "GRANT_NOT_ACTIVE")
AMOUNT_ABOVE_HOLD = Expected(
    grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", fields=["amount"]
)


def insufficient(required: int, available: int, scope: str) -> Expected:
    """INSUFFICIENT_CREDITS, naming the scope judged (none for unscoped spending)."""
    metadata = {"required": str(required), "available": str(available)}
    return Expected(
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_CREDITS",
        metadata={**metadata, "scope": scope} if scope else metadata,
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


def entry_of(tx: ledger_pb2.Transaction) -> Entry:
    return Entry(
        KIND_NAMES[tx.kind],
        tx.amount,
        tx.balance_after,
        tx.idempotency_key,
        tx.refunded_transaction_id,
        tx.hold_id,
        tuple((a.grant_id, a.amount) for a in tx.allocations),
        tx.transaction_id,
    )


class Owner:
    """The database as its owner, from the machine's thread: the clock, the sweeper, the stored
    books. One event loop of its own for its one connection."""

    def __init__(self, database_url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection = self._loop.run_until_complete(
            asyncpg.connect(database_url)
        )

    def run(self, query: str, *args: object) -> Any:
        return self._loop.run_until_complete(self._conn.fetchrow(query, *args))

    def set_clock(self, seconds: int) -> datetime:
        """Sets the SQL clock `seconds` ahead of real time; the SQL now, as it then is."""
        self.run('update credits_private.clock set "offset" = $1', timedelta(seconds=seconds))
        moved: datetime = self.run("select credits_private.now()")[0]
        return moved

    def sweep(self) -> None:
        self.run("select public.credit_expire_holds(1000000)")

    def books(self, user_id: str) -> asyncpg.Record:
        row: asyncpg.Record = self.run(
            "select balance, held, counted, pinned, holds, pins from credits_private.books"
            " where user_id = $1",
            uuid.UUID(user_id),
        )
        return row

    def close(self) -> None:
        self.set_clock(0)
        self._loop.run_until_complete(self._conn.close())
        self._loop.close()


# The state machine


class LedgerMachine(RuleBasedStateMachine):
    """Random operations on one fresh user, each checked against `Account`."""

    def __init__(self, stub: Stub, owner: Owner) -> None:
        super().__init__()
        self.stub = stub
        self.owner = owner
        # The model's clock counts from the SQL clock at offset 0, as the example starts.
        self.start = owner.set_clock(0)
        self.user = new_user()
        self.account = Account()
        self.fresh_keys = 0
        # The first call of a user creates their profile (with the signup credits, if any).
        first = self.stub.GetBalance(pb.GetBalanceRequest(), metadata=self.user.metadata)
        for tx in reversed(self.list_transactions()):
            entry = entry_of(tx)
            self.account.ledger.append(entry)
            self.account.balance = entry.balance_after
        for listed in reversed(self.list_grants()):
            self.account.grants[listed.grant_id] = Grant(
                listed.grant_id,
                listed.amount,
                listed.priority,
                tuple(listed.scopes),
                0,
                self.seconds(listed.expire_time) if listed.HasField("expire_time") else None,
                self.account.next_order(),
                "",
                remaining=listed.remaining,
                activated=True,
            )
        assert first.balance == self.account.balance

    def teardown(self) -> None:
        self.owner.set_clock(0)

    # Time

    def at(self, seconds: int) -> timestamp_pb2.Timestamp:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(self.start + timedelta(seconds=seconds))
        return stamp

    def seconds(self, stamp: timestamp_pb2.Timestamp) -> int:
        return round((stamp.ToDatetime(tzinfo=self.start.tzinfo) - self.start).total_seconds())

    @rule(minutes=st.one_of(st.integers(1, 30), st.integers(1, 30), st.sampled_from([120, 1440])))
    def advance(self, minutes: int) -> None:
        """Moves the SQL clock on: what falls due counts at once, and is settled by the next
        money call that succeeds (or the sweeper)."""
        self.account.now += 60 * minutes
        self.owner.set_clock(self.account.now)
        event("clock moved")

    @rule()
    def sweep(self) -> None:
        """The sweeper settles everything due of every user (this one's too)."""
        self.owner.sweep()
        self.account.settle()

    def trial(self) -> Account:
        """The account as a call that succeeds leaves it before its own work: settled."""
        return self.account.settled()

    @initialize(amount=st.integers(0, 300))
    def fund(self, amount: int) -> None:
        """Starts most examples with some credits, so that spending rules do not all fail."""
        if amount:
            self.grant(amount, None, 50, (), None, None)

    # Rules: each sends one call, compares it with the model, then updates the model.

    @rule(
        amount=st.integers(1, 100),
        key=KEYS,
        priority=PRIORITIES,
        scopes=GRANT_SCOPES,
        effective=st.one_of(st.none(), st.none(), MINUTES),
        lasts=st.one_of(st.none(), MINUTES),
    )
    def grant_rule(
        self,
        amount: int,
        key: str | None,
        priority: int,
        scopes: tuple[str, ...],
        effective: int | None,
        lasts: int | None,
    ) -> None:
        now = self.account.now
        starts = None if effective is None else now + 60 * effective
        ends = None if lasts is None else (starts or now) + 60 * lasts
        self.grant(amount, key, priority, scopes, starts, ends)

    def grant(
        self,
        amount: int,
        key: str | None,
        priority: int,
        scopes: tuple[str, ...],
        starts: int | None,
        ends: int | None,
    ) -> None:
        key = key or self.fresh_key()
        params = (amount, priority, scopes, starts, ends)
        status = self.account.key_status(key, "grant", params)
        request = pb.GrantCreditsRequest(
            user_id=self.user.user_id,
            amount=amount,
            idempotency_key=key,
            priority=priority,
            scopes=list(scopes),
        )
        if starts is not None:
            request.effective_time.CopyFrom(self.at(starts))
        if ends is not None:
            request.expire_time.CopyFrom(self.at(ends))
        outcome = attempt(self.stub.GrantCredits, request, SERVICE)
        if status == "reused":
            assert_refused(outcome, KEY_REUSED)
            return
        account = self.trial()
        response = succeeded(outcome)
        if status == "replay":
            # The same grant, as it is now, with its entry once written.
            original = self.account.keys[key].response
            event("replayed: grant")
            assert response.replayed
            grant = account.grants[original.grant.grant_id]
            self.check_grant(response.grant, grant, account.now)
            if grant.activated:
                entry = next(e for e in account.ledger if e.kind == "grant" and e.key == key)
                assert entry_of(response.transaction) == entry
                assert response.balance == entry.balance_after
            else:
                assert not response.HasField("transaction")
                assert response.balance == account.balance
            self.account = account
            return
        assert not response.replayed
        made = Grant(
            response.grant.grant_id,
            amount,
            priority,
            tuple(sorted(scopes)),
            account.now if starts is None else starts,
            ends,
            account.next_order(),
            key,
            remaining=amount,
            activated=starts is None,
        )
        account.grants[made.grant_id] = made
        if made.activated:
            event("done: grant")
            entry = account.append("grant", amount, key=key, allocations=((made.grant_id, amount),))
            self.check_new_entry(account, response.transaction, entry)
        else:
            event("done: grant taking effect later")
            assert not response.HasField("transaction")
        assert response.balance == account.balance
        self.check_grant(response.grant, made, account.now)
        self.account = account
        self.record(key, "grant", params, response)

    @rule(amount=st.integers(1, 60), key=KEYS, scope=SPEND_SCOPES)
    def debit(self, amount: int, key: str | None, scope: str) -> None:
        key = key or self.fresh_key()
        status = self.account.key_status(key, "debit", (amount, scope))
        request = pb.DebitCreditsRequest(amount=amount, idempotency_key=key, scope=scope)
        outcome = attempt(self.stub.DebitCredits, request, self.user.metadata)
        if self.check_key_status(outcome, key, status):
            return
        account = self.trial()
        grants = account.eligible(scope)
        available = sum(g.remaining - g.pinned for g in grants)
        if amount > available:
            assert_refused(outcome, insufficient(amount, available, scope))
            return
        response = succeeded(outcome)
        parts = account.draw(grants, amount)
        for grant_id, part in parts:
            account.grants[grant_id].remaining -= part
        entry = account.append("debit", -amount, key=key, allocations=tuple(parts))
        event("done: scoped debit" if scope else "done: debit")
        assert not response.replayed
        self.check_new_entry(account, response.transaction, entry)
        assert response.balance == account.balance
        self.account = account
        self.record(key, "debit", (amount, scope), response)

    @rule(amount=st.integers(1, 60), key=KEYS, seconds=TTLS, scope=SPEND_SCOPES)
    def reserve(self, amount: int, key: str | None, seconds: int, scope: str) -> None:
        key = key or self.fresh_key()
        status = self.account.key_status(key, "reserve", (amount, seconds, scope))
        request = pb.ReserveCreditsRequest(
            amount=amount, idempotency_key=key, ttl=ttl(seconds), scope=scope
        )
        outcome = attempt(self.stub.ReserveCredits, request, self.user.metadata)
        if status == "reused":
            assert_refused(outcome, KEY_REUSED)
            return
        account = self.trial()
        if status == "replay":
            # A replayed reservation: the original answer (the hold as created, pending, and
            # the available it returned), whatever became of the hold since.
            response = succeeded(outcome)
            original = self.account.keys[key].response
            hold = account.holds[original.hold.hold_id]
            event(f"replayed: reserve of a {hold.state} hold")
            assert response.replayed
            assert response.hold == original.hold
            assert response.available == original.available
            self.account = account
            return
        expires = account.now + seconds
        grants = account.eligible(scope, until=expires)
        available = sum(g.remaining - g.pinned for g in grants)
        if amount > available:
            assert_refused(outcome, insufficient(amount, available, scope))
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
        assert 0 <= self.seconds(created.expire_time) - expires < 30
        assert response.available == account.available - amount
        pins = account.draw(grants, amount)
        for grant_id, part in pins:
            account.grants[grant_id].pinned += part
        assert created.hold_id not in account.holds
        account.holds[created.hold_id] = Hold(
            created.hold_id, amount, expires, account.next_order(), pins
        )
        self.account = account
        self.record(key, "reserve", (amount, seconds, scope), response)

    @precondition(lambda self: self.account.holds)
    @rule(data=st.data(), key=KEYS)
    def capture(self, data: st.DataObject, key: str | None) -> None:
        key = key or self.fresh_key()
        hold = self.pick_hold(data)
        amount = data.draw(st.integers(0, hold.amount + 5), label="amount")
        self.do_capture(hold.hold_id, amount, key)

    @precondition(lambda self: self.account.holds)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        hold_id = self.pick_hold(data).hold_id
        request = pb.ReleaseCreditsRequest(hold_id=hold_id)
        outcome = attempt(self.stub.ReleaseCredits, request, self.user.metadata)
        account = self.trial()
        hold = account.holds[hold_id]
        if hold.state != "pending":
            # Captured, released or expired already: refused, saying which.
            assert_refused(outcome, replace(HOLD_NOT_PENDING, metadata={"state": hold.state}))
            return
        response = succeeded(outcome)
        event("done: release")
        account.close(hold, "released", 0)
        assert (response.hold.hold_id, response.hold.amount, response.hold.state) == (
            hold.hold_id,
            hold.amount,
            ledger_pb2.HOLD_STATE_RELEASED,
        )
        assert response.available == account.available
        self.account = account

    @precondition(lambda self: self.account.refundable())
    @rule(data=st.data(), key=KEYS)
    def refund(self, data: st.DataObject, key: str | None) -> None:
        key = key or self.fresh_key()
        entry = self.pick_refundable(data)
        amount = data.draw(st.integers(0, entry.amount + 5), label="amount")
        self.do_refund(entry, amount, key)

    @precondition(lambda self: self.account.grants)
    @rule(data=st.data(), key=KEYS)
    def void(self, data: st.DataObject, key: str | None) -> None:
        """VoidGrant of one of the grants, by number in order of creation; those it may void
        (active or pending now) more often."""
        grants = list(self.account.grants.values())
        now = self.account.now
        voidable = [
            i for i, g in enumerate(grants) if g.settled_state(now) in ("active", "pending")
        ]
        numbers = st.integers(0, len(grants) - 1)
        if voidable:
            numbers = st.sampled_from(voidable) | st.sampled_from(voidable) | numbers
        grant = grants[data.draw(numbers, label="grant number")]
        self.do_void(grant.grant_id, key or self.fresh_key())

    @rule(amount=st.integers(1, 400), scope=SPEND_SCOPES)
    def check(self, amount: int, scope: str) -> None:
        """CheckCredits counts by time, what a debit of that scope could use now."""
        request = pb.CheckCreditsRequest(amount=amount, scope=scope)
        reply = self.stub.CheckCredits(request, metadata=self.user.metadata)
        account = self.trial()
        available = sum(g.remaining - g.pinned for g in account.eligible(scope))
        assert (reply.sufficient, reply.available, reply.shortfall) == (
            amount <= available,
            available,
            max(0, amount - available),
        )

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
            self.grant(use.params[0], key, *use.params[1:])
        elif use.operation == "debit":
            self.debit(use.params[0], key, use.params[1])
        elif use.operation == "reserve":
            self.reserve(use.params[0], key, use.params[1], use.params[2])
        elif use.operation == "capture":
            self.do_capture(use.params[0], use.params[1], key)
        elif use.operation == "void":
            self.do_void(use.params[0], key)
        else:
            entry = next(e for e in self.account.ledger if e.transaction_id == use.params[0])
            self.do_refund(entry, use.params[1], key)

    @precondition(lambda self: self.account.keys)
    @rule(
        data=st.data(),
        operation=st.sampled_from(["grant", "debit", "reserve", "capture", "refund", "void"]),
    )
    def reuse(self, data: st.DataObject, operation: Operation) -> None:
        """An earlier key with other parameters, or for another operation, is refused."""
        key = data.draw(st.sampled_from(sorted(self.account.keys)), label="key")
        use = self.account.keys[key]
        # The same operation with another amount, or another operation with any amount.
        if use.operation == "void":
            amount = 1
        else:
            amount = use.params[1 if use.operation in ("capture", "refund") else 0] + 1
        if operation == "capture" and self.account.holds:
            hold = self.pick_hold(data)
            assert self.account.key_status(key, "capture", (hold.hold_id, amount)) == "reused"
            self.do_capture(hold.hold_id, amount, key)
        elif operation == "refund" and self.account.refundable():
            entry = self.pick_refundable(data)
            assert (
                self.account.key_status(key, "refund", (entry.transaction_id, amount)) == "reused"
            )
            self.do_refund(entry, amount, key)
        elif operation == "void" and use.operation != "void" and self.account.grants:
            grant_id = data.draw(st.sampled_from(sorted(self.account.grants)), label="grant")
            assert self.account.key_status(key, "void", (grant_id,)) == "reused"
            self.do_void(grant_id, key)
        elif operation == "reserve":
            assert self.account.key_status(key, "reserve", (amount, 90, "")) == "reused"
            self.reserve(amount, key, 90, "")
        elif operation == "debit":
            assert self.account.key_status(key, "debit", (amount, "")) == "reused"
            self.debit(amount, key, "")
        else:
            params = (amount, 50, (), None, None)
            assert self.account.key_status(key, "grant", params) == "reused"
            self.grant(amount, key, 50, (), None, None)

    # The operations that take an object of the model

    def do_capture(self, hold_id: str, amount: int, key: str) -> None:
        params = (hold_id, amount)
        status = self.account.key_status(key, "capture", params)
        request = pb.CaptureCreditsRequest(hold_id=hold_id, amount=amount, idempotency_key=key)
        outcome = attempt(self.stub.CaptureCredits, request, self.user.metadata)
        if status == "reused":
            assert_refused(outcome, KEY_REUSED)
            return
        account = self.trial()
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
            self.account = account
            return
        hold = account.holds[hold_id]
        if hold.state != "pending":
            assert_refused(outcome, replace(HOLD_NOT_PENDING, metadata={"state": hold.state}))
            return
        charge = amount or hold.amount
        if charge > hold.amount:
            assert_refused(outcome, AMOUNT_ABOVE_HOLD)
            return
        response = succeeded(outcome)
        event("done: partial capture" if charge < hold.amount else "done: whole capture")
        entry = account.close(hold, "captured", charge, key)
        assert entry is not None
        assert not response.replayed
        self.check_new_entry(account, response.transaction, entry)
        # The balance after the capture and what it voided of voided grants' pins, if any.
        assert response.balance == account.balance
        assert (response.hold.hold_id, response.hold.amount, response.hold.state) == (
            hold.hold_id,
            hold.amount,
            ledger_pb2.HOLD_STATE_CAPTURED,
        )
        self.account = account
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
        account = self.trial()
        remaining = account.remaining(entry)
        credit = amount or remaining
        if credit == 0 or credit > remaining:
            assert_refused(outcome, REFUND_EXCEEDS_DEBIT)
            return
        response = succeeded(outcome)
        refunded = account.refund(entry, credit, key)
        event("done: refund")
        if account.ledger[-1] is not refunded:
            event("done: refund into an expired or voided grant")
        assert not response.replayed
        self.check_new_entry(account, response.transaction, refunded)
        assert response.balance == account.balance
        self.account = account
        self.record(key, "refund", params, response)

    def do_void(self, grant_id: str, key: str) -> None:
        params = (grant_id,)
        status = self.account.key_status(key, "void", params)
        request = pb.VoidGrantRequest(grant_id=grant_id, idempotency_key=key)
        outcome = attempt(self.stub.VoidGrant, request, SERVICE)
        if status == "reused":
            assert_refused(outcome, KEY_REUSED)
            return
        account = self.trial()
        grant = account.grants[grant_id]
        entry = next((e for e in account.ledger if e.kind == "void" and e.key == key), None)
        if status == "replay":
            response = succeeded(outcome)
            event("replayed: void")
            assert response.replayed
        else:
            state = grant.state(account.now)
            if state not in ("active", "pending"):
                assert_refused(outcome, replace(GRANT_NOT_ACTIVE, metadata={"state": state}))
                return
            response = succeeded(outcome)
            event(f"done: void of a grant {state}")
            assert not response.replayed
            free = grant.remaining - grant.pinned if grant.activated else 0
            grant.voided, grant.void_key = True, key
            if grant.activated:
                grant.remaining = grant.pinned
            entry = None
            if free:
                entry = account.append("void", -free, key=key, allocations=((grant_id, free),))
            account.keys[key] = KeyUse("void", params, response)
        if entry is None:
            assert not response.HasField("transaction")
            assert response.balance == account.balance
        else:
            assert entry_of(response.transaction) == entry
            assert response.balance == entry.balance_after
        self.check_grant(response.grant, grant, account.now)
        self.account = account

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
        """Checks a refused reuse or a replayed ledger mutation; True if that was the case. A
        replay settles what fell due, as every successful call does."""
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
            self.account = self.trial()
            return True
        return False

    def check_new_entry(self, account: Account, tx: ledger_pb2.Transaction, entry: Entry) -> None:
        """Checks a fresh ledger entry against the model's `entry`, which learns its id."""
        assert entry_of(tx) == entry
        assert tx.user_id == self.user.user_id
        assert all(e.transaction_id != tx.transaction_id for e in account.ledger)
        at = next(i for i in reversed(range(len(account.ledger))) if account.ledger[i] is entry)
        account.ledger[at] = replace(entry, transaction_id=tx.transaction_id)

    def record(
        self, key: str, operation: Operation, params: tuple[Any, ...], response: Any
    ) -> None:
        assert key not in self.account.keys
        self.account.keys[key] = KeyUse(operation, params, response)

    def check_grant(
        self, shown: grant_pb2.Grant, grant: Grant, now: int, written: bool | None = None
    ) -> None:
        """`shown` is `grant` at `now`; it has its GRANT entry if `written` (default: if it is
        activated; reads show a grant that took effect before its entry is written)."""
        assert (shown.grant_id, shown.user_id) == (grant.grant_id, self.user.user_id)
        assert (shown.amount, shown.priority, tuple(shown.scopes)) == (
            grant.amount,
            grant.priority,
            grant.scopes,
        )
        assert shown.state == GRANT_STATES[grant.state(now)], (shown, grant)
        assert shown.remaining == grant.shown_remaining(now), (shown, grant)
        assert 0 <= shown.remaining <= shown.amount
        if grant.expires is None:
            assert not shown.HasField("expire_time")
        else:
            assert self.seconds(shown.expire_time) == grant.expires
        assert bool(shown.transaction_id) == (grant.activated if written is None else written)

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

    def list_grants(self) -> list[grant_pb2.Grant]:
        """The user's grants, newest first, read page by page in the user's own session."""
        grants: list[grant_pb2.Grant] = []
        token = ""
        while True:
            page = self.stub.ListGrants(
                pb.ListGrantsRequest(page_size=PAGE_SIZE, page_token=token),
                metadata=self.user.metadata,
            )
            grants.extend(page.grants)
            token = page.next_page_token
            if not token:
                return grants

    # Invariants, checked after every step

    @invariant()
    def balance_matches_the_model(self) -> None:
        """Reads count by time: the account as if everything due were settled."""
        reply = self.stub.GetBalance(pb.GetBalanceRequest(), metadata=self.user.metadata)
        account = self.trial()
        assert (reply.balance, reply.held, reply.available) == (
            account.balance,
            account.held,
            account.available,
        )
        assert reply.balance >= reply.held >= 0
        soonest, amount = account.next_expiry()
        if soonest is None:
            assert not reply.HasField("next_expire_time")
        else:
            assert self.seconds(reply.next_expire_time) == soonest
        assert reply.next_expire_amount == amount

    @invariant()
    def ledger_matches_the_model(self) -> None:
        """The ledger as stored: what the calls so far wrote, settlement included."""
        transactions = self.list_transactions()
        entries = [entry_of(t) for t in reversed(transactions)]
        assert sum(SIGN[e.kind] * e.amount for e in entries) == self.account.balance
        # Nothing is ever spent of credits that expired, nor debited of a voided grant (a
        # capture may still spend what its hold pinned of one).
        expired: set[str] = set()
        voided: set[str] = set()
        for entry in entries:
            spent = {grant_id for grant_id, _ in entry.allocations}
            if entry.kind in ("debit", "capture"):
                assert not spent & expired, entry
            if entry.kind == "debit":
                assert not spent & voided, entry
            if entry.kind == "expire":
                expired |= spent
            if entry.kind == "void":
                voided |= spent
        assert entries == self.account.ledger
        known = [
            (m.transaction_id, e.transaction_id)
            for m, e in zip(self.account.ledger, entries, strict=True)
        ]
        assert all(mine == theirs for mine, theirs in known if mine)
        # The model learns the ids of the entries settlement wrote.
        self.account.ledger = [
            replace(m, transaction_id=e.transaction_id)
            for m, e in zip(self.account.ledger, entries, strict=True)
        ]

    @invariant()
    def grants_match_the_model(self) -> None:
        """Every grant, its state and remainder by time; the active ones hold the balance."""
        account = self.trial()
        shown = {g.grant_id: g for g in self.list_grants()}
        assert sorted(shown) == sorted(account.grants)
        for grant_id, grant in account.grants.items():
            stored = self.account.grants[grant_id].activated
            self.check_grant(shown[grant_id], grant, account.now, stored)
        counted = sum(
            g.remaining
            for g in shown.values()
            if g.state in (grant_pb2.GRANT_STATE_ACTIVE, grant_pb2.GRANT_STATE_VOIDED)
        )
        assert counted == account.balance

    @invariant()
    def books_are_kept(self) -> None:
        """As stored: balance = the remaining of active grants, held = pending holds = pins."""
        books = self.owner.books(self.user.user_id)
        assert books["balance"] == books["counted"] == self.account.balance
        assert books["held"] == books["holds"] == books["pins"] == books["pinned"]
        assert books["held"] == self.account.held


def run_machine(port: int, database_url: str) -> None:
    """Runs the state machine to completion (in a worker thread) over a synchronous channel."""
    owner = Owner(database_url)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = Stub(channel)
            # Any factory of machines will do, not just the class (hypothesis' hint is narrower).
            factory = partial(LedgerMachine, stub, owner)
            run_state_machine_as_test(factory, settings=MACHINE_SETTINGS)  # type: ignore[arg-type]
    finally:
        owner.close()


@asynccontextmanager
async def no_sweeper(server: application.Application) -> AsyncIterator[None]:
    """The server's own sweeper stopped (the machine runs the sweeper itself, when it
    chooses), and started again after."""
    await server.sweeper.stop()
    try:
        yield
    finally:
        server.sweeper.start()


async def test_the_ledger_behaves_like_its_model(
    server: application.Application, database_url: str
) -> None:
    # The event loop keeps serving while the machine runs in a thread.
    async with no_sweeper(server):
        await asyncio.to_thread(run_machine, server.port, database_url)


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
