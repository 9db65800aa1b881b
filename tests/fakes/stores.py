"""FAKE stores of the domain's ports, for unit tests: in memory, no database, no transport.

- `FakeCreditStore`: a fake of CreditStore, HoldExpiry and ProfileStore
  (server/credit/ports.py).
- `FakeGenerationStore`: a fake of GenerationStore and JobQueue (server/generation/ports.py).

Each is a fake: in memory, keeping the documented behaviour of the SQL functions it stands for
(server/db/migrations), as the transports report it (server/transports/sql_errors.py): the same
domain errors, raised in the same order. The arguments are taken as the domain validated them;
the checks the SQL alone makes (a capture larger than its hold, a refund of a grant) are kept.
Like the SQL functions called through the service layer, neither decides whether the caller may
act: that is the domain's (server/domain/access.py), which the unit tests exercise over these.

What they leave out: row-level security and the user layer, the LISTEN/NOTIFY connection (the
generation fake publishes its state changes into a ChangeFeed directly, as the trigger would),
and money on the generation side (a generation's cost is recorded, its hold is not modelled).
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.auth.principal import Principal, UserPrincipal
from server.credit.models import (
    Allocation,
    Capture,
    CreditCheck,
    Grant,
    GrantCategory,
    GrantRequest,
    GrantResult,
    GrantState,
    Hold,
    HoldRequest,
    HoldState,
    LedgerResult,
    Movement,
    Profile,
    RefundRequest,
    Release,
    Reservation,
    Transaction,
    TransactionFilter,
    TransactionKind,
    VoidRequest,
)
from server.errors import (
    GenerationNotCancellable,
    GenerationNotFound,
    GrantNotActive,
    GrantNotFound,
    HoldNotFound,
    HoldNotPending,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidArgument,
    ProfileNotFound,
    RefundExceedsDebit,
    TransactionNotFound,
)
from server.generation.feed import ChangeFeed, StateChange
from server.generation.models import (
    ClaimedJob,
    Generation,
    GenerationState,
    ModelSpec,
    QueueStats,
)

# What makes two requests under one idempotency key the same request (the SQL's fingerprint).
Fingerprint = tuple[object, ...]


class FakeClock:
    """The fakes' now(): UTC wall time moved on by `advance`, and strictly increasing from one
    reading to the next (as each SQL call runs in its own transaction, with its own now())."""

    def __init__(self) -> None:
        self._offset = timedelta(0)
        self._last = datetime.min.replace(tzinfo=UTC)

    def now(self) -> datetime:
        moment = max(datetime.now(UTC) + self._offset, self._last + timedelta(microseconds=1))
        self._last = moment
        return moment

    def advance(self, seconds: float) -> None:
        self._offset += timedelta(seconds=seconds)


@dataclass(slots=True)
class _Account:
    email: str
    # As stored: the remaining credits of the user's activated, unexpired grants.
    balance: int
    create_time: datetime
    update_time: datetime


@dataclass(slots=True)
class _HoldRow:
    hold: Hold  # its state as recorded: a pending one may be overdue (reported expired)
    fingerprint: Fingerprint
    available_after: int
    # Grant id -> credits this hold pins of it, in burn order at the reservation.
    pins: dict[uuid.UUID, int]


@dataclass(slots=True)
class _GrantRow:
    """credit_grants: a grant as stored (its state is judged by time when read)."""

    grant_id: uuid.UUID
    user_id: uuid.UUID
    amount: int
    remaining: int
    category: GrantCategory
    priority: int
    scopes: tuple[str, ...]
    effective: datetime
    expires: datetime | None
    create_time: datetime
    seq: int
    key: str
    fingerprint: Fingerprint
    description: str
    metadata: Mapping[str, str]
    activated: bool = False  # its GRANT entry is written
    expired: bool = False  # its EXPIRE entry is written
    voided_at: datetime | None = None
    transaction_id: uuid.UUID | None = None
    void_key: str | None = None
    void_fingerprint: Fingerprint | None = None
    void_entry: Transaction | None = None


# The order events settle in when they fall on one instant: holds' expiries (freeing their
# pins), grants' activations, grants' expiries.
_HOLD_EXPIRY, _ACTIVATION, _GRANT_EXPIRY = 0, 1, 2


class FakeCreditStore:
    """A fake CreditStore + HoldExpiry + ProfileStore: in memory, keeping the documented
    behaviour of the SQL functions (credit_* in server/db/migrations).

    Credits live in grants (the opening balance of `add_profile` and the signup credits are
    grants too). balance = the remaining credits of the active grants, held = the pending holds
    not yet past their expiry (each pins credits of grants), available = balance - held. A read
    judges by time without writing; every money call first settles the user's due events (holds'
    expiries, grants' activations and expiries, as EXPIRE and VOID entries), as lock_profile
    does. Spending with a scope draws on the eligible grants in the burn-down order (priority,
    scoped before unscoped, soonest expiry, oldest) and records its allocations; refunds go back
    to the grants they came from, and a part whose grant has expired or been voided since leaves
    again at once. `known_users` stands for auth.users: provision_known makes a profile for those
    only. Idempotency per (user, key): a replay returns the original result with replayed=True,
    the key with other parameters (or a key another operation used) is IdempotencyKeyReused.
    """

    def __init__(
        self,
        *,
        signup_credits: int = 0,
        signup_ttl: timedelta | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.signup_credits = signup_credits
        self.signup_ttl = signup_ttl
        self.clock = clock or FakeClock()
        # The identity provider's users (auth.users): user id -> email.
        self.known_users: dict[uuid.UUID, str] = {}
        # The store methods called, in order: shows what reached the store.
        self.calls: list[str] = []
        self._accounts: dict[uuid.UUID, _Account] = {}
        self._ledger: list[Transaction] = []
        self._fingerprints: dict[uuid.UUID, Fingerprint] = {}
        self._holds: dict[uuid.UUID, _HoldRow] = {}
        self._grants: dict[uuid.UUID, _GrantRow] = {}
        self._seq = itertools.count(1)
        self._grant_seq = itertools.count(1)

    # Test setup (not a port)

    def add_profile(self, user_id: uuid.UUID, *, balance: int = 0, email: str = "") -> None:
        """A profile as provisioning makes it, `balance` granted as its opening entry (a paid,
        unscoped grant that never expires)."""
        now = self.clock.now()
        self._accounts[user_id] = _Account(email, 0, now, now)
        if balance:
            self._add_grant(user_id, GrantRequest(balance, "", "", {}), ("opening",), now)

    # ProfileStore

    async def provision(self, principal: UserPrincipal) -> None:
        self.calls.append("provision")
        self._create_profile(principal.user_id, principal.email)

    async def provision_known(self, user_id: uuid.UUID) -> None:
        self.calls.append("provision_known")
        if user_id not in self.known_users:
            raise ProfileNotFound()  # a service-role call: nothing names the user in it
        self._create_profile(user_id, self.known_users[user_id])

    # CreditStore

    async def get_profile(self, principal: Principal, user_id: uuid.UUID) -> Profile:
        self.calls.append("get_profile")
        account = self._account(user_id)
        now = self.clock.now()
        views = [self._view_grant(g, now) for g in self._grants_of(user_id)]
        balance = sum(g.remaining for g in views if g.state in _COUNTED)
        held = self._held(user_id, now)
        expiring = [
            g for g in views if g.state == GrantState.ACTIVE and g.expire_time and g.remaining
        ]
        soonest = min((g.expire_time for g in expiring if g.expire_time), default=None)
        return Profile(
            user_id=user_id,
            email=account.email,
            balance=balance,
            held=held,
            available=balance - held,
            create_time=account.create_time,
            update_time=account.update_time,
            next_expire_time=soonest,
            next_expire_amount=sum(g.remaining for g in expiring if g.expire_time == soonest),
        )

    async def check(
        self, principal: Principal, user_id: uuid.UUID, amount: int, scope: str
    ) -> CreditCheck:
        self.calls.append("check")
        self._account(user_id)
        available = sum(free for _, free in self._eligible(user_id, scope, self.clock.now()))
        shortfall = max(0, amount - available)
        return CreditCheck(shortfall == 0, available, shortfall)

    async def list_transactions(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        limit: int,
        before_seq: int | None,
        where: TransactionFilter,
    ) -> Sequence[Transaction]:
        self.calls.append("list_transactions")
        self._account(user_id)
        rows = [
            t
            for t in reversed(self._ledger)
            if t.user_id == user_id
            and (before_seq is None or t.seq < before_seq)
            and (not where.kinds or t.kind in where.kinds)
            and (where.start is None or t.create_time >= where.start)
            and (where.end is None or t.create_time < where.end)
        ]
        return rows[:limit]

    async def list_grants(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        limit: int,
        before_seq: int | None,
        states: frozenset[GrantState],
    ) -> Sequence[Grant]:
        self.calls.append("list_grants")
        self._account(user_id)
        now = self.clock.now()
        views = (
            self._view_grant(g, now)
            for g in sorted(self._grants_of(user_id), key=lambda g: g.seq, reverse=True)
            if before_seq is None or g.seq < before_seq
        )
        return [g for g in views if not states or g.state in states][:limit]

    async def debit(
        self, principal: Principal, user_id: uuid.UUID, movement: Movement
    ) -> LedgerResult:
        self.calls.append("debit")
        fingerprint = (
            "debit",
            movement.amount,
            movement.description,
            tuple(sorted(movement.metadata.items())),
            movement.scope,
        )
        now = self._lock(user_id)
        replayed = self._replay(user_id, movement.idempotency_key, fingerprint)
        if replayed is not None:
            return LedgerResult(replayed, replayed.balance_after, replayed=True)
        eligible = self._eligible(user_id, movement.scope, now)
        available = sum(free for _, free in eligible)
        if available < movement.amount:
            raise InsufficientCredits(movement.amount, available, movement.scope)
        parts = _draw(eligible, movement.amount)
        for grant_id, amount in parts:
            self._grants[grant_id].remaining -= amount
        return self._append(
            user_id,
            TransactionKind.DEBIT,
            -movement.amount,
            movement.idempotency_key,
            fingerprint,
            now,
            description=movement.description,
            metadata=movement.metadata,
            allocations=parts,
        )

    async def grant(
        self, principal: Principal, user_id: uuid.UUID, grant: GrantRequest
    ) -> GrantResult:
        self.calls.append("grant")
        fingerprint = (
            "grant",
            grant.amount,
            grant.description,
            tuple(sorted(grant.metadata.items())),
            grant.expire_time,
            grant.effective_time,
            grant.priority,
            grant.category.value,
            grant.scopes,
        )
        now = self._lock(user_id)
        earlier = next(
            (g for g in self._grants_of(user_id) if g.key == grant.idempotency_key), None
        )
        if earlier is not None:
            if earlier.fingerprint != fingerprint:
                raise IdempotencyKeyReused()
            return self._grant_result(earlier, now, replayed=True)
        self._refuse_used_key(user_id, grant.idempotency_key)
        # Times are judged after the key, as credit_grant does: a replay is answered whatever
        # time it is now.
        if grant.expire_time is not None and grant.expire_time <= max(
            now, grant.effective_time or now
        ):
            raise InvalidArgument.one(
                "expire_time", "must be after the effective time and after now"
            )
        row = self._add_grant(user_id, grant, fingerprint, now)
        return self._grant_result(row, now, replayed=False)

    async def void_grant(self, principal: Principal, void: VoidRequest) -> GrantResult:
        self.calls.append("void_grant")
        row = self._grants.get(void.grant_id)
        if row is None:
            raise GrantNotFound()
        now = self._lock(row.user_id)
        fingerprint = ("void", void.grant_id, void.description)
        earlier = next(
            (g for g in self._grants_of(row.user_id) if g.void_key == void.idempotency_key), None
        )
        if earlier is not None:
            if earlier.void_fingerprint != fingerprint:
                raise IdempotencyKeyReused()
            view = self._view_grant(earlier, now)
            entry = earlier.void_entry
            balance = entry.balance_after if entry else self._accounts[row.user_id].balance
            return GrantResult(entry, view, balance, replayed=True)
        self._refuse_used_key(row.user_id, void.idempotency_key)
        state = self._view_grant(row, now).state
        if state not in (GrantState.ACTIVE, GrantState.PENDING):
            raise GrantNotActive(state=state.value)
        row.voided_at = now
        row.void_key, row.void_fingerprint = void.idempotency_key, fingerprint
        unpinned = row.remaining - self._pinned(row.grant_id, now)
        if state == GrantState.ACTIVE and unpinned > 0:
            row.remaining -= unpinned
            result = self._append(
                row.user_id,
                TransactionKind.VOID,
                -unpinned,
                void.idempotency_key,
                fingerprint,
                now,
                description=void.description,
                metadata={"grant_id": str(row.grant_id)},
                allocations=[(row.grant_id, unpinned)],
            )
            row.void_entry = result.transaction
        self._accounts[row.user_id].update_time = now
        self._check(row.user_id, now)
        return GrantResult(
            row.void_entry,
            self._view_grant(row, now),
            self._accounts[row.user_id].balance,
            replayed=False,
        )

    async def refund(
        self, principal: Principal, user_id: uuid.UUID | None, refund: RefundRequest
    ) -> LedgerResult:
        """Refunds the transaction `refund` names, of `user_id` (None: of its owner)."""
        self.calls.append("refund")
        fingerprint = ("refund", refund.transaction_id, refund.amount, refund.description)
        if user_id is None:
            named = next(
                (t for t in self._ledger if t.transaction_id == refund.transaction_id), None
            )
            if named is None:
                raise TransactionNotFound()
            user_id = named.user_id
        now = self._lock(user_id)
        replayed = self._replay(user_id, refund.idempotency_key, fingerprint)
        if replayed is not None:
            return LedgerResult(replayed, self._balance_after(replayed), replayed=True)
        original = next(
            (
                t
                for t in self._ledger
                if t.transaction_id == refund.transaction_id and t.user_id == user_id
            ),
            None,
        )
        if original is None:
            raise TransactionNotFound()
        if original.kind not in (TransactionKind.DEBIT, TransactionKind.CAPTURE):
            raise InvalidArgument.one("transaction_id", "must name a debit or a capture")
        refunds = [t for t in self._ledger if t.refunded_transaction_id == original.transaction_id]
        remaining = original.amount - sum(t.amount for t in refunds)
        amount = refund.amount or remaining
        if amount > remaining or amount == 0:
            raise RefundExceedsDebit()
        returned: dict[uuid.UUID, int] = {}
        for t in refunds:
            for part in t.allocations:
                returned[part.grant_id] = returned.get(part.grant_id, 0) + part.amount
        # The grant drawn last gets its credits back first.
        parts: list[tuple[uuid.UUID, int]] = []
        left = amount
        for part in reversed(original.allocations):
            take = min(left, part.amount - returned.get(part.grant_id, 0))
            if take > 0:
                parts.append((part.grant_id, take))
                left -= take
        result = self._append(
            user_id,
            TransactionKind.REFUND,
            amount,
            refund.idempotency_key,
            fingerprint,
            now,
            description=refund.description,
            refunded=original.transaction_id,
            allocations=parts,
            check=False,
        )
        expired = [(g, n) for g, n in parts if self._grants[g].expired]
        voided = [(g, n) for g, n in parts if not self._grants[g].expired and self._voided(g)]
        for grant_id, n in parts:
            if (grant_id, n) not in expired and (grant_id, n) not in voided:
                self._grants[grant_id].remaining += n
        # The parts of grants that no longer count leave again at once (companion entries).
        follows = {"refund_transaction_id": str(result.transaction.transaction_id)}
        for kind, gone, text in (
            (TransactionKind.EXPIRE, expired, "refunded credits of expired grants"),
            (TransactionKind.VOID, voided, "refunded credits of voided grants"),
        ):
            if gone:
                total = sum(n for _, n in gone)
                self._append(
                    user_id,
                    kind,
                    -total,
                    "",
                    (kind.value,),
                    now,
                    description=text,
                    metadata=follows,
                    allocations=gone,
                    check=False,
                )
        self._check(user_id, now)
        # The call answers with the balance after its companion entries too.
        return LedgerResult(result.transaction, self._accounts[user_id].balance, replayed=False)

    async def reserve(
        self, principal: Principal, user_id: uuid.UUID, hold: HoldRequest
    ) -> Reservation:
        self.calls.append("reserve")
        fingerprint = ("reserve", hold.amount, hold.ttl_seconds, hold.description, hold.scope)
        now = self._lock(user_id)
        earlier = next(
            (
                row
                for row in self._holds.values()
                if row.hold.user_id == user_id and row.hold.idempotency_key == hold.idempotency_key
            ),
            None,
        )
        if earlier is not None:
            if earlier.fingerprint != fingerprint:
                raise IdempotencyKeyReused()
            # The original result: the hold as the reservation made it, and its `available`.
            original = dataclasses.replace(earlier.hold, state=HoldState.PENDING)
            return Reservation(original, earlier.available_after, replayed=True)
        self._refuse_used_key(user_id, hold.idempotency_key)
        expire_time = now + timedelta(seconds=hold.ttl_seconds)
        # Only grants that last as long as the hold may be pinned by it.
        eligible = self._eligible(user_id, hold.scope, now, until=expire_time)
        available = sum(free for _, free in eligible)
        if available < hold.amount:
            raise InsufficientCredits(hold.amount, available, hold.scope)
        made = Hold(
            hold_id=uuid.uuid4(),
            user_id=user_id,
            amount=hold.amount,
            state=HoldState.PENDING,
            expire_time=expire_time,
            create_time=now,
            idempotency_key=hold.idempotency_key,
            description=hold.description,
        )
        after = self._available(user_id, now) - hold.amount
        pins = dict(_draw(eligible, hold.amount))
        self._holds[made.hold_id] = _HoldRow(made, fingerprint, after, pins)
        self._accounts[user_id].update_time = now
        self._check(user_id, now)
        return Reservation(made, after, replayed=False)

    async def capture(
        self,
        principal: Principal,
        hold_id: uuid.UUID,
        owner: uuid.UUID | None,
        *,
        amount: int,
        idempotency_key: str,
    ) -> Capture:
        self.calls.append("capture")
        fingerprint = ("capture", hold_id, amount)
        row, now = self._lock_hold(hold_id, owner)
        user_id = row.hold.user_id
        replayed = self._replay(user_id, idempotency_key, fingerprint)
        if replayed is not None:
            balance = self._balance_after(replayed)
            return Capture(replayed, self._view(row, now), balance, replayed=True)
        if row.hold.state != HoldState.PENDING:
            raise HoldNotPending(state=row.hold.state.value)
        charged = amount or row.hold.amount
        if charged > row.hold.amount:
            raise InvalidArgument.one("amount", "must not exceed the hold")
        # The pinned credits, in pin order; the rest of the pins are freed.
        pins = list(row.pins.items())
        parts = _draw(pins, charged)
        for grant_id, n in parts:
            self._grants[grant_id].remaining -= n
        row.hold = dataclasses.replace(row.hold, state=HoldState.CAPTURED)
        row.pins = {}
        result = self._append(
            user_id,
            TransactionKind.CAPTURE,
            -charged,
            idempotency_key,
            fingerprint,
            now,
            description=row.hold.description,
            hold_id=hold_id,
            allocations=parts,
        )
        taken = dict(parts)
        self._free(user_id, [(g, n - taken.get(g, 0)) for g, n in pins], now, hold_id)
        # The balance after the companion VOID entry, if there is one.
        balance = self._accounts[user_id].balance
        return Capture(result.transaction, row.hold, balance, replayed=False)

    async def release(
        self, principal: Principal, hold_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Release:
        self.calls.append("release")
        row, now = self._lock_hold(hold_id, owner)
        if row.hold.state != HoldState.PENDING:
            raise HoldNotPending(state=row.hold.state.value)
        row.hold = dataclasses.replace(row.hold, state=HoldState.RELEASED)
        pins, row.pins = list(row.pins.items()), {}
        self._free(row.hold.user_id, pins, now, hold_id)
        self._accounts[row.hold.user_id].update_time = now
        return Release(row.hold, self._available(row.hold.user_id, now))

    # HoldExpiry

    async def expire_holds(self, users: int) -> int:
        self.calls.append("expire_holds")
        now = self.clock.now()
        due = list(dict.fromkeys(user for _, _, user, _ in self._due_events(None, now)))[:users]
        for user_id in due:
            self._settle(user_id, now)
        return len(due)

    async def settlement_lag(self) -> float:
        self.calls.append("settlement_lag")
        now = self.clock.now()
        due = self._due_events(None, now)
        return (now - due[0][0]).total_seconds() if due else 0.0

    # The SQL's private helpers

    def _create_profile(self, user_id: uuid.UUID, email: str) -> None:
        """create_profile: made once, with the signup credits as a promotional grant."""
        if user_id in self._accounts:
            return
        now = self.clock.now()
        self._accounts[user_id] = _Account(email, 0, now, now)
        if self.signup_credits > 0:
            expires = now + self.signup_ttl if self.signup_ttl is not None else None
            signup = GrantRequest(
                self.signup_credits,
                "",
                "signup credits",
                {},
                expire_time=expires,
                category=GrantCategory.PROMOTIONAL,
            )
            self._add_grant(user_id, signup, ("signup",), now)

    def _add_grant(
        self, user_id: uuid.UUID, request: GrantRequest, fingerprint: Fingerprint, now: datetime
    ) -> _GrantRow:
        """A new grant, active at once (its GRANT entry written) unless it takes effect later."""
        row = _GrantRow(
            grant_id=uuid.uuid4(),
            user_id=user_id,
            amount=request.amount,
            remaining=request.amount,
            category=request.category,
            priority=request.priority,
            scopes=request.scopes,
            effective=request.effective_time or now,
            expires=request.expire_time,
            create_time=now,
            seq=next(self._grant_seq),
            key=request.idempotency_key,
            fingerprint=fingerprint,
            description=request.description,
            metadata=dict(request.metadata),
        )
        self._grants[row.grant_id] = row
        if row.effective <= now:
            self._activate(row, now)
        self._accounts[user_id].update_time = now
        return row

    def _activate(self, row: _GrantRow, now: datetime) -> None:
        row.activated = True
        result = self._append(
            row.user_id,
            TransactionKind.GRANT,
            row.amount,
            row.key,
            row.fingerprint,
            now,
            description=row.description,
            metadata=row.metadata,
            allocations=[(row.grant_id, row.amount)],
            check=False,
        )
        row.transaction_id = result.transaction.transaction_id

    def _grant_result(self, row: _GrantRow, now: datetime, *, replayed: bool) -> GrantResult:
        entry = next((t for t in self._ledger if t.transaction_id == row.transaction_id), None)
        balance = entry.balance_after if entry is not None else self._accounts[row.user_id].balance
        return GrantResult(entry, self._view_grant(row, now), balance, replayed=replayed)

    def _account(self, user_id: uuid.UUID) -> _Account:
        """The profile, or ProfileNotFound naming the user (as the repository reports it)."""
        account = self._accounts.get(user_id)
        if account is None:
            raise ProfileNotFound(user_id=user_id)
        return account

    def _grants_of(self, user_id: uuid.UUID) -> list[_GrantRow]:
        return [g for g in self._grants.values() if g.user_id == user_id]

    def _lock(self, user_id: uuid.UUID) -> datetime:
        """lock_profile: ProfileNotFound when missing; settles the user's due events."""
        self._account(user_id)
        now = self.clock.now()
        self._settle(user_id, now)
        return now

    def _lock_hold(self, hold_id: uuid.UUID, owner: uuid.UUID | None) -> tuple[_HoldRow, datetime]:
        """lock_hold: another user's hold is HoldNotFound exactly like an unknown one."""
        row = self._holds.get(hold_id)
        if row is None or (owner is not None and row.hold.user_id != owner):
            raise HoldNotFound()
        return row, self._lock(row.hold.user_id)

    def _due_events(
        self, user_id: uuid.UUID | None, now: datetime
    ) -> list[tuple[datetime, int, uuid.UUID, object]]:
        """(when, order, user, hold or grant) of what is due by `now` and not yet written."""
        events: list[tuple[datetime, int, uuid.UUID, object]] = []
        for row in self._holds.values():
            hold = row.hold
            if hold.state == HoldState.PENDING and hold.expire_time <= now:
                events.append((hold.expire_time, _HOLD_EXPIRY, hold.user_id, row))
        for g in self._grants.values():
            if g.voided_at is None and not g.activated and g.effective <= now:
                events.append((g.effective, _ACTIVATION, g.user_id, g))
            live = g.activated or (g.voided_at is None and g.effective <= now)
            if live and not g.expired and g.expires is not None and g.expires <= now:
                events.append((g.expires, _GRANT_EXPIRY, g.user_id, g))
        events = [e for e in events if user_id is None or e[2] == user_id]
        return sorted(events, key=lambda e: (e[0], e[1]))

    def _settle(self, user_id: uuid.UUID, now: datetime) -> None:
        """What lock_profile settles, in the order of the events' times."""
        for _, order, _, subject in self._due_events(user_id, now):
            if order == _HOLD_EXPIRY:
                assert isinstance(subject, _HoldRow)
                subject.hold = dataclasses.replace(subject.hold, state=HoldState.EXPIRED)
                pins, subject.pins = list(subject.pins.items()), {}
                self._free(user_id, pins, now, subject.hold.hold_id)
            elif order == _ACTIVATION:
                assert isinstance(subject, _GrantRow)
                self._activate(subject, now)
            else:
                assert isinstance(subject, _GrantRow)
                gone = subject.remaining - self._pinned(subject.grant_id, now)
                subject.expired = True
                if gone > 0:
                    subject.remaining -= gone
                    self._append(
                        user_id,
                        TransactionKind.EXPIRE,
                        -gone,
                        "",
                        ("expire",),
                        now,
                        description="expired credits",
                        metadata={"grant_id": str(subject.grant_id)},
                        allocations=[(subject.grant_id, gone)],
                        check=False,
                    )
        self._check(user_id, now)

    def _free(
        self,
        user_id: uuid.UUID,
        pins: Sequence[tuple[uuid.UUID, int]],
        now: datetime,
        hold_id: uuid.UUID,
    ) -> None:
        """Pins of hold `hold_id` let go of: those of voided grants leave the balance at once
        (a VOID entry naming the hold)."""
        gone = [(g, n) for g, n in pins if n > 0 and self._voided(g)]
        for grant_id, n in gone:
            self._grants[grant_id].remaining -= n
        if gone:
            total = sum(n for _, n in gone)
            self._append(
                user_id,
                TransactionKind.VOID,
                -total,
                "",
                ("void",),
                now,
                description="voided credits the hold had set aside",
                metadata={"hold_id": str(hold_id)},
                allocations=gone,
            )

    def _voided(self, grant_id: uuid.UUID) -> bool:
        return self._grants[grant_id].voided_at is not None

    def _pinned(self, grant_id: uuid.UUID, now: datetime) -> int:
        """What pending holds not past their expiry pin of the grant."""
        return sum(
            row.pins.get(grant_id, 0)
            for row in self._holds.values()
            if self._view(row, now).state == HoldState.PENDING
        )

    def _view_grant(self, g: _GrantRow, now: datetime) -> Grant:
        """grant_json: the grant's state and remaining credits judged by time."""
        due = g.activated or g.effective <= now
        past = g.expired or (g.expires is not None and g.expires <= now)
        if g.voided_at is not None:
            state = GrantState.VOIDED
            remaining = min(g.remaining, self._pinned(g.grant_id, now)) if due and not past else 0
        elif not due:
            state, remaining = GrantState.PENDING, g.amount
        elif past:
            state, remaining = GrantState.EXPIRED, 0
        else:
            remaining = g.remaining
            state = GrantState.ACTIVE if remaining else GrantState.DEPLETED
        return Grant(
            grant_id=g.grant_id,
            user_id=g.user_id,
            amount=g.amount,
            remaining=remaining,
            category=g.category,
            priority=g.priority,
            scopes=g.scopes,
            effective_time=g.effective,
            expire_time=g.expires,
            state=state,
            transaction_id=g.transaction_id,
            create_time=g.create_time,
            seq=g.seq,
        )

    def _eligible(
        self, user_id: uuid.UUID, scope: str, now: datetime, until: datetime | None = None
    ) -> list[tuple[uuid.UUID, int]]:
        """(grant, free credits) of the grants that pay for spending with `scope`, in the
        burn-down order; with `until`, only those that last that long (a hold's expiry)."""
        found: list[tuple[tuple[object, ...], uuid.UUID, int]] = []
        for g in self._grants_of(user_id):
            view = self._view_grant(g, now)
            if view.state != GrantState.ACTIVE:
                continue
            if g.scopes and scope not in g.scopes:
                continue
            if until is not None and g.expires is not None and g.expires < until:
                continue
            free = view.remaining - self._pinned(g.grant_id, now)
            if free > 0:
                order = (
                    g.priority,
                    0 if g.scopes else 1,
                    g.expires is None,
                    g.expires or now,
                    g.create_time,
                    g.seq,
                )
                found.append((order, g.grant_id, free))
        found.sort(key=lambda entry: entry[0])
        return [(grant_id, free) for _, grant_id, free in found]

    def _view(self, row: _HoldRow, now: datetime) -> Hold:
        """hold_json: a pending hold past its expiry is reported expired."""
        if row.hold.state == HoldState.PENDING and row.hold.expire_time <= now:
            return dataclasses.replace(row.hold, state=HoldState.EXPIRED)
        return row.hold

    def _held(self, user_id: uuid.UUID, now: datetime) -> int:
        return sum(
            row.hold.amount
            for row in self._holds.values()
            if row.hold.user_id == user_id and self._view(row, now).state == HoldState.PENDING
        )

    def _available(self, user_id: uuid.UUID, now: datetime) -> int:
        return self._accounts[user_id].balance - self._held(user_id, now)

    def _check(self, user_id: uuid.UUID, now: datetime) -> None:
        """The database's invariants: balance >= 0, 0 <= held <= balance, balance = the
        remaining of the activated, unexpired grants, every grant 0 <= remaining <= amount,
        and every pending hold's pins add up to it."""
        balance, held = self._accounts[user_id].balance, self._held(user_id, now)
        counted = sum(
            g.remaining for g in self._grants_of(user_id) if g.activated and not g.expired
        )
        if not 0 <= held <= balance or balance != counted:
            raise AssertionError(
                f"invariant violated: balance {balance}, held {held}, grants {counted}"
            )
        if any(not 0 <= g.remaining <= g.amount for g in self._grants_of(user_id)):
            raise AssertionError("invariant violated: a grant's remaining outside 0..amount")
        for row in self._holds.values():
            pending = row.hold.state == HoldState.PENDING
            if (
                row.hold.user_id == user_id
                and pending
                and sum(row.pins.values()) != row.hold.amount
            ):
                raise AssertionError("invariant violated: a hold's pins differ from its amount")

    def _balance_after(self, entry: Transaction) -> int:
        """balance_after: the balance after `entry` and its companion entry, if it has one."""
        follows = {"refund_transaction_id": str(entry.transaction_id)}
        if entry.kind == TransactionKind.CAPTURE:
            follows = {"hold_id": str(entry.hold_id)}
        companions = [
            t
            for t in self._ledger
            if t.user_id == entry.user_id
            and t.seq > entry.seq
            and t.kind in (TransactionKind.EXPIRE, TransactionKind.VOID)
            and not t.idempotency_key
            and dict(t.metadata) == follows
        ]
        return companions[-1].balance_after if companions else entry.balance_after

    def _used_keys(self, user_id: uuid.UUID) -> set[str]:
        """Every key the user's operations took: ledger entries, holds, grants and voids."""
        keys = {t.idempotency_key for t in self._ledger if t.user_id == user_id}
        keys |= {r.hold.idempotency_key for r in self._holds.values() if r.hold.user_id == user_id}
        for g in self._grants_of(user_id):
            keys |= {g.key} | ({g.void_key} if g.void_key else set())
        return keys - {""}

    def _refuse_used_key(self, user_id: uuid.UUID, key: str) -> None:
        if key in self._used_keys(user_id):
            raise IdempotencyKeyReused()

    def _replay(self, user_id: uuid.UUID, key: str, fingerprint: Fingerprint) -> Transaction | None:
        """The earlier entry made with `key`; the key used otherwise is IdempotencyKeyReused."""
        earlier = next(
            (t for t in self._ledger if t.user_id == user_id and t.idempotency_key == key), None
        )
        if earlier is not None:
            if self._fingerprints[earlier.transaction_id] != fingerprint:
                raise IdempotencyKeyReused()
            return earlier
        self._refuse_used_key(user_id, key)
        return None

    def _append(
        self,
        user_id: uuid.UUID,
        kind: TransactionKind,
        delta: int,
        key: str,
        fingerprint: Fingerprint,
        now: datetime,
        *,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        refunded: uuid.UUID | None = None,
        hold_id: uuid.UUID | None = None,
        allocations: Sequence[tuple[uuid.UUID, int]] = (),
        check: bool = True,
    ) -> LedgerResult:
        """A ledger entry moving the balance by `delta` (the grants were moved by the caller;
        `check` False while a settlement is halfway)."""
        account = self._accounts[user_id]
        account.balance += delta
        account.update_time = now
        if check:
            self._check(user_id, now)
        entry = Transaction(
            transaction_id=uuid.uuid4(),
            user_id=user_id,
            kind=kind,
            amount=abs(delta),
            balance_after=account.balance,
            idempotency_key=key,
            description=description,
            metadata=dict(metadata or {}),
            create_time=now,
            refunded_transaction_id=refunded,
            hold_id=hold_id,
            seq=next(self._seq),
            allocations=tuple(Allocation(g, n) for g, n in allocations),
        )
        self._ledger.append(entry)
        self._fingerprints[entry.transaction_id] = fingerprint
        return LedgerResult(entry, account.balance, replayed=False)


