"""The HTTP provider: POSTs each attempt to a configured URL and returns what it answers.

This is how a model served elsewhere (a GPU box, a vendor API behind a small adapter) plugs
into the service without code. Settings, from the model's catalogue entry:

- ``url`` (required): an http(s) URL.
- ``headers``: a table of str -> str sent with every request (e.g. an API key).
- ``timeout_seconds``: the whole exchange's deadline, default 30.
- ``max_output_bytes``: the largest body accepted, default 10 MiB.
- ``parameters``: the request parameters the model takes, a table per parameter (see
  `server.generation.parameters.from_table`). CreateGeneration then refuses others and bad
  values. Without it, any parameters are passed on unchecked.

The request body is JSON ``{"generation_id", "model", "prompt", "parameters", "attempt"}``.
A 200 answer is either the output itself (its Content-Type is the MIME type) or, when the
Content-Type is application/json, ``{"output_base64": "...", "mime_type": "..."}``.

Failures map to the retry rules the worker applies: 5xx, 408, 429, connection errors and
timeouts are retryable; other statuses, oversize bodies and malformed answers are not. Error
messages carry the status and a short excerpt of the body, never the URL or the headers, which
may hold secrets. Retrying is the worker's job, not this module's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from server.generation import parameters
from server.generation.parameters import Parameter
from server.generation.providers.base import Job, Output, ProviderError

DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_MAX_OUTPUT_BYTES = 10 * 1024 * 1024
EXCERPT_BYTES = 200
RETRYABLE_4XX = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The validated settings of one HTTP provider."""

    url: str
    headers: Mapping[str, str]
    timeout_seconds: float
    max_output_bytes: int

    @classmethod
    def parse(cls, settings: Mapping[str, Any]) -> HttpSettings:
        """Validate catalogue settings; a ValueError names the bad one (never its value)."""
        url = settings.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError("http provider: settings.url must be an http:// or https:// URL")
        headers = settings.get("headers", {})
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ValueError("http provider: settings.headers must be a table of strings")
        timeout = _positive("timeout_seconds", settings.get("timeout_seconds"), float)
        limit = _positive("max_output_bytes", settings.get("max_output_bytes"), int)
        return cls(
            url=url,
            headers=dict(headers),
            timeout_seconds=DEFAULT_TIMEOUT_SECONDS if timeout is None else float(timeout),
            max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES if limit is None else int(limit),
        )


def _positive(name: str, value: object, kind: type[int] | type[float]) -> int | float | None:
    """None when unset; else a positive number of the given kind (ints pass as floats)."""
    if value is None:
        return None
    allowed = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, allowed) or not value > 0:
        raise ValueError(f"http provider: settings.{name} must be a positive {kind.__name__}")
    return value


class HttpProvider:
    """POSTs jobs to one URL through a single reused httpx.AsyncClient; call aclose() at the end."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = HttpSettings.parse(settings)
        self.declare_parameters(settings)  # refuses bad declarations here too
        self._client = httpx.AsyncClient(
            headers=dict(self.settings.headers),
            timeout=httpx.Timeout(self.settings.timeout_seconds),
            follow_redirects=False,
        )

    @classmethod
    def declare_parameters(cls, settings: Mapping[str, Any]) -> Sequence[Parameter] | None:
        """What the ``parameters`` setting declares; None (anything goes) without one."""
        if "parameters" not in settings:
            return None
        try:
            return parameters.from_table(settings["parameters"], "settings.parameters")
        except ValueError as error:
            raise ValueError(f"http provider: {error}") from None

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def generate(self, job: Job) -> Output:
        """One attempt: POST the job, map the answer to an Output or a ProviderError."""
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                return await self._exchange(job)
        except (TimeoutError, httpx.TimeoutException):
            raise ProviderError(
                f"http provider: no answer within {self.settings.timeout_seconds:g} s",
                retryable=True,
            ) from None
        except httpx.TransportError as exc:
            raise ProviderError(
                f"http provider: transport error ({type(exc).__name__})", retryable=True
            ) from None

    async def _exchange(self, job: Job) -> Output:
        payload = {
            "generation_id": job.generation_id,
            "model": job.model,
            "prompt": job.prompt,
            "parameters": dict(job.parameters),
            "attempt": job.attempt,
        }
        async with self._client.stream("POST", self.settings.url, json=payload) as response:
            if response.status_code != httpx.codes.OK:
                raise await _status_error(response)
            body = await _read_limited(response, self.settings.max_output_bytes)
            return _to_output(response.headers.get("content-type"), body)


async def _status_error(response: httpx.Response) -> ProviderError:
    """A ProviderError for a non-200 answer, with the status and a short body excerpt."""
    status = response.status_code
    excerpt = b""
    async for chunk in response.aiter_bytes():
        excerpt += chunk
        if len(excerpt) >= EXCERPT_BYTES:
            break
    text = " ".join(excerpt[:EXCERPT_BYTES].decode("utf-8", "replace").split())
    retryable = status >= 500 or status in RETRYABLE_4XX
    detail = f": {text}" if text else ""
    return ProviderError(f"http provider: status {status}{detail}", retryable=retryable)


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    """The body, or a non-retryable ProviderError as soon as it exceeds `limit` bytes."""
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ProviderError:
    return ProviderError(f"http provider: output larger than {limit} bytes", retryable=False)


def _to_output(content_type: str | None, body: bytes) -> Output:
    """A binary body as is, or the output inside a JSON envelope."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        return Output(data=body, mime_type=(content_type or "application/octet-stream").strip())
    return _from_envelope(body)


def _from_envelope(body: bytes) -> Output:
    """Decode {"output_base64", "mime_type"}; anything else is a non-retryable error."""
    try:
        envelope = json.loads(body)
        encoded, mime_type = envelope["output_base64"], envelope["mime_type"]
        if not isinstance(encoded, str) or not isinstance(mime_type, str) or not mime_type:
            raise TypeError
        data = base64.b64decode(encoded, validate=True)
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise ProviderError(
            "http provider: JSON answer must be {output_base64: base64 string, "
            "mime_type: non-empty string}",
            retryable=False,
        ) from None
    return Output(data=data, mime_type=mime_type)  # smaller than the body, so within the limit
