"""Every PostgREST / API-gateway error the Supabase transport maps, and what it becomes."""

from __future__ import annotations

import json

import pytest
from postgrest.exceptions import APIError

from server import errors
from server.repository.transport import CredentialsRejected
from server.transports.supabase import translate_error


def api_error(code: str | None, message: str = "m", details: object = None) -> APIError:
    return APIError({"code": code, "message": message, "details": details, "hint": None})


@pytest.mark.parametrize("service", [True, False], ids=["service", "user"])
@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("CR002", errors.IdempotencyKeyReused),
        ("CR003", errors.ProfileNotFound),
        ("CR004", errors.HoldNotFound),
        ("CR005", errors.HoldNotPending),
        ("CR006", errors.TransactionNotFound),
        ("CR007", errors.RefundExceedsDebit),
    ],
)
def test_business_errors_map_alike_on_both_layers(
    code: str, expected: type[errors.CreditsError], service: bool
) -> None:
    assert type(translate_error(api_error(code), service=service)) is expected


def test_insufficient_credits_keeps_its_numbers() -> None:
    details = json.dumps({"required": 7, "available": 2})
    error = translate_error(api_error("CR001", "insufficient credits", details), service=True)
    assert isinstance(error, errors.InsufficientCredits)
    assert (error.required, error.available) == (7, 2)


def test_an_invalid_argument_names_its_field() -> None:
    details = json.dumps({"field": "ttl", "description": "too long"})
    error = translate_error(api_error("CR008", "ttl: too long", details), service=False)
    assert isinstance(error, errors.InvalidArgument)
    assert [v.field for v in error.violations] == ["ttl"]


def test_a_policy_refusal_is_access_denied_for_a_user() -> None:
    error = translate_error(api_error("42501", "permission denied"), service=False)
    assert isinstance(error, errors.AccessDeniedByPolicy)


def test_a_policy_refusal_of_the_service_layer_is_a_credential_failure() -> None:
    # Our functions never refuse service_role: the configured key is not a service key.
    error = translate_error(api_error("42501", "permission denied"), service=True)
    assert isinstance(error, CredentialsRejected)


@pytest.mark.parametrize("code", ["PGRST301", "PGRST302", "PGRST303"])
def test_jwt_errors_of_the_service_layer_are_credential_failures(code: str) -> None:
    assert isinstance(translate_error(api_error(code), service=True), CredentialsRejected)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("PGRST301", errors.TokenInvalid),
        ("PGRST302", errors.TokenInvalid),
        ("PGRST303", errors.TokenExpired),
    ],
)
def test_jwt_errors_of_the_user_layer_are_the_callers_token(
    code: str, expected: type[errors.CreditsError]
) -> None:
    assert type(translate_error(api_error(code), service=False)) is expected


def test_a_gateway_refusal_of_the_service_key_is_a_credential_failure() -> None:
    error = translate_error(api_error(None, "Invalid API key"), service=True)
    assert isinstance(error, CredentialsRejected)


def test_a_gateway_refusal_of_the_anon_key_is_internal() -> None:
    error = translate_error(api_error(None, "Invalid API key"), service=False)
    assert type(error) is errors.CreditsError
    assert error.reason == "INTERNAL"


@pytest.mark.parametrize(
    "code",
    ["PGRST000", "PGRST001", "PGRST002", "PGRST003", "08006", "53300", "57P01", "502", "503"],
)
def test_an_unreachable_database_is_backend_unavailable(code: str) -> None:
    assert isinstance(translate_error(api_error(code), service=True), errors.BackendUnavailable)


def test_anything_else_stays_unexpected() -> None:
    original = api_error("42883", "function does not exist")
    assert translate_error(original, service=True) is original


@pytest.mark.parametrize("code", ["PGRST001", "08006", "40P01", "40001", "53300", "57P01", "503"])
def test_transient_failures_are_backend_unavailable(code: str) -> None:
    """Cannot reach the database, a deadlock or serialization failure that undid the call, too
    many connections, a shutdown: all BACKEND_UNAVAILABLE, retried with the same key."""
    assert type(translate_error(api_error(code), service=True)) is errors.BackendUnavailable
