"""HttpProvider against a real local HTTP server (aiohttp on 127.0.0.1:0) scripted per test.

Each test queues the answers the server gives, one per request, and inspects the requests it
received. Timeouts are short (0.3 s) so the slow cases stay fast; a slow handler waits on an
event that teardown sets, so the server never outlives its test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from server.generation.providers.base import Job, Output, ProviderError
from server.generation.providers.demo import PNG_SIGNATURE
from server.generation.providers.http import HttpProvider

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TIMEOUT = 0.3
SECRET = "Bearer s3cret-token-value"


class ScriptedServer:
    """Answers each POST /generate with the next queued handler and records what it got."""

    def __init__(self) -> None:
        self.script: list[Handler] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.release = asyncio.Event()
        self.url = ""

    def then(self, *handlers: Handler) -> None:
        self.script.extend(handlers)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        assert self.script, "the test did not script an answer for this request"
        return await self.script.pop(0)(request)

    async def slow(self, request: web.Request) -> web.StreamResponse:
        """Answer only when the test ends: always beyond the provider's timeout."""
        await self.release.wait()
        return web.Response(body=b"too late")


def answer(status: int = 200, body: bytes = b"", content_type: str | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": content_type} if content_type else None
        return web.Response(status=status, body=body, headers=headers)

    return handler


def envelope(data: bytes, mime_type: str) -> Handler:
    body = {"output_base64": base64.b64encode(data).decode(), "mime_type": mime_type}
    return answer(body=json.dumps(body).encode(), content_type="application/json")


def stream(chunk: bytes, count: int, pause: float = 0.0) -> Handler:
    """A chunked body with no Content-Length, written piece by piece."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for _ in range(count):
                await response.write(chunk)
                await asyncio.sleep(pause)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client stopped reading, as it should
        return response

    return handler


@pytest_asyncio.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    app = web.Application()
    app.router.add_post("/generate", scripted.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    scripted.url = f"http://{host}:{port}/generate"
    yield scripted
    scripted.release.set()
    await runner.cleanup()


MakeProvider = Callable[..., HttpProvider]


@pytest_asyncio.fixture
async def make_provider(server: ScriptedServer) -> AsyncIterator[MakeProvider]:
    """HttpProvider for the scripted server (settings overridable), closed at teardown."""
    made: list[HttpProvider] = []

    def make(**settings: Any) -> HttpProvider:
        base = {"url": server.url, "timeout_seconds": TIMEOUT, "headers": {"Authorization": SECRET}}
        made.append(HttpProvider(base | settings))
        return made[-1]

    yield make
    for provider in made:
        await provider.aclose()


def job(attempt: int = 1) -> Job:
    return Job(
        generation_id="gen-42",
        model="painter",
        prompt="a lighthouse at dusk",
        parameters={"style": "oil", "size": "128"},
        attempt=attempt,
    )


async def failure(provider: HttpProvider, attempt: int = 1) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await provider.generate(job(attempt))
    assert SECRET not in str(caught.value)
    return caught.value


# --- success --------------------------------------------------------------------------------


async def test_binary_body(server: ScriptedServer, make_provider: MakeProvider) -> None:
    png = PNG_SIGNATURE + b"rest-of-image"
    server.then(answer(body=png, content_type="image/png"))
    assert await make_provider().generate(job()) == Output(data=png, mime_type="image/png")


async def test_binary_body_keeps_content_type_parameters(
    server: ScriptedServer, make_provider: MakeProvider
) -> None:
    server.then(answer(body=b"hello", content_type="text/plain; charset=utf-8"))
    output = await make_provider().generate(job())
    assert output == Output(data=b"hello", mime_type="text/plain; charset=utf-8")


async def test_json_base64_body(server: ScriptedServer, make_provider: MakeProvider) -> None:
    data = bytes(range(256))
    server.then(envelope(data, "image/webp"))
    assert await make_provider().generate(job()) == Output(data=data, mime_type="image/webp")


async def test_request_has_the_documented_fields(
    server: ScriptedServer, make_provider: MakeProvider
) -> None:
    server.then(answer(body=b"ok", content_type="text/plain"))
    await make_provider().generate(job(attempt=3))
    assert server.requests == [
        {
            "generation_id": "gen-42",
            "model": "painter",
            "prompt": "a lighthouse at dusk",
            "parameters": {"style": "oil", "size": "128"},
            "attempt": 3,
        }
    ]
    assert server.headers[0]["Authorization"] == SECRET
    assert server.headers[0]["Content-Type"] == "application/json"


async def test_one_client_serves_concurrent_jobs(
    server: ScriptedServer, make_provider: MakeProvider
) -> None:
    server.then(*(answer(body=b"x", content_type="text/plain") for _ in range(5)))
    provider = make_provider()
    outputs = await asyncio.gather(*(provider.generate(job(n)) for n in range(1, 6)))
    assert {output.data for output in outputs} == {b"x"}
    assert sorted(request["attempt"] for request in server.requests) == [1, 2, 3, 4, 5]


# --- retryable failures ---------------------------------------------------------------------


async def test_slow_answer_is_a_retryable_timeout(
    server: ScriptedServer, make_provider: MakeProvider
) -> None:
    server.then(server.slow)
    error = await failure(make_provider())
    assert error.retryable is True
    assert "0.3 s" in str(error)


async def test_trickling_body_hits_the_overall_deadline(
    server: ScriptedServer, make_provider: MakeProvider
) -> None:
    # Each chunk arrives well within the read timeout; the whole exchange does not.
    server.then(stream(b"x" * 10, count=100, pause=TIMEOUT / 3))
    assert (await failure(make_provider())).retryable is True


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
async def test_retryable_statuses(
    server: ScriptedServer, make_provider: MakeProvider, status: int
) -> None:
    server.then(answer(status=status, body=b"try later"))
    error = await failure(make_provider())
    assert error.retryable is True
    assert str(status) in str(error)


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = HttpProvider({"url": f"http://127.0.0.1:{port}/generate", "timeout_seconds": 2})
    try:
        error = await failure(provider)
    finally:
        await provider.aclose()
    assert error.retryable is True
    assert "ConnectError" in str(error)


# --- permanent failures ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404, 422, 302])
async def test_client_errors_are_not_retryable(
    server: ScriptedServer, make_provider: MakeProvider, status: int
) -> None:
    server.then(answer(status=status, body=b"  no such\n model  " + b"z" * 1000))
    error = await failure(make_provider())
    assert error.retryable is False
    message = str(error)
    assert f"status {status}" in message
    assert "no such model" in message
    assert len(message) < 300
    assert server.url not in message


@pytest.mark.parametrize(
    "handler",
    [
        answer(body=b"y" * 5000, content_type="image/png"),  # declared Content-Length
        stream(b"y" * 1024, count=1024),  # chunked: 1 MiB offered, read stops past 4 KiB
    ],
    ids=["content-length", "chunked"],
)
async def test_oversize_body_is_not_retryable(
    server: ScriptedServer, make_provider: MakeProvider, handler: Handler
) -> None:
    server.then(handler)
    error = await failure(make_provider(max_output_bytes=4096))
    assert error.retryable is False
    assert "larger than 4096 bytes" in str(error)


async def test_body_exactly_at_the_limit_is_accepted(
    server: ScriptedServer, make_provider: MakeProvider
) -> None:
    server.then(stream(b"y" * 1024, count=4))
    output = await make_provider(max_output_bytes=4096).generate(job())
    assert len(output.data) == 4096


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"mime_type": "image/png"}',
        b'{"output_base64": "aGk=", "mime_type": ""}',
        b'{"output_base64": "not base64!", "mime_type": "image/png"}',
        b'{"output_base64": 7, "mime_type": "image/png"}',
    ],
)
async def test_malformed_json_answer_is_not_retryable(
    server: ScriptedServer, make_provider: MakeProvider, body: bytes
) -> None:
    server.then(answer(body=body, content_type="application/json"))
    error = await failure(make_provider())
    assert error.retryable is False
    assert "output_base64" in str(error)


# --- a worker's retry sequence --------------------------------------------------------------


async def test_slow_then_500_then_success(
    server: ScriptedServer, make_provider: MakeProvider
) -> None:
    server.then(server.slow, answer(status=500), answer(body=b"done", content_type="text/plain"))
    provider = make_provider()
    assert (await failure(provider, attempt=1)).retryable is True
    assert (await failure(provider, attempt=2)).retryable is True
    assert await provider.generate(job(3)) == Output(data=b"done", mime_type="text/plain")
    assert [request["attempt"] for request in server.requests] == [1, 2, 3]


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({}, "url"),
        ({"url": "ftp://example.com"}, "url"),
        ({"url": "http://x", "headers": {"A": 1}}, "headers"),
        ({"url": "http://x", "headers": "A: b"}, "headers"),
        ({"url": "http://x", "timeout_seconds": 0}, "timeout_seconds"),
        ({"url": "http://x", "timeout_seconds": "30"}, "timeout_seconds"),
        ({"url": "http://x", "max_output_bytes": 1.5}, "max_output_bytes"),
        ({"url": "http://x", "max_output_bytes": True}, "max_output_bytes"),
    ],
)
def test_bad_settings(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        HttpProvider(settings)


async def test_cancelling_the_call_is_not_a_provider_error(
    server: ScriptedServer, make_provider: MakeProvider
) -> None:
    # The worker enforces the model's timeout by cancelling; that must stay a cancellation.
    server.then(server.slow)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(make_provider(timeout_seconds=5).generate(job()), timeout=0.05)