# The states whose remaining credits count in the balance (a voided grant's: what holds pin).
_COUNTED = (GrantState.ACTIVE, GrantState.VOIDED)


def _draw(sources: Sequence[tuple[uuid.UUID, int]], amount: int) -> list[tuple[uuid.UUID, int]]:
    """`amount` taken from `sources` (grant, credits) in their order: what each gives."""
    parts: list[tuple[uuid.UUID, int]] = []
    left = amount
    for grant_id, free in sources:
        if left == 0:
            break
        take = min(free, left)
        if take > 0:
            parts.append((grant_id, take))
            left -= take
    return parts


@dataclass(frozen=True, slots=True)
class RecordedFailure:
    """One JobQueue.fail call, as the worker made it."""

    generation_id: uuid.UUID
    worker: str
    error: str
    retryable: bool
    retry_delay_seconds: int


@dataclass(slots=True)
class _Job:
    generation: Generation  # with its output; readers other than get strip it
    fingerprint: Fingerprint
    request_id: str
    max_attempts: int
    next_attempt: datetime
    lease_owner: str | None = None
    lease_expires: datetime | None = None


class FakeGenerationStore:
    """A fake GenerationStore + JobQueue: in memory, keeping the documented behaviour of the
    SQL functions (credit_*_generation in server/db/migrations).

    `models` is the database's active catalogue (what credit_sync_models left active). A
    request_id is judged before the model: a replay returns its generation whatever the
    catalogue says now. Another user's generation is GenerationNotFound like an unknown one.
    Every state change is published on `feed` when one is given (the NOTIFY trigger's job).
    """

    def __init__(
        self,
        models: Mapping[str, ModelSpec],
        *,
        feed: ChangeFeed | None = None,
        clock: FakeClock | None = None,
    ) -> None:
        self.models = dict(models)
        self.feed = feed
        self.clock = clock or FakeClock()
        self.calls: list[str] = []
        self.failures: list[RecordedFailure] = []
        self._jobs: dict[uuid.UUID, _Job] = {}
        self._seq = itertools.count(1)

    # GenerationStore

    async def create(
        self,
        principal: Principal,
        user_id: uuid.UUID,
        *,
        model: str,
        prompt: str,
        parameters: Mapping[str, str],
        request_id: str,
    ) -> Generation:
        self.calls.append("create")
        fingerprint = ("generation", model, prompt, tuple(sorted(parameters.items())))
        earlier = next(
            (
                job
                for job in self._jobs.values()
                if job.generation.user_id == user_id and job.request_id == request_id
            ),
            None,
        )
        if earlier is not None:
            if earlier.fingerprint != fingerprint:
                raise IdempotencyKeyReused()
            return _listed(earlier.generation)
        spec = self.models.get(model)
        if spec is None:
            raise InvalidArgument.one("model", "is not in the catalogue")
        now = self.clock.now()
        generation = Generation(
            generation_id=uuid.uuid4(),
            user_id=user_id,
            model=model,
            prompt=prompt,
            parameters=dict(parameters),
            state=GenerationState.QUEUED,
            cost=spec.cost,
            hold_id=uuid.uuid4(),
            transaction_id=None,
            output=b"",
            output_mime_type="",
            error_message="",
            attempts=0,
            create_time=now,
            update_time=now,
            seq=next(self._seq),
        )
        self._jobs[generation.generation_id] = _Job(
            generation, fingerprint, request_id, spec.max_attempts, next_attempt=now
        )
        self._announce(generation)
        return generation

    async def get(
        self, principal: Principal, generation_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Generation:
        self.calls.append("get")
        return self._find(generation_id, owner).generation

    async def list(
        self, principal: Principal, user_id: uuid.UUID, limit: int, before_seq: int | None
    ) -> Sequence[Generation]:
        self.calls.append("list")
        rows = sorted(
            (
                job.generation
                for job in self._jobs.values()
                if job.generation.user_id == user_id
                and (before_seq is None or job.generation.seq < before_seq)
            ),
            key=lambda g: g.seq,
            reverse=True,
        )
        return [_listed(g) for g in rows[:limit]]

    async def cancel(
        self, principal: Principal, generation_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Generation:
        self.calls.append("cancel")
        job = self._find(generation_id, owner)
        if job.generation.state.final:
            raise GenerationNotCancellable()
        self._end(job, GenerationState.CANCELLED, job.generation.error_message)
        return _listed(job.generation)

    # JobQueue

    async def claim(self, worker: str, lease_seconds: int) -> ClaimedJob | None:
        self.calls.append("claim")
        now = self.clock.now()
        runnable = sorted(
            (
                job
                for job in self._jobs.values()
                if (job.generation.state == GenerationState.QUEUED and job.next_attempt <= now)
                or (
                    job.generation.state == GenerationState.RUNNING
                    and job.lease_expires is not None
                    and job.lease_expires < now
                )
            ),
            key=lambda job: job.next_attempt,
        )
        for job in runnable:
            if job.generation.attempts >= job.max_attempts:
                self._end(
                    job, GenerationState.FAILED, "no attempts left (the last worker was lost)"
                )
                continue
            job.lease_owner = worker
            job.lease_expires = now + timedelta(seconds=lease_seconds)
            self._record(
                job,
                dataclasses.replace(
                    job.generation,
                    state=GenerationState.RUNNING,
                    attempts=job.generation.attempts + 1,
                    update_time=now,
                ),
            )
            g = job.generation
            return ClaimedJob(g.generation_id, g.model, g.prompt, dict(g.parameters), g.attempts)
        return None

    async def renew_lease(self, generation_id: uuid.UUID, worker: str, lease_seconds: int) -> bool:
        self.calls.append("renew_lease")
        job = self._jobs.get(generation_id)
        if job is None or not self._leased(job, worker):
            return False
        job.lease_expires = self.clock.now() + timedelta(seconds=lease_seconds)
        return True

    async def complete(
        self, generation_id: uuid.UUID, worker: str, output: bytes, mime_type: str
    ) -> bool:
        self.calls.append("complete")
        job = self._find(generation_id, None)
        if not self._leased(job, worker):
            return False  # cancelled or taken over: the result is discarded, uncharged
        job.lease_owner = job.lease_expires = None
        succeeded = dataclasses.replace(
            job.generation,
            state=GenerationState.SUCCEEDED,
            output=output,
            output_mime_type=mime_type,
            error_message="",
            transaction_id=uuid.uuid4(),  # the capture of its hold
            update_time=self.clock.now(),
        )
        self._record(job, succeeded)
        return True

    async def fail(
        self,
        generation_id: uuid.UUID,
        worker: str,
        error: str,
        *,
        retryable: bool,
        retry_delay_seconds: int,
    ) -> Generation:
        self.calls.append("fail")
        self.failures.append(
            RecordedFailure(generation_id, worker, error, retryable, retry_delay_seconds)
        )
        job = self._find(generation_id, None)
        if not self._leased(job, worker):
            return _listed(job.generation)
        if retryable and job.generation.attempts < job.max_attempts:
            now = self.clock.now()
            job.lease_owner = job.lease_expires = None
            job.next_attempt = now + timedelta(seconds=retry_delay_seconds)
            queued = dataclasses.replace(
                job.generation, state=GenerationState.QUEUED, error_message=error, update_time=now
            )
            self._record(job, queued)
        else:
            self._end(job, GenerationState.FAILED, error)
        return _listed(job.generation)

    async def queue_stats(self) -> QueueStats:
        self.calls.append("queue_stats")
        now = self.clock.now()
        queued = [j for j in self._jobs.values() if j.generation.state == GenerationState.QUEUED]
        running = [j for j in self._jobs.values() if j.generation.state == GenerationState.RUNNING]
        oldest = min((j.generation.create_time for j in queued), default=now)
        return QueueStats(len(queued), len(running), (now - oldest).total_seconds())

    # Helpers

    def _find(self, generation_id: uuid.UUID, owner: uuid.UUID | None) -> _Job:
        job = self._jobs.get(generation_id)
        if job is None or (owner is not None and job.generation.user_id != owner):
            raise GenerationNotFound()
        return job

    @staticmethod
    def _leased(job: _Job, worker: str) -> bool:
        return job.generation.state == GenerationState.RUNNING and job.lease_owner == worker

    def _end(self, job: _Job, state: GenerationState, error: str) -> None:
        """end_uncharged: failed or cancelled, the lease cleared (its hold released)."""
        job.lease_owner = job.lease_expires = None
        ended = dataclasses.replace(
            job.generation, state=state, error_message=error, update_time=self.clock.now()
        )
        self._record(job, ended)

    def _record(self, job: _Job, generation: Generation) -> None:
        """Writes a state change, announced on the feed (the NOTIFY trigger)."""
        job.generation = generation
        self._announce(generation)

    def _announce(self, generation: Generation) -> None:
        if self.feed is not None:
            self.feed.publish(
                StateChange(
                    generation_id=generation.generation_id,
                    state=generation.state,
                    attempts=generation.attempts,
                    error_message=generation.error_message,
                    transaction_id=generation.transaction_id,
                    output_mime_type=generation.output_mime_type,
                    update_time=generation.update_time,
                )
            )


def _listed(generation: Generation) -> Generation:
    """A generation as every reader but get returns it: without its output."""
    return dataclasses.replace(generation, output=b"")
