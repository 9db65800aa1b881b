"""Model parameters: the declarations providers make (the demo provider's own, the http
provider's from its catalogue settings), the catalogue that carries them, and the check
CreateGeneration applies: every unknown key, bad value and missing required one is named as
``parameters.<name>``, and a provider that declares nothing accepts anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.errors import InvalidArgument
from server.generation import catalogue
from server.generation.parameters import Parameter, ParameterType, check, from_table
from server.generation.providers import registry
from server.generation.providers.base import Job, ProviderError
from server.generation.providers.demo import MAX_DELAY_MS, DemoProvider
from server.generation.providers.http import HttpProvider

STEPS = Parameter("steps", ParameterType.INTEGER, "denoising steps", minimum=1, maximum=50)
STYLE = Parameter("style", ParameterType.ENUM, allowed_values=("photo", "anime"), required=True)
SEED = Parameter("seed", ParameterType.INTEGER)
TAG = Parameter("tag", pattern=r"[a-z]{1,8}")
DECLARED = (STEPS, STYLE, SEED, TAG)


def violations(values: dict[str, str], declared: tuple[Parameter, ...] = DECLARED) -> list[str]:
    """The fields `check` names for `values` ([] when it accepts them)."""
    try:
        check("m", declared, values)
    except InvalidArgument as refused:
        return [v.field for v in refused.violations]
    return []


@pytest.mark.parametrize(
    "values",
    [
        {"style": "photo"},
        {"style": "anime", "steps": "1", "seed": "-12", "tag": "abc"},
        {"style": "photo", "steps": "50", "seed": "123456789012345678901234567890"},
    ],
)
def test_values_the_declarations_take_are_accepted(values: dict[str, str]) -> None:
    assert violations(values) == []


@pytest.mark.parametrize(
    ("values", "fields"),
    [
        ({}, ["parameters.style"]),  # required
        ({"style": "oil"}, ["parameters.style"]),
        ({"style": "Photo"}, ["parameters.style"]),
        ({"style": "photo", "steps": "0"}, ["parameters.steps"]),
        ({"style": "photo", "steps": "51"}, ["parameters.steps"]),
        ({"style": "photo", "steps": "abc"}, ["parameters.steps"]),
        ({"style": "photo", "steps": " 5"}, ["parameters.steps"]),
        ({"style": "photo", "steps": "1.5"}, ["parameters.steps"]),
        ({"style": "photo", "steps": "٣"}, ["parameters.steps"]),  # a non-ASCII digit
        ({"style": "photo", "seed": ""}, ["parameters.seed"]),
        ({"style": "photo", "tag": "ABC"}, ["parameters.tag"]),
        ({"style": "photo", "tag": "abc!"}, ["parameters.tag"]),  # the whole value must match
        ({"style": "photo", "colour": "red"}, ["parameters.colour"]),
        (
            {"steps": "x", "zeta": "1", "alpha": "2"},
            ["parameters.alpha", "parameters.steps", "parameters.zeta", "parameters.style"],
        ),
    ],
)
def test_each_bad_unknown_or_missing_parameter_is_named(
    values: dict[str, str], fields: list[str]
) -> None:
    assert violations(values) == fields


def test_the_message_says_what_a_value_must_be() -> None:
    with pytest.raises(InvalidArgument) as refused:
        check("m", DECLARED, {"style": "photo", "steps": "99", "colour": "red"})
    described = {v.field: v.description for v in refused.value.violations}
    assert described == {
        "parameters.colour": "is not a parameter of m (it takes: seed, steps, style, tag)",
        "parameters.steps": "must be an integer from 1 to 50",
    }
    with pytest.raises(InvalidArgument) as one:
        check("m", DECLARED, {"style": "oil"})
    assert str(one.value) == "parameters.style: must be one of photo, anime"


def test_no_declaration_takes_anything_and_an_empty_one_nothing() -> None:
    check("m", None, {"anything": "at all"})
    assert violations({"anything": "at all"}, ()) == ["parameters.anything"]


@pytest.mark.parametrize(
    ("declare", "problem"),
    [
        (lambda: Parameter(""), "1 to 64 characters"),
        (lambda: Parameter("x" * 65), "1 to 64 characters"),
        (lambda: Parameter("e", ParameterType.ENUM), "allowed_values"),
        (lambda: Parameter("s", allowed_values=("a",)), "allowed_values"),
        (lambda: Parameter("s", minimum=1), "integers only"),
        (lambda: Parameter("i", ParameterType.INTEGER, minimum=2, maximum=1), "more than"),
        (lambda: Parameter("i", ParameterType.INTEGER, pattern="[0-9]"), "strings only"),
        (lambda: Parameter("s", pattern="("), "does not compile"),
    ],
)
def test_a_declaration_that_cannot_work_is_refused(declare: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        declare()


# Declared in TOML (the http provider's `parameters` setting)


def test_a_table_declares_parameters() -> None:
    declared = from_table(
        {
            "steps": {"type": "integer", "minimum": 1, "maximum": 50, "description": "d"},
            "style": {"type": "enum", "allowed_values": ["photo"], "required": True},
            "note": {},
        }
    )
    assert declared == (
        Parameter("steps", ParameterType.INTEGER, "d", minimum=1, maximum=50),
        Parameter("style", ParameterType.ENUM, allowed_values=("photo",), required=True),
        Parameter("note"),
    )


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ([], r"parameters must be a table"),
        ({"steps": 5}, r"parameters\.steps must be a table"),
        ({"steps": {"kind": "integer"}}, r"parameters\.steps: unknown keys \['kind'\]"),
        ({"steps": {"type": "float"}}, r"parameters\.steps\.type must be one of"),
        ({"steps": {"type": "integer", "minimum": "1"}}, r"parameters\.steps\.minimum"),
        ({"steps": {"type": "integer", "maximum": True}}, r"parameters\.steps\.maximum"),
        ({"steps": {"required": "yes"}}, r"parameters\.steps\.required must be a bool"),
        ({"style": {"type": "enum", "allowed_values": "a"}}, r"parameters\.style\.allowed"),
        ({"style": {"type": "enum"}}, r"parameters: parameter 'style': allowed_values"),
        ({"tag": {"pattern": "("}}, r"parameter 'tag': pattern does not compile"),
    ],
)
def test_a_bad_table_names_what_is_wrong(table: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        from_table(table)


def test_the_http_provider_declares_what_its_settings_say() -> None:
    url = {"url": "http://127.0.0.1:9/x"}
    assert HttpProvider.declare_parameters(url) is None  # nothing declared: anything goes
    assert HttpProvider.declare_parameters({**url, "parameters": {}}) == ()
    declared = registry.declared_parameters(
        "http", {**url, "parameters": {"seed": {"type": "integer"}}}
    )
    assert declared == (Parameter("seed", ParameterType.INTEGER),)
    with pytest.raises(ValueError, match=r"http provider: settings\.parameters\.seed\.type"):
        HttpProvider({**url, "parameters": {"seed": {"type": "number"}}})


# The demo provider


def test_the_demo_provider_declares_its_parameters_with_bounds() -> None:
    declared = {p.name: p for p in DemoProvider.declare_parameters({"default_delay_ms": 300})}
    assert list(declared) == ["delay_ms", "fail", "size"]
    assert (declared["delay_ms"].minimum, declared["delay_ms"].maximum) == (0, MAX_DELAY_MS)
    assert MAX_DELAY_MS == 60_000
    assert "default 300" in declared["delay_ms"].description
    assert (declared["size"].minimum, declared["size"].maximum) == (16, 256)
    for fail in ("always", "transient", "first:0", "first:999999"):
        assert declared["fail"].problem(fail) is None
    for fail in ("sometimes", "first:", "first:x", "first:1000000", "Always"):
        assert declared["fail"].problem(fail) is not None


async def test_the_demo_provider_refuses_a_delay_past_its_maximum_at_run_time_too() -> None:
    # A job can reach the queue without CreateGeneration (a Supabase client calling the SQL).
    job = Job("g", "demo", "p", {"delay_ms": str(MAX_DELAY_MS + 1)}, attempt=1)
    with pytest.raises(ProviderError, match="delay_ms must be an integer from 0 to 60000"):
        await DemoProvider({}).generate(job)


# The catalogue carries each model's declarations


def write_catalogue(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_the_catalogue_carries_each_models_declarations(tmp_path: Path) -> None:
    models = catalogue.load(
        write_catalogue(
            tmp_path,
            """
