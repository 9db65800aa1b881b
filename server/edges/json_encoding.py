"""The proto3 JSON mapping of a message exactly as `json_format.MessageToDict(message,
always_print_fields_with_no_presence=True)` makes it, in a fifth of the time: what to do with
each field is worked out once per message type instead of on every call (json_format asks the
descriptor about every field of every message it prints, which was most of a Connect answer's
cost). A type with anything this does not know (floats, bytes, well-known types other than
Timestamp, closed enums or enums with JSON names) is left to json_format, as is then any
message holding one.

The same object comes out: the fields that are set in field-number order, then the fields
without presence that are not, in declaration order, each written as json_format writes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

# A field's value (or one element of a repeated field, or a map's value) as JSON.
Convert = Callable[[Any], object]

_TIMESTAMP = "google.protobuf.Timestamp"
_INT64 = frozenset((FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64))
_AS_IS = frozenset(
    (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_BOOL)
)


class _Unsupported(Exception):
    """A field this module leaves to json_format."""


def _same(value: object) -> object:
    return value


def _timestamp(value: Any) -> object:
    return value.ToJsonString()


def _convert(field: FieldDescriptor) -> Convert:
    """How one value of `field` is written."""
    kind = field.cpp_type
    if kind in _INT64:
        return str
    if kind in _AS_IS:
        return _same
    if kind == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            raise _Unsupported(field.full_name)
        return _same
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        enum = field.enum_type
        if enum is None or enum.is_closed or enum.full_name == "google.protobuf.NullValue":
            raise _Unsupported(field.full_name)
        if any(value.GetOptions().ListFields() for value in enum.values):
            raise _Unsupported(field.full_name)  # a value may carry its own JSON name
        names = {value.number: value.name for value in enum.values}
        # An open enum's unknown number is written as the number.
        return lambda value: names.get(value, value)
    if kind == FieldDescriptor.CPPTYPE_MESSAGE and field.message_type is not None:
        full_name = field.message_type.full_name
        if full_name == _TIMESTAMP:
            return _timestamp
        if full_name.startswith("google.protobuf."):
            raise _Unsupported(full_name)
        return to_dict
    raise _Unsupported(field.full_name)  # float and double


def _field(field: FieldDescriptor) -> Convert:
    """How a whole field is written: a map as an object, a repeated field as a list."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key = field.message_type.fields_by_name["key"]
        value = _convert(field.message_type.fields_by_name["value"])
        if key.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
            raise _Unsupported(field.full_name)  # keys "true" and "false"
        return lambda entries: {str(k): value(entries[k]) for k in entries}
    convert = _convert(field)
    if field.is_repeated:
        return lambda values: [convert(v) for v in values]
    return convert


class _Plan:
    """A message type's fields: how each is written under its JSON name, and the fields without
    presence, whose defaults are written when they are not set."""

    __slots__ = ("defaults", "fields")

    def __init__(self, descriptor: Descriptor) -> None:
        self.fields: dict[str, tuple[str, Convert]] = {
            field.name: (field.json_name, _field(field)) for field in descriptor.fields
        }
        self.defaults: list[tuple[str, Callable[[], object]]] = []
        for field in descriptor.fields:
            if field.has_presence:
                continue
            if field.is_repeated:
                is_map = (
                    field.message_type is not None and field.message_type.GetOptions().map_entry
                )
                self.defaults.append((field.json_name, dict if is_map else list))
            else:
                self.defaults.append(
                    (field.json_name, _constant(_convert(field)(field.default_value)))
                )


def _constant(value: object) -> Callable[[], object]:
    return lambda: value


_plans: dict[str, _Plan | None] = {}


def _plan(descriptor: Any) -> _Plan | None:
    """The plan of a message type (a Descriptor), None when json_format writes it."""
    try:
        return _plans[descriptor.full_name]
    except KeyError:
        pass
    try:
        plan: _Plan | None = _Plan(descriptor)
    except _Unsupported:
        plan = None
    _plans[descriptor.full_name] = plan
    return plan


def to_dict(message: Message) -> dict[str, object]:
    """`message` as json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    makes it."""
    plan = _plan(message.DESCRIPTOR)
    if plan is None:
        return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    fields = plan.fields
    js: dict[str, object] = {}
    for field, value in message.ListFields():
        name, convert = fields[field.name]
        js[name] = convert(value)
    for name, default in plan.defaults:
        if name not in js:
            js[name] = default()
    return js


# json.dumps(..., ensure_ascii=False, separators=(",", ":")) without a new encoder each call.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode(message: Message) -> bytes:
    """`message` as compact JSON with every field, zeros and empty ones included."""
    return _ENCODE(to_dict(message)).encode()
