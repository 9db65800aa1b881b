"""Typed errors of the credits service, in the style of google-api-core's exceptions module.

Every failed call raises a :class:`CreditsError`. Which subclass is decided by one registry that
maps the status code and the ``google.rpc.ErrorInfo`` reason (domain ``credits.v1``) the service
sends to a class; a reason the registry does not know falls back to the class of its code, so
``except NotFound`` also catches a not-found reason added to the service later::

    try:
        client.debit_credits(user_id=user_id, amount=10)
    except InsufficientCredits as error:
        print(f"needs {error.required}, has {error.available}")
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "credits.v1"
"""The ErrorInfo domain of the credits service's reasons."""

_STATUS_DETAILS_KEY = "grpc-status-details-bin"

_BY_REASON: dict[tuple[grpc.StatusCode, str], type[CreditsError]] = {}
_BY_CODE: dict[grpc.StatusCode, type[CreditsError]] = {}


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One malformed argument of a request (from ``google.rpc.BadRequest``)."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    """One unmet precondition (from ``google.rpc.PreconditionFailure``)."""

    type: str
    subject: str
    description: str


class CreditsError(Exception):
    """A call to the credits service failed.

    Attributes:
        code: the gRPC status code.
        reason: the ``ErrorInfo`` reason (``""`` when the service sent none, e.g. a deadline).
        domain: the ``ErrorInfo`` domain (``credits.v1`` for the service's own reasons).
        message: the status message, meant for people; match on the class or ``reason``.
        metadata: the ``ErrorInfo`` metadata (dynamic values such as ``required``).
        field_violations: the ``BadRequest`` field violations of an invalid request.
        precondition_violations: the ``PreconditionFailure`` violations.
        retry_delay: how long the service asks callers to wait before retrying (``RetryInfo``).
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    """The status code this class stands for (the registry's fallback key)."""
    reasons: ClassVar[tuple[str, ...]] = ()
    """The ErrorInfo reasons this class stands for (the registry's keys with `code`)."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        precondition_violations: Iterable[PreconditionViolation] = (),
        retry_delay: datetime.timedelta | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            # An instance may carry a code other than its class's (a fallback class, say).
            self.code = code  # type: ignore[misc]
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[FieldViolation] = list(field_violations)
        self.precondition_violations: list[PreconditionViolation] = list(precondition_violations)
        self.retry_delay = retry_delay

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register the subclass under its code (first class wins) and each of its reasons."""
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            _BY_CODE.setdefault(cls.code, cls)
        for reason in cls.__dict__.get("reasons", ()):
            _BY_REASON[(cls.code, reason)] = cls

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r})"


# One class per status code (the fallback of reasons the registry does not know).


class Cancelled(CreditsError):
    """The call was cancelled (usually by the caller)."""

    code = grpc.StatusCode.CANCELLED


class Unknown(CreditsError):
    """An error with no better code."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(CreditsError):
    """A malformed argument; see ``field_violations``."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reasons = ("INVALID_ARGUMENT",)


