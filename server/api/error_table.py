"""The one table that maps domain errors to gRPC status codes and rich error details.

Every error leaves as a `google.rpc.Status` in `grpc-status-details-bin` with one ErrorInfo
(domain `credits.v1`) plus the detail its kind needs: BadRequest, PreconditionFailure, RetryInfo.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server import errors

DOMAIN = "credits.v1"

STATUS_CODES: dict[type[errors.CreditsError], grpc.StatusCode] = {
    errors.TokenMissing: grpc.StatusCode.UNAUTHENTICATED,
    errors.TokenInvalid: grpc.StatusCode.UNAUTHENTICATED,
    errors.TokenExpired: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.AccessDeniedByPolicy: grpc.StatusCode.PERMISSION_DENIED,
    errors.ProfileNotFound: grpc.StatusCode.NOT_FOUND,
    errors.TransactionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.HoldNotFound: grpc.StatusCode.NOT_FOUND,
    errors.GenerationNotFound: grpc.StatusCode.NOT_FOUND,
    errors.GrantNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InsufficientCredits: grpc.StatusCode.FAILED_PRECONDITION,
    errors.HoldNotPending: grpc.StatusCode.FAILED_PRECONDITION,
    errors.GrantNotActive: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RefundExceedsDebit: grpc.StatusCode.FAILED_PRECONDITION,
    errors.GenerationNotCancellable: grpc.StatusCode.FAILED_PRECONDITION,
    errors.BalanceLimitExceeded: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SpendLimitExceeded: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TooManyActiveGenerations: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.IdempotencyKeyReused: grpc.StatusCode.ALREADY_EXISTS,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ServerStopping: grpc.StatusCode.UNAVAILABLE,
    errors.ServiceCredentialsRejected: grpc.StatusCode.INTERNAL,
    errors.CreditsError: grpc.StatusCode.INTERNAL,
}


def code_of(error: errors.CreditsError) -> grpc.StatusCode:
    """The status code of `error`, found through its class hierarchy."""
    for cls in type(error).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _extra_details(error: errors.CreditsError) -> list[any_pb2.Any]:
    if isinstance(error, errors.InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation
        bad = error_details_pb2.BadRequest(
            field_violations=[
                violation(field=v.field, description=v.description) for v in error.violations
            ]
        )
        return [_pack(bad)]
    if isinstance(error, errors.InsufficientCredits):
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=error.reason,
                    subject="available",
                    description=f"{error.required} credits required, {error.available} available"
                    + (f" for scope {error.scope!r}" if error.scope else ""),
                )
            ]
        )
        return [_pack(failure)]
    if isinstance(
        error, errors.BackendUnavailable | errors.ServerStopping | errors.TooManyActiveGenerations
    ):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(round(error.retry_after * 1000))
        return [_pack(error_details_pb2.RetryInfo(retry_delay=delay))]
    return []


def to_status(error: errors.CreditsError) -> grpc.Status:
    """The gRPC status (code, message and rich details) that reports `error` to the caller."""
    code = code_of(error)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    status = status_pb2.Status(
        code=code.value[0],
        message=error.message,
        details=[_pack(info), *_extra_details(error)],
    )
    return rpc_status.to_status(status)
