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
    Capture,
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
)
from server.errors import (
    GenerationNotCancellable,
    GenerationNotFound,
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
    balance: int
    create_time: datetime
    update_time: datetime


@dataclass(slots=True)
class _HoldRow:
    hold: Hold  # its state as recorded: a pending one may be overdue (reported expired)
    fingerprint: Fingerprint
    available_after: int


class FakeCreditStore:
    """A fake CreditStore + HoldExpiry + ProfileStore: in memory, keeping the documented
    behaviour of the SQL functions (credit_* in server/db/migrations).

    balance >= 0, held <= balance and available = balance - held; held counts the pending holds
    not yet past their expiry (a pending hold past it is reported expired, counts nowhere and
    cannot be captured, whether or not it was swept). `known_users` stands for auth.users:
    provision_known makes a profile for those only. Idempotency per (user, key): a replay
    returns the original result with replayed=True, the key with other parameters (or a
    reservation's key for a ledger entry, and the other way round) is IdempotencyKeyReused.
    """

    def __init__(self, *, signup_credits: int = 0, clock: FakeClock | None = None) -> None:
        self.signup_credits = signup_credits
        self.clock = clock or FakeClock()
        # The identity provider's users (auth.users): user id -> email.
        self.known_users: dict[uuid.UUID, str] = {}
        # The store methods called, in order: shows what reached the store.
        self.calls: list[str] = []
        self._accounts: dict[uuid.UUID, _Account] = {}
        self._ledger: list[Transaction] = []
        self._fingerprints: dict[uuid.UUID, Fingerprint] = {}
        self._holds: dict[uuid.UUID, _HoldRow] = {}
        self._seq = itertools.count(1)

    # Test setup (not a port)

    def add_profile(self, user_id: uuid.UUID, *, balance: int = 0, email: str = "") -> None:
        """A profile as provisioning makes it, `balance` granted as its opening entry."""
        now = self.clock.now()
        self._accounts[user_id] = _Account(email, 0, now, now)
        if balance:
            self._append(user_id, TransactionKind.GRANT, balance, "", ("opening",), now)

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
        held = self._held(user_id, now)
        return Profile(
            user_id=user_id,
            email=account.email,
            balance=account.balance,
            held=held,
            available=account.balance - held,
            create_time=account.create_time,
            update_time=account.update_time,
        )

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

    async def debit(
        self, principal: Principal, user_id: uuid.UUID, movement: Movement
    ) -> LedgerResult:
        self.calls.append("debit")
        return self._move(TransactionKind.DEBIT, user_id, movement)

    async def grant(
        self, principal: Principal, user_id: uuid.UUID, movement: Movement
    ) -> LedgerResult:
        self.calls.append("grant")
        return self._move(TransactionKind.GRANT, user_id, movement)

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
            return LedgerResult(replayed, replayed.balance_after, replayed=True)
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
        remaining = original.amount - sum(
            t.amount for t in self._ledger if t.refunded_transaction_id == original.transaction_id
        )
        amount = refund.amount or remaining
        if amount > remaining or amount == 0:
            raise RefundExceedsDebit()
        return self._append(
            user_id,
            TransactionKind.REFUND,
            amount,
            refund.idempotency_key,
            fingerprint,
            now,
            description=refund.description,
            refunded=original.transaction_id,
        )

    async def reserve(
        self, principal: Principal, user_id: uuid.UUID, hold: HoldRequest
    ) -> Reservation:
        self.calls.append("reserve")
        fingerprint = ("reserve", hold.amount, hold.ttl_seconds, hold.description)
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
        if any(
            t.user_id == user_id and t.idempotency_key == hold.idempotency_key for t in self._ledger
        ):
            raise IdempotencyKeyReused()
        available = self._available(user_id, now)
        if available < hold.amount:
            raise InsufficientCredits(required=hold.amount, available=available)
        made = Hold(
            hold_id=uuid.uuid4(),
            user_id=user_id,
            amount=hold.amount,
            state=HoldState.PENDING,
            expire_time=now + timedelta(seconds=hold.ttl_seconds),
            create_time=now,
            idempotency_key=hold.idempotency_key,
            description=hold.description,
        )
        self._holds[made.hold_id] = _HoldRow(made, fingerprint, available - hold.amount)
        self._accounts[user_id].update_time = now
        self._check(user_id, now)
        return Reservation(made, available - hold.amount, replayed=False)

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
            return Capture(replayed, self._view(row, now), replayed.balance_after, replayed=True)
        if row.hold.state != HoldState.PENDING:
            raise HoldNotPending(state=row.hold.state.value)
        charged = amount or row.hold.amount
        if charged > row.hold.amount:
            raise InvalidArgument.one("amount", "must not exceed the hold")
        # The whole hold leaves `held`; only `charged` leaves the balance.
        row.hold = dataclasses.replace(row.hold, state=HoldState.CAPTURED)
        result = self._append(
            user_id,
            TransactionKind.CAPTURE,
            -charged,
            idempotency_key,
            fingerprint,
            now,
            description=row.hold.description,
            hold_id=hold_id,
        )
        return Capture(result.transaction, row.hold, result.balance, replayed=False)

    async def release(
        self, principal: Principal, hold_id: uuid.UUID, owner: uuid.UUID | None
    ) -> Release:
        self.calls.append("release")
        row, now = self._lock_hold(hold_id, owner)
        if row.hold.state != HoldState.PENDING:
            raise HoldNotPending(state=row.hold.state.value)
        row.hold = dataclasses.replace(row.hold, state=HoldState.RELEASED)
        self._accounts[row.hold.user_id].update_time = now
        return Release(row.hold, self._available(row.hold.user_id, now))

    # HoldExpiry

    async def expire_holds(self, users: int) -> int:
        self.calls.append("expire_holds")
        now = self.clock.now()
        overdue = list(
            dict.fromkeys(
                row.hold.user_id
                for row in self._holds.values()
                if row.hold.state == HoldState.PENDING and row.hold.expire_time <= now
            )
        )[:users]
        for user_id in overdue:
            self._expire(user_id, now)
        return len(overdue)

    # The SQL's private helpers

    def _create_profile(self, user_id: uuid.UUID, email: str) -> None:
        """create_profile: made once, with the signup credits as a grant."""
        if user_id in self._accounts:
            return
        now = self.clock.now()
        self._accounts[user_id] = _Account(email, 0, now, now)
        if self.signup_credits > 0:
            self._append(
                user_id,
                TransactionKind.GRANT,
                self.signup_credits,
                "",
                ("signup",),
                now,
                description="signup credits",
            )

    def _account(self, user_id: uuid.UUID) -> _Account:
        """The profile, or ProfileNotFound naming the user (as the repository reports it)."""
        account = self._accounts.get(user_id)
        if account is None:
            raise ProfileNotFound(user_id=user_id)
        return account

    def _lock(self, user_id: uuid.UUID) -> datetime:
        """lock_profile: ProfileNotFound when missing; expires the user's overdue holds."""
        self._account(user_id)
        now = self.clock.now()
        self._expire(user_id, now)
        return now

    def _lock_hold(self, hold_id: uuid.UUID, owner: uuid.UUID | None) -> tuple[_HoldRow, datetime]:
        """lock_hold: another user's hold is HoldNotFound exactly like an unknown one."""
        row = self._holds.get(hold_id)
        if row is None or (owner is not None and row.hold.user_id != owner):
            raise HoldNotFound()
        return row, self._lock(row.hold.user_id)

    def _expire(self, user_id: uuid.UUID, now: datetime) -> None:
        for row in self._holds.values():
            if (
                row.hold.user_id == user_id
                and row.hold.state == HoldState.PENDING
                and row.hold.expire_time <= now
            ):
                row.hold = dataclasses.replace(row.hold, state=HoldState.EXPIRED)

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
        """The table's constraints: balance >= 0 and 0 <= held <= balance."""
        balance, held = self._accounts[user_id].balance, self._held(user_id, now)
        if not 0 <= held <= balance:
            raise AssertionError(f"constraint violated: balance {balance}, held {held}")

    def _replay(self, user_id: uuid.UUID, key: str, fingerprint: Fingerprint) -> Transaction | None:
        """The earlier entry made with `key`; the key used otherwise is IdempotencyKeyReused."""
        earlier = next(
            (t for t in self._ledger if t.user_id == user_id and t.idempotency_key == key), None
        )
        if (
            earlier is not None and self._fingerprints[earlier.transaction_id] != fingerprint
        ) or any(
            row.hold.user_id == user_id and row.hold.idempotency_key == key
            for row in self._holds.values()
        ):
            raise IdempotencyKeyReused()
        return earlier

    def _move(self, kind: TransactionKind, user_id: uuid.UUID, movement: Movement) -> LedgerResult:
        fingerprint = (
            kind.value,
            movement.amount,
            movement.description,
            tuple(sorted(movement.metadata.items())),
        )
        now = self._lock(user_id)
        replayed = self._replay(user_id, movement.idempotency_key, fingerprint)
        if replayed is not None:
            return LedgerResult(replayed, replayed.balance_after, replayed=True)
        if kind == TransactionKind.DEBIT:
            available = self._available(user_id, now)
            if available < movement.amount:
                raise InsufficientCredits(required=movement.amount, available=available)
        delta = -movement.amount if kind == TransactionKind.DEBIT else movement.amount
        return self._append(
            user_id,
            kind,
            delta,
            movement.idempotency_key,
            fingerprint,
            now,
            description=movement.description,
            metadata=movement.metadata,
        )

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
    ) -> LedgerResult:
        account = self._accounts[user_id]
        account.balance += delta
        account.update_time = now
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
        )
        self._ledger.append(entry)
        self._fingerprints[entry.transaction_id] = fingerprint
        return LedgerResult(entry, account.balance, replayed=False)


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
