"""The service's messages and enums, under public names (the generated modules are private)."""

from __future__ import annotations

from credits_client._proto.credit_service_pb2 import (
    CaptureCreditsResponse,
    CheckCreditsResponse,
    DebitCreditsResponse,
    GetBalanceResponse,
    GetProfileResponse,
    GrantCreditsResponse,
    ListTransactionsResponse,
    RefundCreditsResponse,
    ReleaseCreditsResponse,
    ReserveCreditsResponse,
)
from credits_client._proto.generation_pb2 import (
    GENERATION_STATE_CANCELLED,
    GENERATION_STATE_FAILED,
    GENERATION_STATE_QUEUED,
    GENERATION_STATE_RUNNING,
    GENERATION_STATE_SUCCEEDED,
    Generation,
    GenerationState,
    Model,
)
from credits_client._proto.generation_service_pb2 import (
    CancelGenerationResponse,
    CreateGenerationResponse,
    GetGenerationResponse,
    ListGenerationsResponse,
    ListModelsResponse,
    WatchGenerationResponse,
)
from credits_client._proto.ledger_pb2 import (
    HOLD_STATE_CAPTURED,
    HOLD_STATE_EXPIRED,
    HOLD_STATE_PENDING,
    HOLD_STATE_RELEASED,
    TRANSACTION_KIND_CAPTURE,
    TRANSACTION_KIND_DEBIT,
    TRANSACTION_KIND_GRANT,
    TRANSACTION_KIND_REFUND,
    Hold,
    HoldState,
    Profile,
    Transaction,
    TransactionKind,
)

FINAL_GENERATION_STATES = frozenset(
    {GENERATION_STATE_SUCCEEDED, GENERATION_STATE_FAILED, GENERATION_STATE_CANCELLED}
)
"""States a generation never leaves."""

__all__ = [
    "FINAL_GENERATION_STATES",
    "GENERATION_STATE_CANCELLED",
    "GENERATION_STATE_FAILED",
    "GENERATION_STATE_QUEUED",
    "GENERATION_STATE_RUNNING",
    "GENERATION_STATE_SUCCEEDED",
    "HOLD_STATE_CAPTURED",
    "HOLD_STATE_EXPIRED",
    "HOLD_STATE_PENDING",
    "HOLD_STATE_RELEASED",
    "TRANSACTION_KIND_CAPTURE",
    "TRANSACTION_KIND_DEBIT",
    "TRANSACTION_KIND_GRANT",
    "TRANSACTION_KIND_REFUND",
    "CancelGenerationResponse",
    "CaptureCreditsResponse",
    "CheckCreditsResponse",
    "CreateGenerationResponse",
    "DebitCreditsResponse",
    "Generation",
    "GenerationState",
    "GetBalanceResponse",
    "GetGenerationResponse",
    "GetProfileResponse",
    "GrantCreditsResponse",
    "Hold",
    "HoldState",
    "ListGenerationsResponse",
    "ListModelsResponse",
    "ListTransactionsResponse",
    "Model",
    "Profile",
    "RefundCreditsResponse",
    "ReleaseCreditsResponse",
    "ReserveCreditsResponse",
    "Transaction",
    "TransactionKind",
    "WatchGenerationResponse",
]
