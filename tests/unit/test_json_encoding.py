"""The Connect edge's JSON answers (server/edges/json_encoding.py) are byte for byte what
json_format writes, for every message of the API, filled in many ways: some fields set, some
left at their defaults, maps and lists empty or not, enums of unknown numbers, timestamps of
every precision, nested messages; and a message with fields it leaves to json_format."""

from __future__ import annotations

import json
import random

import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from credits.v1 import (
    credit_service_pb2,
    generation_pb2,
    generation_service_pb2,
    grant_pb2,
    ledger_pb2,
)
from server.edges import json_encoding

FILES = (credit_service_pb2, generation_pb2, generation_service_pb2, grant_pb2, ledger_pb2)
MESSAGES = sorted(
    {
        message
        for module in FILES
        for message in module.DESCRIPTOR.message_types_by_name.values()
        if not message.GetOptions().map_entry
    },
    key=lambda message: message.full_name,
)


def expected(message: Message) -> bytes:
    as_dict = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return json.dumps(as_dict, ensure_ascii=False, separators=(",", ":")).encode()


def _scalar(field: FieldDescriptor, rng: random.Random) -> object:
    kind = field.cpp_type
    if field.type == FieldDescriptor.TYPE_BYTES:
        return rng.choice([b"", b"\x00\xffpng"])
    if kind == FieldDescriptor.CPPTYPE_STRING:
        return rng.choice(["", "x", "bench", 'é ✓ "quoted" \\ \n', "00000000-0000-4000-8000-1"])
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        return rng.choice([*numbers, max(numbers) + 7])  # an unknown number too
    if kind in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_INT32):
        bits = 63 if kind == FieldDescriptor.CPPTYPE_INT64 else 31
        return rng.choice([0, 1, -1, 2**bits - 1, -(2**bits)])
    if kind in (FieldDescriptor.CPPTYPE_UINT64, FieldDescriptor.CPPTYPE_UINT32):
        return rng.choice([0, 1, 2**32 - 1])
    return rng.choice([0.0, 1.5, -2.25])


def fill(message: Message, rng: random.Random, depth: int = 0) -> None:
    """Some of `message`'s fields set, to values of every kind; nested messages to a depth."""
    descriptor: Descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        if rng.random() < 0.3:
            continue  # left unset
        target = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key in rng.sample(["b", "a", "z", "ключ", ""], rng.randint(0, 3)):
                if value_field.message_type is None:
                    target[key] = _scalar(value_field, rng)
                else:
                    fill(target[key], rng, depth + 1)
        elif field.message_type is not None:
            if field.message_type.full_name == "google.protobuf.Timestamp":
                stamps = [
                    timestamp_pb2.Timestamp(seconds=1_790_000_000, nanos=nanos)
                    for nanos in rng.sample([0, 5_000_000, 123_000, 7, 999_999_999], 2)
                ]
                if field.is_repeated:
                    target.extend(stamps)
                else:
                    target.CopyFrom(stamps[0])
            elif field.message_type.full_name == "google.protobuf.Duration":
                (target.add() if field.is_repeated else target).FromSeconds(rng.choice([0, 90]))
            elif depth < 3 and not field.message_type.full_name.startswith("google.protobuf."):
                for _ in range(rng.randint(0, 2) if field.is_repeated else 1):
                    fill(target.add() if field.is_repeated else target, rng, depth + 1)
        elif field.is_repeated:
            target.extend(_scalar(field, rng) for _ in range(rng.randint(0, 3)))
        else:
            setattr(message, field.name, _scalar(field, rng))


@pytest.mark.parametrize("descriptor", MESSAGES, ids=lambda d: d.full_name)
def test_every_message_of_the_api_is_written_as_json_format_writes_it(
    descriptor: Descriptor,
) -> None:
    message_class = type(
        getattr(
            next(m for m in FILES if m.DESCRIPTOR.name == descriptor.file.name),
            descriptor.name,
        )()
    )
    rng = random.Random(descriptor.full_name)  # noqa: S311 (test data, not secrets)
    assert json_encoding.encode(message_class()) == expected(message_class())
    for _ in range(40):
        message = message_class()
        fill(message, rng)
        assert json_encoding.encode(message) == expected(message)


def test_a_message_with_fields_it_does_not_know_is_left_to_json_format() -> None:
    value = struct_pb2.Value(struct_value={"a": 1.5, "b": [True, None, "x"]})
    assert json_encoding.encode(value) == expected(value)
    assert json_encoding.to_dict(value) == {"a": 1.5, "b": [True, None, "x"]}


def test_the_answers_of_the_hot_calls_take_the_fast_path() -> None:
    for message in (credit_service_pb2.GetBalanceResponse, credit_service_pb2.DebitCreditsResponse):
        assert json_encoding._plan(message.DESCRIPTOR) is not None
