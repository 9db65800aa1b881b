"""The request parameters a model accepts: what its provider declares, how a catalogue table
declares them, and the check CreateGeneration applies before anything is reserved.

Every value is a string (``parameters`` is ``map<string, string>``); a declaration says which
strings are valid. A provider that declares nothing accepts any parameters, unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from server.errors import FieldViolation, InvalidArgument

MAX_NAME_LENGTH = 64  # as CreateGeneration's parameter keys
_INTEGER = re.compile(r"-?[0-9]+")


class ParameterType(StrEnum):
    STRING = "string"  # any text (matching `pattern`, when set)
    INTEGER = "integer"  # a decimal integer within `minimum` and `maximum`, when set
    ENUM = "enum"  # one of `allowed_values`


@dataclass(frozen=True, slots=True)
class Parameter:
    """One key a model accepts in a generation's parameters, and the values it takes.

    A declaration that cannot work (an enum with no values, bounds on a string, a pattern that
    does not compile) is a ValueError when it is made, so a bad catalogue stops the start.
    """

    name: str
    type: ParameterType = ParameterType.STRING
    description: str = ""
    required: bool = False
    allowed_values: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    pattern: str = ""

    def __post_init__(self) -> None:
        where = f"parameter {self.name[:MAX_NAME_LENGTH]!r}"
        if not 1 <= len(self.name) <= MAX_NAME_LENGTH or "\x00" in self.name:
            raise ValueError(f"{where}: a name is 1 to {MAX_NAME_LENGTH} characters")
        if (self.type is ParameterType.ENUM) != bool(self.allowed_values):
            raise ValueError(f"{where}: allowed_values are given for an enum, and only for one")
        bounded = self.minimum is not None or self.maximum is not None
        if bounded and self.type is not ParameterType.INTEGER:
            raise ValueError(f"{where}: minimum and maximum bound integers only")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(f"{where}: minimum is more than maximum")
        if self.pattern:
            if self.type is not ParameterType.STRING:
                raise ValueError(f"{where}: a pattern applies to strings only")
            try:
                re.compile(self.pattern)
            except re.error as error:
                raise ValueError(f"{where}: pattern does not compile ({error})") from None

    def problem(self, value: str) -> str | None:
        """Why `value` is not one this parameter takes, or None when it is."""
        if self.type is ParameterType.ENUM:
            if value not in self.allowed_values:
                return f"must be one of {', '.join(self.allowed_values)}"
        elif self.type is ParameterType.INTEGER:
            if not _INTEGER.fullmatch(value) or not self._in_bounds(int(value)):
                return f"must be an integer{self._bounds()}"
        elif self.pattern and not re.fullmatch(self.pattern, value):
            return f"must match {self.pattern}"
        return None

    def _in_bounds(self, number: int) -> bool:
        low, high = self.minimum, self.maximum
        return (low is None or number >= low) and (high is None or number <= high)

    def _bounds(self) -> str:
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return f" from {low} to {high}"
        if low is not None:
            return f" of at least {low}"
        return "" if high is None else f" of at most {high}"


def check(model: str, declared: Sequence[Parameter] | None, values: Mapping[str, str]) -> None:
    """Refuse `values` unless `declared` takes them all: an InvalidArgument with one field
    violation (``parameters.<name>``) per unknown key, bad value or missing required one.
    Nothing is checked when `declared` is None (the provider declares no parameters)."""
    if declared is None:
        return
    by_name = {p.name: p for p in declared}
    violations: list[FieldViolation] = []
    for name in sorted(values):
        parameter = by_name.get(name)
        if parameter is None:
            known = ", ".join(sorted(by_name)) or "none"
            problem: str | None = f"is not a parameter of {model} (it takes: {known})"
        else:
            problem = parameter.problem(values[name])
        if problem is not None:
            violations.append(FieldViolation(f"parameters.{name}", problem))
    for parameter in declared:
        if parameter.required and parameter.name not in values:
            violations.append(FieldViolation(f"parameters.{parameter.name}", "is required"))
    if len(violations) == 1:
        raise InvalidArgument.one(violations[0].field, violations[0].description)
    if violations:
        raise InvalidArgument(violations)


_TABLE_KEYS = frozenset(
    {"type", "description", "required", "allowed_values", "minimum", "maximum", "pattern"}
)


def from_table(table: object, where: str = "parameters") -> tuple[Parameter, ...]:
    """Declarations written as a TOML table of tables (``[<where>.<name>]`` with ``type``,
    ``description``, ``required``, ``allowed_values``, ``minimum``, ``maximum``, ``pattern``);
    a ValueError names the bad entry and key."""
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a table of parameter tables")
    return tuple(_one(where, name, entry) for name, entry in table.items())


def _one(prefix: str, name: str, entry: object) -> Parameter:
    where = f"{prefix}.{name}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a table")
    unknown = set(entry) - _TABLE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    kind = entry.get("type", "string")
    if kind not in tuple(ParameterType):
        raise ValueError(f"{where}.type must be one of {', '.join(ParameterType)}")
    allowed = entry.get("allowed_values", [])
    if not isinstance(allowed, list) or not all(isinstance(v, str) for v in allowed):
        raise ValueError(f"{where}.allowed_values must be a list of strings")
    description = _typed(where, entry, "description", str, "")
    required = _typed(where, entry, "required", bool, False)
    pattern = _typed(where, entry, "pattern", str, "")
    minimum, maximum = _integer(where, entry, "minimum"), _integer(where, entry, "maximum")
    try:
        return Parameter(
            name=name,
            type=ParameterType(kind),
            description=description,
            required=required,
            allowed_values=tuple(allowed),
            minimum=minimum,
            maximum=maximum,
            pattern=pattern,
        )
    except ValueError as error:
        raise ValueError(f"{prefix}: {error}") from None


def _typed(where: str, entry: Mapping[str, Any], key: str, kind: type[Any], default: Any) -> Any:
    value = entry.get(key, default)
    if not isinstance(value, kind):
        raise ValueError(f"{where}.{key} must be a {kind.__name__}")
    return value


def _integer(where: str, entry: Mapping[str, Any], key: str) -> int | None:
    value = entry.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}.{key} must be an integer")
    return value
