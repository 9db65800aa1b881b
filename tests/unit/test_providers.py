"""The demo provider (deterministic PNGs, scripted failures and delays) and the registry.

The PNG checks parse the bytes chunk by chunk and verify every CRC32, so they prove the file is
well formed without an imaging library. The plug-in tests install a real (temporary) dist-info
on sys.path, so importlib.metadata discovers it exactly as it would an installed package.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from server.generation.providers import registry
from server.generation.providers.base import Job, Output, ProviderError
from server.generation.providers.demo import PNG_SIGNATURE, DemoProvider
from server.generation.providers.http import HttpProvider


def make_job(
    prompt: str = "a red fox",
    *,
    model: str = "demo-v1",
    attempt: int = 1,
    **parameters: str,
) -> Job:
    return Job(
        generation_id="gen-1",
        model=model,
        prompt=prompt,
        parameters=parameters,
        attempt=attempt,
    )


async def generate(job: Job, settings: Mapping[str, object] | None = None) -> Output:
    return await DemoProvider(settings or {}).generate(job)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, asserting the signature, lengths and CRC32s."""
    assert data[:8] == PNG_SIGNATURE
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert len(body) == length
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    return chunks


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height after checking the whole file: chunk order, IHDR, IDAT scanlines."""
    chunks = png_chunks(data)
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert chunks[-1][1] == b""
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    assert all(raw[row * stride] == 0 for row in range(height))
    return width, height


# --- demo: output ---------------------------------------------------------------------------


async def test_demo_output_is_a_valid_64px_png() -> None:
    output = await generate(make_job())
    assert output.mime_type == "image/png"
    assert png_size(output.data) == (64, 64)


@pytest.mark.parametrize("size", ["16", "100", "256"])
async def test_demo_size_parameter(size: str) -> None:
    output = await generate(make_job(size=size))
    assert png_size(output.data) == (int(size), int(size))


async def test_demo_same_inputs_same_bytes() -> None:
    first = await generate(make_job(style="ink", seed="7"))
    second = await DemoProvider({}).generate(make_job(seed="7", style="ink"))
    assert first.data == second.data


@pytest.mark.parametrize(
    "other",
    [
        make_job("a blue fox"),
        make_job(model="demo-v2"),
        make_job(style="ink"),
    ],
)
async def test_demo_different_inputs_different_bytes(other: Job) -> None:
    assert (await generate(make_job())).data != (await generate(other)).data


async def test_demo_control_parameters_do_not_change_the_picture() -> None:
    plain = await generate(make_job(attempt=2))
    scripted = await generate(make_job(attempt=2, fail="first:1", delay_ms="1"))
    assert plain.data == scripted.data


# --- demo: failures -------------------------------------------------------------------------


async def test_demo_fail_always_is_permanent() -> None:
    with pytest.raises(ProviderError, match="attempt 1") as caught:
        await generate(make_job(fail="always"))
    assert caught.value.retryable is False


@pytest.mark.parametrize("attempt", [1, 2, 5])
async def test_demo_fail_transient_is_retryable_on_every_attempt(attempt: int) -> None:
    with pytest.raises(ProviderError) as caught:
        await generate(make_job(fail="transient", attempt=attempt))
    assert caught.value.retryable is True


@pytest.mark.parametrize(
    ("n", "attempt", "fails"),
    [(2, 1, True), (2, 2, True), (2, 3, False), (0, 1, False), (1, 1, True), (1, 2, False)],
)
async def test_demo_fail_first_n(n: int, attempt: int, fails: bool) -> None:
    job = make_job(fail=f"first:{n}", attempt=attempt)
    if fails:
        with pytest.raises(ProviderError) as caught:
            await generate(job)
        assert caught.value.retryable is True
    else:
        assert png_size((await generate(job)).data) == (64, 64)


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"fail": "sometimes"}, "fail"),
        ({"fail": "first:"}, "first:N"),
        ({"fail": "first:x"}, "first:N"),
        ({"fail": "first:-1"}, "first:N"),
        ({"size": "15"}, "size"),
        ({"size": "257"}, "size"),
        ({"size": "big"}, "size"),
        ({"size": " "}, "size"),
        ({"delay_ms": "-1"}, "delay_ms"),
        ({"delay_ms": "1.5"}, "delay_ms"),
        ({"delay_ms": "600001"}, "delay_ms"),
        ({"delay_ms": "٣"}, "delay_ms"),  # a non-ASCII digit
    ],
)
async def test_demo_bad_parameters_fail_permanently(parameters: dict[str, str], named: str) -> None:
    with pytest.raises(ProviderError, match=named) as caught:
        await generate(dataclasses.replace(make_job(), parameters=parameters))
    assert caught.value.retryable is False


async def test_demo_bad_parameters_are_rejected_before_sleeping() -> None:
    with pytest.raises(ProviderError, match="size"):
        await asyncio.wait_for(generate(make_job(delay_ms="60000", size="1")), timeout=1)


# --- demo: delays ---------------------------------------------------------------------------


async def test_demo_delay_is_respected() -> None:
    started = time.monotonic()
    await generate(make_job(delay_ms="120"))
    assert time.monotonic() - started >= 0.11


async def test_demo_delay_is_cancellable() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(generate(make_job(delay_ms="60000")), timeout=0.05)
    assert time.monotonic() - started < 1


async def test_demo_default_delay_from_settings_and_its_override() -> None:
    provider = DemoProvider({"default_delay_ms": 100})
    started = time.monotonic()
    await provider.generate(make_job())
    assert time.monotonic() - started >= 0.09
    started = time.monotonic()
    await provider.generate(make_job(delay_ms="0"))
    assert time.monotonic() - started < 0.09


@pytest.mark.parametrize("value", [-1, "soon", 1.5, True])
def test_demo_bad_default_delay_setting(value: object) -> None:
    with pytest.raises(ValueError, match="default_delay_ms"):
        DemoProvider({"default_delay_ms": value})


# --- registry -------------------------------------------------------------------------------


async def test_registry_loads_builtins() -> None:
    demo = registry.load("demo", {})
    assert isinstance(demo, DemoProvider)
    assert png_size((await demo.generate(make_job())).data) == (64, 64)
    http = registry.load("http", {"url": "http://127.0.0.1:9/generate"})
    assert isinstance(http, HttpProvider)
    await http.aclose()
    assert {"demo", "http"} <= set(registry.available())


def test_registry_unknown_name_lists_what_is_available() -> None:
    with pytest.raises(LookupError, match="unknown provider 'nope'") as caught:
        registry.load("nope", {})
    assert "demo" in str(caught.value)
    assert "http" in str(caught.value)


def test_registry_passes_settings_errors_through() -> None:
    with pytest.raises(ValueError, match=r"settings\.url"):
        registry.load("http", {})


PLUGIN_MODULE = '''
"""A provider plug-in, installed only for this test."""
from server.generation.parameters import Parameter, ParameterType
from server.generation.providers.base import Output


class Echoer:
    def __init__(self, settings):
        self.settings = dict(settings)

    async def generate(self, job):
        text = f"{self.settings.get('prefix', '')}{job.prompt}"
        return Output(data=text.encode(), mime_type="text/plain")


def factory(settings):
    return Echoer(settings)


class Toned(Echoer):
    """A provider class that declares its parameters (the class is the factory)."""

    @classmethod
    def declare_parameters(cls, settings):
        tones = tuple(settings.get("tones", ["dry", "warm"]))
        return [Parameter("tone", ParameterType.ENUM, "how it sounds", allowed_values=tones)]


class Confused(Echoer):
    @classmethod
    def declare_parameters(cls, settings):
        return ["tone"]


not_callable = 42
'''

InstallPlugin = Callable[[str], None]


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> InstallPlugin:
    """Install a fake distribution whose entry_points.txt has the given [credits.providers]."""

    def install(entry_points: str) -> None:
        dist_info = tmp_path / "fake_plugin-0.1.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n"
        )
        (dist_info / "entry_points.txt").write_text(f"[credits.providers]\n{entry_points}\n")
        (tmp_path / "fake_plugin_mod.py").write_text(PLUGIN_MODULE)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "fake_plugin_mod", raising=False)

    return install


async def test_registry_loads_a_plugin_from_entry_points(install_plugin: InstallPlugin) -> None:
    install_plugin("echoer = fake_plugin_mod:factory")
    assert registry.available() == ["demo", "echoer", "http"]
    provider = registry.load("echoer", {"prefix": "echo: "})
    output = await provider.generate(make_job("hello"))
    assert output == Output(data=b"echo: hello", mime_type="text/plain")


def test_registry_a_plugin_cannot_shadow_a_builtin(
    install_plugin: InstallPlugin, caplog: pytest.LogCaptureFixture
) -> None:
    install_plugin("demo = fake_plugin_mod:factory")
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        assert isinstance(registry.load("demo", {}), DemoProvider)
        assert registry.available().count("demo") == 1
    assert "belongs to a built-in" in caplog.text


def test_registry_a_plugin_that_is_not_callable(install_plugin: InstallPlugin) -> None:
    install_plugin("broken = fake_plugin_mod:not_callable")
    with pytest.raises(TypeError, match=r"'broken'.*not callable"):
        registry.load("broken", {})


def test_registry_a_plugin_that_declares_nothing_takes_any_parameters(
    install_plugin: InstallPlugin,
) -> None:
    install_plugin("echoer = fake_plugin_mod:factory")
    assert registry.declared_parameters("echoer", {}) is None


def test_registry_a_plugin_declares_its_parameters_from_its_settings(
    install_plugin: InstallPlugin,
) -> None:
    install_plugin("toned = fake_plugin_mod:Toned")
    (tone,) = registry.declared_parameters("toned", {"tones": ["loud"]}) or ()
    assert (tone.name, tone.type, tone.allowed_values) == ("tone", "enum", ("loud",))


def test_registry_refuses_declarations_that_are_not_parameters(
    install_plugin: InstallPlugin,
) -> None:
    install_plugin("confused = fake_plugin_mod:Confused")
    with pytest.raises(ValueError, match="not Parameter values"):
        registry.declared_parameters("confused", {})


def test_registry_declared_parameters_of_an_unknown_provider() -> None:
    with pytest.raises(LookupError, match="unknown provider 'nope'"):
        registry.declared_parameters("nope", {})
