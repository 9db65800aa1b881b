"""Client for the credits gRPC service: credit balances and paid AI generations.

>>> from credits_client import CreditsClient, InsufficientCredits
>>> with CreditsClient("localhost:50051", credentials=token) as client:  # doctest: +SKIP
...     client.debit_credits(user_id=user_id, amount=10)

See :mod:`credits_client.errors` for the exceptions and :mod:`credits_client.types` for the
messages the methods return.
"""

from credits_client._config import DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT, TLS, service_config
from credits_client.aio import AsyncCreditsClient
from credits_client.client import CreditsClient
from credits_client.credentials import BearerToken, Credentials, ServiceKey, TokenProvider
from credits_client.errors import (
    AccessDeniedByPolicy,
    AlreadyExists,
    BackendUnavailable,
    BalanceLimitExceeded,
    CreditsError,
    DeadlineExceeded,
    FailedPrecondition,
    GenerationNotCancellable,
    GenerationNotFound,
    GrantNotActive,
    GrantNotFound,
    HoldNotFound,
    HoldNotPending,
    IdempotencyKeyReused,
    InsufficientCredits,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProfileNotFound,
    RefundExceedsDebit,
    ServerStopping,
    ServiceCredentialsRejected,
    SpendLimitExceeded,
    TokenExpired,
    TokenInvalid,
    TokenMissing,
    TooManyActiveGenerations,
    TransactionNotFound,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT",
    "TLS",
    "AccessDeniedByPolicy",
    "AlreadyExists",
    "AsyncCreditsClient",
    "BackendUnavailable",
    "BalanceLimitExceeded",
    "BearerToken",
    "Credentials",
    "CreditsClient",
    "CreditsError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GenerationNotCancellable",
    "GenerationNotFound",
    "GrantNotActive",
    "GrantNotFound",
    "HoldNotFound",
    "HoldNotPending",
    "IdempotencyKeyReused",
    "InsufficientCredits",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ProfileNotFound",
    "RefundExceedsDebit",
    "ServerStopping",
    "ServiceCredentialsRejected",
    "ServiceKey",
    "SpendLimitExceeded",
    "TokenExpired",
    "TokenInvalid",
    "TokenMissing",
    "TokenProvider",
    "TooManyActiveGenerations",
    "TransactionNotFound",
    "Unauthenticated",
    "Unavailable",
    "service_config",
]
