"""The database's JSON values read by orjson (server/transports/json_values.py) are exactly what
json.loads reads: the same values of the same types, for any JSON, and for the numbers where
orjson alone differs (integers past 64 bits, numbers past a double's range)."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.transports import json_values

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def same(read: Any, expected: Any) -> bool:
    """Equal values of equal types all the way down (1 and 1.0 differ)."""
    if type(read) is not type(expected):
        return False
    if isinstance(expected, dict):
        return list(read) == list(expected) and all(
            same(read[key], value) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return len(read) == len(expected) and all(map(same, read, expected))
    if isinstance(expected, float):
        return math.copysign(1, read) == math.copysign(1, expected) and read == expected
    return bool(read == expected)


@given(VALUES, st.booleans())
def test_any_json_reads_as_json_reads_it(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert same(json_values.loads(text), json.loads(text))


@pytest.mark.parametrize(
    "text",
    [
        '{"amount": 123456789012345678901234567890}',
        '{"amount": -9223372036854775809}',
        "[18446744073709551616, -18446744073709551616]",
        '{"id": "1234567890123456789012"}',
        '{"big": 1e400, "small": -1e400}',
        "12345678901234567890.5",
        '{"exactly": 9223372036854775807, "low": -9223372036854775808}',
    ],
)
def test_numbers_orjson_alone_would_change_read_exactly(text: str) -> None:
    assert same(json_values.loads(text), json.loads(text))


def test_the_numbers_above_are_ones_orjson_alone_reads_otherwise() -> None:
    """The cases json_values hands to json: without it they would lose digits or fail."""
    assert orjson.loads("123456789012345678901234567890") != 123456789012345678901234567890
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads("1e400")


@pytest.mark.parametrize("text", ["", "{", '{"a": }', "[1, 2", "nul", '"\\ud800"x'])
def test_invalid_json_raises_json_s_own_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        json_values.loads(text)
