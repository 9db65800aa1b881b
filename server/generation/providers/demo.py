"""The built-in demo provider: a deterministic PNG made from the prompt, with no network.

It lets the service run end to end on a laptop and gives tests a provider whose behaviour they
can script through the job's parameters (all strings, since parameters is map<string,string>):

- ``delay_ms``: sleep this long before answering, 0..60000 (``asyncio.sleep``, so cancelling
  the call, as the worker does on a timeout, stops it at once). Defaults to the catalogue
  setting ``default_delay_ms``, else 0. Bounded so that no one request holds a worker for long.
- ``fail``: ``always`` (not retryable), ``transient`` (retryable, every attempt) or ``first:N``
  (retryable on attempts 1..N, then success).
- ``size``: width and height in pixels, 16..256 (default 64).

The provider declares these (`declare_parameters`), so CreateGeneration refuses a bad value or
any other key before anything is reserved; the checks here remain for jobs that reached the
queue another way (a Supabase client calling the SQL function directly).

The image is an 8x8 mirrored "identicon" whose colours and cells come from
sha256(model, prompt, the other parameters): the same inputs always give the same bytes. The
control parameters above, except ``size``, are left out of the hash, so a job that succeeds
after ``first:2`` draws the same picture as one that never failed. Any other parameter is
content and changes the picture. The PNG is written by hand (zlib + struct) so the service needs
no imaging library.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.generation.parameters import Parameter, ParameterType
from server.generation.providers.base import Job, Output, ProviderError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 16, 256, 64
MAX_DELAY_MS = 60_000
MAX_FAIL_FIRST = 1_000_000
GRID = 8
_CONTROL_KEYS = frozenset({"delay_ms", "fail"})


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one job asks of the demo provider, once its parameters are validated."""

    delay_ms: int
    fails: bool
    retryable: bool
    size: int


class DemoProvider:
    """Draws a deterministic PNG from a job; settings may hold ``default_delay_ms`` and
    ``default_size``."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._default_delay_ms = _setting(settings, "default_delay_ms", 0, _parse_delay)
        self._default_size = _setting(settings, "default_size", DEFAULT_SIZE, _parse_size)

    @classmethod
    def declare_parameters(cls, settings: Mapping[str, Any]) -> Sequence[Parameter]:
        """delay_ms, fail and size, with the defaults `settings` give them."""
        delay = _setting(settings, "default_delay_ms", 0, _parse_delay)
        size = _setting(settings, "default_size", DEFAULT_SIZE, _parse_size)
        return (
            Parameter(
                "delay_ms",
                ParameterType.INTEGER,
                f"milliseconds to wait before answering (default {delay})",
                minimum=0,
                maximum=MAX_DELAY_MS,
            ),
            Parameter(
                "fail",
                ParameterType.STRING,
                "a scripted failure: always, transient (retried) or first:N (the first N attempts)",
                pattern=r"always|transient|first:[0-9]{1,6}",
            ),
            Parameter(
                "size",
                ParameterType.INTEGER,
                f"width and height of the PNG in pixels (default {size})",
                minimum=MIN_SIZE,
                maximum=MAX_SIZE,
            ),
        )

    async def generate(self, job: Job) -> Output:
        """Sleep, fail or draw, as the job's parameters say."""
        plan = self._plan(job)
        if plan.delay_ms:
            await asyncio.sleep(plan.delay_ms / 1000)
        if plan.fails:
            kind = "transient" if plan.retryable else "permanent"
            raise ProviderError(
                f"demo provider: scripted {kind} failure on attempt {job.attempt}",
                retryable=plan.retryable,
            )
        return Output(data=render_png(job, plan.size), mime_type="image/png")

    def _plan(self, job: Job) -> _Plan:
        params = job.parameters
        delay = params.get("delay_ms")
        delay_ms = self._default_delay_ms if delay is None else _parse_delay(delay)
        fails, retryable = _parse_fail(params.get("fail"), job.attempt)
        size = self._default_size if "size" not in params else _parse_size(params["size"])
        return _Plan(delay_ms=delay_ms, fails=fails, retryable=retryable, size=size)


def _setting(
    settings: Mapping[str, Any], name: str, default: int, parse: Callable[[str], int]
) -> int:
    """A catalogue setting parsed like its parameter; a bad one is a configuration error."""
    raw = settings.get(name, default)
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(f"demo provider: {name} must be an integer")
    try:
        return parse(str(raw))
    except ProviderError as exc:
        raise ValueError(f"demo provider setting {name}: {exc}") from None


def _parse_int(name: str, value: str, low: int, high: int) -> int:
    """A decimal integer in [low, high], or a non-retryable ProviderError naming the parameter."""
    text = value.strip()
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
        raise ProviderError(
            f"demo provider: {name} must be an integer from {low} to {high}, got {value[:40]!r}",
            retryable=False,
        )
    return int(text)


def _parse_delay(value: str) -> int:
    return _parse_int("delay_ms", value, 0, MAX_DELAY_MS)


def _parse_size(value: str | None) -> int:
    return DEFAULT_SIZE if value is None else _parse_int("size", value, MIN_SIZE, MAX_SIZE)


def _parse_fail(value: str | None, attempt: int) -> tuple[bool, bool]:
    """(fails, retryable) for this attempt under the ``fail`` parameter."""
    if value is None:
        return False, False
    if value == "always":
        return True, False
    if value == "transient":
        return True, True
    if value.startswith("first:"):
        n = _parse_int("fail=first:N", value.removeprefix("first:"), 0, MAX_FAIL_FIRST)
        return attempt <= n, True
    raise ProviderError(
        f"demo provider: fail must be 'always', 'transient' or 'first:N', got {value[:40]!r}",
        retryable=False,
    )


def image_seed(job: Job) -> bytes:
    """sha256 of the model, prompt and content parameters, unambiguously encoded."""
    content = {k: v for k, v in job.parameters.items() if k not in _CONTROL_KEYS}
    canonical = json.dumps([job.model, job.prompt, sorted(content.items())], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


def render_png(job: Job, size: int) -> bytes:
    """A size x size RGB PNG: a mirrored 8x8 pattern in two colours taken from the seed."""
    seed = image_seed(job)
    fg = seed[0:3]
    bg = bytes(255 - (c // 3) for c in seed[3:6])
    bits = int.from_bytes(seed[6:10], "big")
    cells = [
        [bool(bits >> (row * 4 + min(col, GRID - 1 - col)) & 1) for col in range(GRID)]
        for row in range(GRID)
    ]
    rows = []
    for y in range(size):
        cell_row = cells[y * GRID // size]
        pixels = b"".join(fg if cell_row[x * GRID // size] else bg for x in range(size))
        rows.append(b"\x00" + pixels)  # filter type 0 (None) per scanline
    return encode_png(size, size, b"".join(rows))


def encode_png(width: int, height: int, scanlines: bytes) -> bytes:
    """PNG bytes for 8-bit RGB scanlines that already carry their filter bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(scanlines, 9))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
