"""The SQL functions of supabase/migrations, the only way the service reads or moves credits.

Both transports call these by name: PostgREST as `rpc(name, params)`, PostgreSQL directly with
named arguments. Names and parameters are constants here, never built from input.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SqlFunction:
    name: str
    params: tuple[str, ...]
    # The batched form, taking each parameter as an array (see *_credits_batched_calls.sql).
    each: str | None = None


CONFIGURE = SqlFunction("credit_configure", ("p_signup_credits",))
PROVISION_PROFILE = SqlFunction("credit_provision_profile", ("p_user_id", "p_email"))
GET_PROFILE = SqlFunction("credit_get_profile", ("p_user_id",), each="credit_get_profile_each")
LIST_TRANSACTIONS = SqlFunction(
    "credit_list_transactions",
    ("p_user_id", "p_limit", "p_before_seq", "p_kinds", "p_start", "p_end"),
)
DEBIT = SqlFunction(
    "credit_debit",
    ("p_user_id", "p_amount", "p_idempotency_key", "p_description", "p_metadata"),
    each="credit_debit_each",
)
GRANT = SqlFunction(
    "credit_grant",
    ("p_user_id", "p_amount", "p_idempotency_key", "p_description", "p_metadata"),
)
RESERVE = SqlFunction(
    "credit_reserve",
    ("p_user_id", "p_amount", "p_idempotency_key", "p_ttl_seconds", "p_description"),
)
CAPTURE = SqlFunction("credit_capture", ("p_hold_id", "p_owner", "p_amount", "p_idempotency_key"))
RELEASE = SqlFunction("credit_release", ("p_hold_id", "p_owner"))
REFUND = SqlFunction(
    "credit_refund",
    ("p_user_id", "p_transaction_id", "p_amount", "p_idempotency_key", "p_description"),
)
EXPIRE_HOLDS = SqlFunction("credit_expire_holds", ("p_users",))
SYNC_MODELS = SqlFunction("credit_sync_models", ("p_models",))
CREATE_GENERATION = SqlFunction(
    "credit_create_generation",
    ("p_user_id", "p_model", "p_prompt", "p_parameters", "p_request_id"),
)
GET_GENERATION = SqlFunction("credit_get_generation", ("p_generation_id", "p_owner"))
LIST_GENERATIONS = SqlFunction("credit_list_generations", ("p_user_id", "p_limit", "p_before_seq"))
CANCEL_GENERATION = SqlFunction("credit_cancel_generation", ("p_generation_id", "p_owner"))
CLAIM_GENERATION = SqlFunction("credit_claim_generation", ("p_worker", "p_lease_seconds"))
RENEW_GENERATION_LEASE = SqlFunction(
    "credit_renew_generation_lease", ("p_generation_id", "p_worker", "p_lease_seconds")
)
COMPLETE_GENERATION = SqlFunction(
    "credit_complete_generation",
    ("p_generation_id", "p_worker", "p_output", "p_output_mime_type"),
)
FAIL_GENERATION = SqlFunction(
    "credit_fail_generation",
    ("p_generation_id", "p_worker", "p_error", "p_retryable", "p_retry_delay_seconds"),
)
QUEUE_STATS = SqlFunction("credit_queue_stats", ())
SCHEMA_VERSION = SqlFunction("credit_schema_version", ())