[models.demo]
cost = 1
provider = "demo"

[models.remote]
cost = 2
provider = "http"
settings = { url = "http://127.0.0.1:9/x", parameters = { seed = { type = "integer" } } }

[models.open]
cost = 3
provider = "http"
settings = { url = "http://127.0.0.1:9/x" }
""",
        )
    )
    demo = models["demo"].parameters
    assert demo is not None
    assert [p.name for p in demo] == ["delay_ms", "fail", "size"]
    assert models["remote"].parameters == (Parameter("seed", ParameterType.INTEGER),)
    assert models["open"].parameters is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('provider = "nope"', r"models\.m: unknown provider 'nope'"),
        (
            'provider = "http"\nsettings = { url = "http://x", parameters = { s = 1 } }',
            r"models\.m: http provider: settings\.parameters\.s must be a table",
        ),
        (
            'provider = "demo"\nsettings = { default_delay_ms = 60001 }',
            r"models\.m: demo provider setting default_delay_ms",
        ),
    ],
)
def test_a_bad_declaration_stops_the_catalogue(tmp_path: Path, entry: str, problem: str) -> None:
    path = write_catalogue(tmp_path, f"[models.m]\ncost = 1\n{entry}\n")
    with pytest.raises(catalogue.CatalogueError, match=problem):
        catalogue.load(path)


def test_the_shipped_catalogue_declares_the_demo_parameters() -> None:
    for spec in catalogue.load().values():
        assert spec.parameters is not None
        assert {p.name for p in spec.parameters} == {"delay_ms", "fail", "size"}
