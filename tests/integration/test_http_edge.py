"""What the Connect edge's HTTP server adds for HTTP callers: /healthz (the gRPC health state),
CORS for the origins of CREDITS_HTTP_CORS_ORIGINS, the request body limit of
CREDITS_MAX_RECEIVE_MESSAGE_BYTES, and 404 for what it does not serve."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from server import app as application
from server.edges import cors
from server.observability.logs import JsonFormatter
from tests.fakes.supabase import FakeSupabase
from tests.fixtures.server import new_user, settings_for

ALLOWED = "https://app.example.com"
REFUSED = "https://elsewhere.example.com"
LIMIT = 1024
GET_BALANCE = "/credits.v1.CreditService/GetBalance"


def token() -> str:
    return dict(new_user().metadata)["authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
async def edge(database_url: str, supabase: FakeSupabase) -> AsyncIterator[application.Application]:
    """A server whose Connect edge allows one origin and takes requests up to 1 KiB."""
    settings = dataclasses.replace(
        settings_for("postgres", database_url, supabase),
        http_cors_origins=(ALLOWED,),
        max_receive_message_bytes=LIMIT,
    )
    app = await application.start(settings)
    try:
        yield app
    finally:
        await app.stop(grace=1)


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as client:
        yield client


def url(app: application.Application, path: str) -> str:
    return f"http://127.0.0.1:{app.http_port}{path}"


async def test_healthz_follows_the_health_of_the_server(
    edge: application.Application, http: httpx.AsyncClient
) -> None:
    serving = await http.get(url(edge, "/healthz"))
    assert (serving.status_code, serving.json()) == (200, {"status": "SERVING"})
    assert serving.headers["cache-control"] == "no-store"
    assert (await http.head(url(edge, "/healthz"))).status_code == 200
    await edge.health.follow_database(False)  # what the database watch says when it goes silent
    try:
        silent = await http.get(url(edge, "/healthz"))
        assert (silent.status_code, silent.json()) == (503, {"status": "NOT_SERVING"})
    finally:
        await edge.health.follow_database(True)
    assert (await http.get(url(edge, "/healthz"))).status_code == 200
    assert (await http.post(url(edge, "/healthz"))).status_code == 405


async def test_healthz_is_503_once_the_server_begins_to_stop(
    database_url: str, supabase: FakeSupabase, http: httpx.AsyncClient
) -> None:
    app = await application.start(settings_for("postgres", database_url, supabase))
    try:
        assert (await http.get(url(app, "/healthz"))).status_code == 200
        await app.health.enter_graceful_shutdown()  # the first step of Application.stop
        assert (await http.get(url(app, "/healthz"))).status_code == 503
    finally:
        await app.stop(grace=1)


async def test_a_preflight_from_an_allowed_origin_names_what_connect_clients_send(
    edge: application.Application, http: httpx.AsyncClient
) -> None:
    response = await http.options(
        url(edge, GET_BALANCE),
        headers={
            "origin": ALLOWED,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,authorization,connect-protocol-version",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = {
        h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")
    }
    assert {
        "content-type",
        "connect-protocol-version",
        "connect-timeout-ms",
        "authorization",
        "x-request-id",
    } <= allowed
    assert "access-control-allow-credentials" not in response.headers


async def test_a_preflight_from_another_origin_is_refused(
    edge: application.Application, http: httpx.AsyncClient
) -> None:
    response = await http.options(
        url(edge, GET_BALANCE),
        headers={"origin": REFUSED, "access-control-request-method": "POST"},
    )
    assert response.status_code == 403
    assert not any(name.startswith("access-control-") for name in response.headers)


async def test_an_allowed_origins_call_may_be_read_by_its_page(
    edge: application.Application, http: httpx.AsyncClient
) -> None:
    response = await http.post(
        url(edge, GET_BALANCE),
        content=b"{}",
        headers={
            "origin": ALLOWED,
            "content-type": "application/json",
            "authorization": f"Bearer {token()}",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed
    assert "origin" in response.headers["vary"].lower()


async def test_another_origins_call_is_answered_without_cors_headers(
    edge: application.Application, http: httpx.AsyncClient
) -> None:
    """A browser keeps such an answer from the page; other callers are served as usual."""
    response = await http.post(
        url(edge, GET_BALANCE),
        content=b"{}",
        headers={
            "origin": REFUSED,
            "content-type": "application/json",
            "authorization": f"Bearer {token()}",
        },
    )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


async def test_no_cross_origin_access_when_no_origin_is_configured(
    server: application.Application, http: httpx.AsyncClient
) -> None:
    for method in ("OPTIONS", "POST"):
        response = await http.request(
            method,
            url(server, GET_BALANCE),
            content=b"{}",
            headers={
                "origin": ALLOWED,
                "access-control-request-method": "POST",
                "content-type": "application/json",
            },
        )
        assert "access-control-allow-origin" not in response.headers, method


def test_the_preflight_allows_the_connect_protocol_headers() -> None:
    names = {name.strip() for name in cors.ALLOWED_HEADERS.split(",")}
    assert {
        "Content-Type",
        "Connect-Protocol-Version",
        "Connect-Timeout-Ms",
        "Authorization",
        "X-Request-Id",
    } <= names


async def test_a_body_over_the_receive_limit_is_resource_exhausted(
    edge: application.Application, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The connectrpc runtime's answer: resource_exhausted (HTTP 429), no ErrorInfo, as gRPC's
    own for an oversized message; a caller without a token hears UNAUTHENTICATED first."""
    caplog.set_level(logging.INFO, logger="credits.access")
    body = json.dumps({"userId": "", "padding": "x" * (2 * LIMIT)}).encode()
    anonymous = await http.post(
        url(edge, GET_BALANCE), content=body, headers={"content-type": "application/json"}
    )
    assert anonymous.json()["code"] == "unauthenticated"
    response = await http.post(
        url(edge, GET_BALANCE),
        content=body,
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {token()}",
            "x-request-id": "trace-too-large",
        },
    )
    assert response.status_code == 429
    error = response.json()
    assert error["code"] == "resource_exhausted"
    assert "details" not in error
    formatter = JsonFormatter()
    [line] = [
        json.loads(formatter.format(r))
        for r in caplog.records
        if r.name == "credits.access"
        and getattr(r, "fields", {}).get("request_id") == "trace-too-large"
    ]
    assert (line["code"], line["protocol"]) == ("RESOURCE_EXHAUSTED", "connect")
    within = await http.post(
        url(edge, GET_BALANCE),
        content=b"{}",
        headers={"content-type": "application/json", "authorization": f"Bearer {token()}"},
    )
    assert within.status_code == 200


async def test_paths_it_does_not_serve_are_404(
    edge: application.Application, http: httpx.AsyncClient
) -> None:
    for path in ("/", "/credits.v1.CreditService/NoSuchMethod", "/grpc.health.v1.Health/Check"):
        response = await http.post(
            url(edge, path), content=b"{}", headers={"content-type": "application/json"}
        )
        assert response.status_code == 404, path