class DeadlineExceeded(CreditsError):
    """The call's deadline passed before it finished. A mutation may or may not have happened:
    retry it with the same idempotency key."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(CreditsError):
    """Something named in the request does not exist (or belongs to someone else)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CreditsError):
    """Something the request would create already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(CreditsError):
    """The caller may not do this (another user's account, or a service-only RPC)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reasons = ("PERMISSION_DENIED",)


class ResourceExhausted(CreditsError):
    """A quota or limit was reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(CreditsError):
    """The system is not in a state the call needs."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(CreditsError):
    """The call was aborted, typically by a concurrency conflict."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(CreditsError):
    """An argument is past the valid range."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(CreditsError):
    """The server does not implement this RPC."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(CreditsError):
    """The service failed unexpectedly."""

    code = grpc.StatusCode.INTERNAL
    reasons = ("INTERNAL",)


class Unavailable(CreditsError):
    """The service could not be reached; the client already retried it."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(CreditsError):
    """Unrecoverable data loss or corruption."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(CreditsError):
    """The call carried no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


# The service's reasons (the contract's error table).


class TokenMissing(Unauthenticated):
    """No bearer token, or a malformed ``authorization`` header."""

    reasons = ("TOKEN_MISSING",)


class TokenInvalid(Unauthenticated):
    """A bad signature, wrong audience or issuer, disallowed algorithm or the anon role."""

    reasons = ("TOKEN_INVALID",)


class TokenExpired(Unauthenticated):
    """The token has expired: refresh the session and call again."""

    reasons = ("TOKEN_EXPIRED",)


class AccessDeniedByPolicy(PermissionDenied):
    """The database refused the caller (row-level security)."""

    reasons = ("ACCESS_DENIED_BY_POLICY",)


class ProfileNotFound(NotFound):
    """A service named a user that has no profile."""

    reasons = ("PROFILE_NOT_FOUND",)


class TransactionNotFound(NotFound):
    """No such transaction (or it belongs to someone else)."""

    reasons = ("TRANSACTION_NOT_FOUND",)


class HoldNotFound(NotFound):
    """No such hold (or it belongs to someone else)."""

    reasons = ("HOLD_NOT_FOUND",)


class GenerationNotFound(NotFound):
    """No such generation (or it belongs to someone else)."""

    reasons = ("GENERATION_NOT_FOUND",)


class GrantNotFound(NotFound):
    """No such grant."""

    reasons = ("GRANT_NOT_FOUND",)


class InsufficientCredits(FailedPrecondition):
    """The user has fewer available credits than the call needs (for its ``scope``)."""

    reasons = ("INSUFFICIENT_CREDITS",)

    @property
    def scope(self) -> str:
        """The spending scope the credits were judged for (``""``: unscoped spending, which
        only unscoped grants pay for; the service sends ``scope`` only when there is one)."""
        return self.metadata.get("scope", "")

    @property
    def required(self) -> int | None:
        """The credits the call needed."""
        return _int_or_none(self.metadata.get("required"))

    @property
    def available(self) -> int | None:
        """The credits the user had available."""
        return _int_or_none(self.metadata.get("available"))


class HoldNotPending(FailedPrecondition):
    """The hold was already captured, released or expired, or it belongs to a generation
    (which alone captures or releases it)."""

    reasons = ("HOLD_NOT_PENDING",)

    @property
    def state(self) -> str | None:
        """The hold's state now: captured, released, expired (or pending, for a generation's)."""
        return self.metadata.get("state")

    @property
    def generation_id(self) -> str | None:
        """The generation the hold belongs to, if it is a generation's."""
        return self.metadata.get("generation_id")


class GrantNotActive(FailedPrecondition):
    """VoidGrant of a grant that is already expired, depleted or voided."""

    reasons = ("GRANT_NOT_ACTIVE",)

    @property
    def state(self) -> str | None:
        """The grant's state now: expired, depleted or voided."""
        return self.metadata.get("state")


class RefundExceedsDebit(FailedPrecondition):
    """The refund is larger than what is left of the debit."""

    reasons = ("REFUND_EXCEEDS_DEBIT",)


class GenerationNotCancellable(FailedPrecondition):
    """The generation is already in a final state."""

    reasons = ("GENERATION_NOT_CANCELLABLE",)


class BalanceLimitExceeded(FailedPrecondition):
    """A grant or refund would raise the balance past the largest the service can hold
    (2^63 - 1 credits)."""

    reasons = ("BALANCE_LIMIT_EXCEEDED",)


class SpendLimitExceeded(FailedPrecondition):
    """The spending would take the user past their limit for a period; nothing was spent."""

    reasons = ("SPEND_LIMIT_EXCEEDED",)

    @property
    def period(self) -> str | None:
        """The period whose limit it would pass: day, week or month (UTC)."""
        return self.metadata.get("period")

    @property
    def limit(self) -> int | None:
        return _int_or_none(self.metadata.get("limit"))

    @property
    def spent(self) -> int | None:
        """What the user spent in the current period before this call."""
        return _int_or_none(self.metadata.get("spent"))

    @property
    def reset_time(self) -> datetime.datetime | None:
        """When the period ends and spending starts again from 0."""
        text = self.metadata.get("reset_time")
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


class TooManyActiveGenerations(ResourceExhausted):
    """The user has CREDITS_MAX_ACTIVE_GENERATIONS generations queued or running; retry after
    ``retry_delay`` (or once one of them ends)."""

    reasons = ("TOO_MANY_ACTIVE_GENERATIONS",)


class IdempotencyKeyReused(AlreadyExists):
    """The idempotency key (or request_id) was used before with different parameters."""

    reasons = ("IDEMPOTENCY_KEY_REUSED",)


class BackendUnavailable(Unavailable):
    """The service's database was unreachable or timed out; see ``retry_delay``."""

    reasons = ("BACKEND_UNAVAILABLE",)


class ServerStopping(Unavailable):
    """The server is shutting down and ended the call (an open watch); call again, after
    ``retry_delay``, to reach a running server."""

    reasons = ("SERVER_STOPPING",)


class ServiceCredentialsRejected(InternalError):
    """The database rejected the service's own credentials (an operator must fix them)."""

    reasons = ("SERVICE_CREDENTIALS_REJECTED",)


# The registry.


def exception_class_for(code: grpc.StatusCode, reason: str = "") -> type[CreditsError]:
    """The class for a status code and ErrorInfo reason: the reason's class when the registry
    knows the pair, else the class of the code."""
    return _BY_REASON.get((code, reason)) or _BY_CODE.get(code, CreditsError)


def registered_reasons() -> dict[str, type[CreditsError]]:
    """Every ErrorInfo reason the registry knows, with its class."""
    return {reason: cls for (_, reason), cls in _BY_REASON.items()}


def from_call(error: grpc.RpcError) -> CreditsError:
    """The typed error of a failed call (a ``grpc.RpcError`` or ``grpc.aio.AioRpcError``),
    with the details of its ``grpc-status-details-bin`` trailer decoded."""
    code: grpc.StatusCode = _call_attr(error, "code") or grpc.StatusCode.UNKNOWN
    message: str = _call_attr(error, "details") or ""
    status = _status_of(_call_attr(error, "trailing_metadata"))
    return from_status(code, message, status)


def from_status(
    code: grpc.StatusCode, message: str, status: status_pb2.Status | None = None
) -> CreditsError:
    """The typed error of a status code and message plus an optional ``google.rpc.Status``."""
    info = error_details_pb2.ErrorInfo()
    violations: list[FieldViolation] = []
    preconditions: list[PreconditionViolation] = []
    retry_delay: datetime.timedelta | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            preconditions += [
                PreconditionViolation(v.type, v.subject, v.description) for v in failure.violations
            ]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta()
    ours = info.domain in ("", DOMAIN)
    cls = exception_class_for(code, info.reason if ours else "")
    return cls(
        message,
        code=code,
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        field_violations=violations,
        precondition_violations=preconditions,
        retry_delay=retry_delay,
    )


def _call_attr(error: grpc.RpcError, name: str) -> Any:
    """`error.<name>()` when the error is also a call (it is, for errors of RPCs), else None."""
    method = getattr(error, name, None)
    if not callable(method):
        return None
    try:
        return method()
    except Exception:  # a half-built call object; fall back to the defaults
        return None


def _status_of(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> Any:
    """The ``google.rpc.Status`` in the trailing metadata, or None (absent or unreadable)."""
    for key, value in trailing_metadata or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a corrupt trailer must not hide the error itself
                return None
            return status
    return None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
