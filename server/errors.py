"""Domain errors: what went wrong, in the contract's words, with no knowledge of gRPC.

Each class names its contract `reason`; the edge (`server/api/error_table.py`) maps the class to a
status code. Dynamic values go into `metadata` (strings, as ErrorInfo carries them).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar


class CreditsError(Exception):
    """Base of every error the service reports to callers on purpose."""

    reason: ClassVar[str] = "INTERNAL"
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, **metadata: object) -> None:
        self.message = message or self.default_message
        self.metadata: dict[str, str] = {k: str(v) for k, v in metadata.items()}
        super().__init__(self.message)


class TokenMissing(CreditsError):
    reason = "TOKEN_MISSING"
    default_message = "missing or malformed authorization metadata; expected 'Bearer' and a token"


class TokenInvalid(CreditsError):
    reason = "TOKEN_INVALID"
    default_message = "the access token is not valid"


class TokenExpired(CreditsError):
    reason = "TOKEN_EXPIRED"
    default_message = "the access token has expired"


class PermissionDenied(CreditsError):
    reason = "PERMISSION_DENIED"
    default_message = "the caller may not do this"


class AccessDeniedByPolicy(CreditsError):
    reason = "ACCESS_DENIED_BY_POLICY"
    default_message = "the database refused the caller (row-level security)"


class ProfileNotFound(CreditsError):
    """No profile for the user a call was about (`user_id`, in the metadata, when known)."""

    reason = "PROFILE_NOT_FOUND"
    default_message = "no credit profile for this user"

    def __init__(self, message: str | None = None, *, user_id: uuid.UUID | None = None) -> None:
        super().__init__(message, **({"user_id": user_id} if user_id is not None else {}))
        self.user_id = user_id


class TransactionNotFound(CreditsError):
    reason = "TRANSACTION_NOT_FOUND"
    default_message = "transaction not found"


class HoldNotFound(CreditsError):
    reason = "HOLD_NOT_FOUND"
    default_message = "hold not found"


class GenerationNotFound(CreditsError):
    reason = "GENERATION_NOT_FOUND"
    default_message = "generation not found"


class GrantNotFound(CreditsError):
    reason = "GRANT_NOT_FOUND"
    default_message = "grant not found"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(CreditsError):
    reason = "INVALID_ARGUMENT"
    default_message = "invalid argument"

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        self.violations = tuple(violations)
        fields = ", ".join(v.field for v in self.violations)
        super().__init__(message or f"invalid argument: {fields}")

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)], f"{field}: {description}")


class InsufficientCredits(CreditsError):
    """Fewer credits available for the spending's `scope` ("" unscoped: only unscoped grants
    pay for it) than `required`. The metadata names the scope only when there is one, so an
    unscoped refusal carries exactly `required` and `available`, as before scopes existed."""

    reason = "INSUFFICIENT_CREDITS"

    def __init__(self, required: int, available: int, scope: str = "") -> None:
        self.required = required
        self.available = available
        self.scope = scope
        judged = f" for scope {scope!r}" if scope else ""
        super().__init__(
            f"insufficient credits{judged}: {required} required, {available} available",
            required=required,
            available=available,
            **({"scope": scope} if scope else {}),
        )


class HoldNotPending(CreditsError):
    """The hold is not (or no longer) the caller's to capture or release.

    `state` is the hold's state now (pending, captured, released or expired); `generation_id`
    names the generation that owns the hold, whose lifecycle alone settles it. Both go into the
    ErrorInfo metadata when known.
    """

    reason = "HOLD_NOT_PENDING"
    default_message = "the hold is no longer pending"

    def __init__(self, state: str = "", generation_id: str = "") -> None:
        if generation_id:
            message = (
                f"the hold belongs to generation {generation_id}: it is captured when the"
                " generation succeeds and released when it fails or is cancelled"
            )
        elif state == "expired":
            message = f"{self.default_message}: it expired"
        elif state:
            message = f"{self.default_message}: it was already {state}"
        else:
            message = self.default_message
        known = {"state": state, "generation_id": generation_id}
        super().__init__(message, **{key: value for key, value in known.items() if value})


class GrantNotActive(CreditsError):
    """VoidGrant of a grant already expired, depleted or voided (`state`, in the metadata)."""

    reason = "GRANT_NOT_ACTIVE"
    default_message = "the grant is no longer active"

    def __init__(self, state: str = "") -> None:
        message = f"{self.default_message}: it is {state}" if state else None
        super().__init__(message, **({"state": state} if state else {}))
        self.state = state


class RefundExceedsDebit(CreditsError):
    reason = "REFUND_EXCEEDS_DEBIT"
    default_message = "the refund is larger than what is left of the transaction"


class GenerationNotCancellable(CreditsError):
    reason = "GENERATION_NOT_CANCELLABLE"
    default_message = "the generation is already final"


class BalanceLimitExceeded(CreditsError):
    """A grant or refund would raise the balance past the largest one the ledger can hold
    (PostgreSQL's bigint, 2^63 - 1); the database refuses it before it overflows."""

    reason = "BALANCE_LIMIT_EXCEEDED"
    default_message = (
        "the balance would exceed the largest the service can hold (9223372036854775807 credits)"
    )


_PERIODLY = {"day": "daily", "week": "weekly", "month": "monthly"}


class SpendLimitExceeded(CreditsError):
    """The spending would take what the user spent in the current `period` (day, week or month,
    UTC) past their `limit`; `spent` is what they spent in it before, `reset_time` (RFC 3339,
    UTC) when it starts again from 0."""

    reason = "SPEND_LIMIT_EXCEEDED"

    def __init__(self, period: str, limit: int, spent: int, reset_time: str) -> None:
        periodly = _PERIODLY.get(period, period)
        super().__init__(
            f"spend limit exceeded: {spent} of the {periodly} limit of {limit} credits spent;"
            f" it resets at {reset_time}",
            period=period,
            limit=limit,
            spent=spent,
            reset_time=reset_time,
        )


class TooManyActiveGenerations(CreditsError):
    """The user has `limit` generations queued or running already (CREDITS_MAX_ACTIVE_
    GENERATIONS): retry once one of them ends."""

    reason = "TOO_MANY_ACTIVE_GENERATIONS"
    # How long the RetryInfo asks the caller to wait.
    retry_after: ClassVar[float] = 5.0

    def __init__(self, limit: int, active: int) -> None:
        super().__init__(
            f"too many active generations: {active} queued or running, at most {limit}",
            limit=limit,
            active=active,
        )


class IdempotencyKeyReused(CreditsError):
    reason = "IDEMPOTENCY_KEY_REUSED"
    default_message = "the idempotency key was already used with different parameters"


class BackendUnavailable(CreditsError):
    reason = "BACKEND_UNAVAILABLE"
    default_message = "the database is unavailable; retry later"

    def __init__(self, message: str | None = None, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ServerStopping(CreditsError):
    """The server is shutting down: a call it cannot finish first (an open watch) ends with
    this, so the caller reconnects (to another instance, or to this one once restarted)."""

    reason = "SERVER_STOPPING"
    default_message = "the server is stopping; call again to reach a running one"

    def __init__(self, message: str | None = None, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ServiceCredentialsRejected(CreditsError):
    reason = "SERVICE_CREDENTIALS_REJECTED"
    default_message = (
        "the database rejected the service credentials and there is no user context to fall back to"
    )
