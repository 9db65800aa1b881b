"""The client's error registry: every reason of the contract's error table maps to its class
(read from the contract itself and from the server's own error table), details are decoded, and
whatever the registry does not know falls back to the class of its status code."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import grpc
import pytest
from credits_client import errors as client_errors
from credits_client.errors import (
    BackendUnavailable,
    CreditsError,
    FailedPrecondition,
    FieldViolation,
    InsufficientCredits,
    InvalidArgument,
    NotFound,
    TokenExpired,
    Unauthenticated,
    exception_class_for,
    from_call,
    from_status,
)
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from server import errors as server_errors
from server.api import error_table

# The public contract is the repository's own docs/api-contract.md; its "## Errors" table is
# what this registry must agree with.
CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "api-contract.md"


class FakeRpcError(grpc.RpcError):
    """A failed call as grpc hands it over: code(), details(), trailing_metadata()."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return tuple(self._status.trailing_metadata)


def contract_errors(text: str) -> list[tuple[grpc.StatusCode, str]]:
    """(code, reason) of every row of the "## Errors" table of the contract."""
    section = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    pairs: list[tuple[grpc.StatusCode, str]] = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[1] in ("code", "") or set(cells[1]) <= {"-"}:
            continue
        code = grpc.StatusCode[cells[1]]
        reasons = re.sub(r"\(.*?\)", "", cells[2])  # drop "(metadata: required, available)"
        pairs += [(code, reason) for reason in re.findall(r"[A-Z][A-Z_]+", reasons)]
    return pairs


def contract_text() -> str:
    assert CONTRACT.exists(), f"the public contract belongs at {CONTRACT}, in the repository"
    return CONTRACT.read_text()


def test_contract_table_parses_to_the_known_reasons() -> None:
    pairs = contract_errors(contract_text())
    assert len(pairs) == 24
    assert (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS") in pairs


def test_every_reason_of_the_contract_maps_to_its_class() -> None:
    for code, reason in contract_errors(contract_text()):
        cls = exception_class_for(code, reason)
        assert reason in cls.reasons, (code, reason, cls)
        assert cls.code is code, (code, reason, cls)


def server_error(cls: type[server_errors.CreditsError]) -> server_errors.CreditsError:
    """An instance of each of the server's error classes."""
    if cls is server_errors.InvalidArgument:
        return server_errors.InvalidArgument.one("amount", "must be positive")
    if cls is server_errors.InsufficientCredits:
        return server_errors.InsufficientCredits(required=30, available=7)
    if cls is server_errors.BackendUnavailable:
        return server_errors.BackendUnavailable(retry_after=1.5)
    if cls is server_errors.SpendLimitExceeded:
        return server_errors.SpendLimitExceeded("day", 10, 7, "2026-12-05T00:00:00Z")
    if cls is server_errors.TooManyActiveGenerations:
        return server_errors.TooManyActiveGenerations(limit=8, active=8)
    return cls()


@pytest.mark.parametrize("server_class", list(error_table.STATUS_CODES), ids=lambda cls: cls.reason)
def test_what_the_server_sends_decodes_to_the_class_of_its_reason(
    server_class: type[server_errors.CreditsError],
) -> None:
    sent = server_error(server_class)
    error = from_call(FakeRpcError(error_table.to_status(sent)))
    assert type(error) is exception_class_for(error_table.code_of(sent), sent.reason)
    assert sent.reason in type(error).reasons
    assert error.code is error_table.code_of(sent)
    assert (error.reason, error.domain, error.message) == (sent.reason, "credits.v1", sent.message)
    assert error.metadata == sent.metadata


def test_insufficient_credits_carries_required_and_available() -> None:
    sent = server_errors.InsufficientCredits(required=30, available=7)
    error = from_call(FakeRpcError(error_table.to_status(sent)))
    assert isinstance(error, InsufficientCredits)
    assert isinstance(error, FailedPrecondition)
    assert (error.required, error.available) == (30, 7)
    assert [v.subject for v in error.precondition_violations] == ["available"]


def test_invalid_argument_carries_field_violations() -> None:
    sent = server_errors.InvalidArgument.one("amount", "must be positive")
    error = from_call(FakeRpcError(error_table.to_status(sent)))
    assert isinstance(error, InvalidArgument)
    assert error.field_violations == [FieldViolation("amount", "must be positive")]


def test_backend_unavailable_carries_the_retry_delay() -> None:
    error = from_call(FakeRpcError(error_table.to_status(server_errors.BackendUnavailable())))
    assert isinstance(error, BackendUnavailable)
    assert error.retry_delay == datetime.timedelta(seconds=1)


def status_with(code: grpc.StatusCode, reason: str, domain: str = "credits.v1") -> object:
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain))
    return status_pb2.Status(code=code.value[0], message="m", details=[packed])


def test_unknown_reasons_fall_back_to_the_class_of_their_code() -> None:
    error = from_status(grpc.StatusCode.NOT_FOUND, "m", status_with(grpc.StatusCode.NOT_FOUND, "X"))  # type: ignore[arg-type]
    assert type(error) is NotFound
    assert error.reason == "X"


def test_a_known_reason_under_another_code_falls_back_to_that_code() -> None:
    status = status_with(grpc.StatusCode.NOT_FOUND, "TOKEN_EXPIRED")
    error = from_status(grpc.StatusCode.NOT_FOUND, "m", status)  # type: ignore[arg-type]
    assert type(error) is NotFound


def test_reasons_of_other_domains_are_not_ours() -> None:
    status = status_with(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED", domain="example.com")
    error = from_status(grpc.StatusCode.UNAUTHENTICATED, "m", status)  # type: ignore[arg-type]
    assert type(error) is Unauthenticated
    assert error.domain == "example.com"


def test_an_error_without_details_is_the_class_of_its_code() -> None:
    error = from_status(grpc.StatusCode.UNAUTHENTICATED, "no token")
    assert type(error) is Unauthenticated
    assert not isinstance(error, TokenExpired)
    assert (error.reason, error.metadata, error.field_violations) == ("", {}, [])


@pytest.mark.parametrize(
    "code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK], ids=lambda c: c.name
)
def test_every_status_code_has_a_class(code: grpc.StatusCode) -> None:
    cls = exception_class_for(code)
    assert cls is not CreditsError
    assert cls.code is code
    assert issubclass(cls, CreditsError)


def test_a_corrupt_status_trailer_still_gives_the_code_class() -> None:
    status = grpc.Status()
    status.code, status.details = grpc.StatusCode.NOT_FOUND, "gone"  # type: ignore[misc]
    status.trailing_metadata = (("grpc-status-details-bin", b"\xff\xfe not a proto"),)  # type: ignore[misc]
    error = from_call(FakeRpcError(status))
    assert type(error) is NotFound
    assert error.message == "gone"


def test_str_and_repr_name_code_and_reason() -> None:
    error = from_call(FakeRpcError(error_table.to_status(server_errors.TokenExpired())))
    assert str(error).startswith("UNAUTHENTICATED TOKEN_EXPIRED: ")
    assert repr(error) == "TokenExpired(code=UNAUTHENTICATED, reason='TOKEN_EXPIRED')"


def test_registered_reasons_are_exactly_the_servers() -> None:
    server = {cls.reason for cls in error_table.STATUS_CODES}
    assert set(client_errors.registered_reasons()) == server
