"""The bounded protobuf reader: wire format, caps, sniffing, and fuzzing."""

from __future__ import annotations

import io
import mmap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import fuzz_examples
from trainguard.errors import LimitExceeded
from trainguard.limits import Limits
from trainguard.samples.protowriter import field, float32, message, packed, tag, varint
from trainguard.scanner.formats import protobuf
from trainguard.scanner.formats.protobuf import (
    I32,
    LEN,
    VARINT,
    Message,
    ProtoError,
    iter_fields,
    plausible,
    read_varint,
)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_round_trip(value: int) -> None:
    data = varint(value)
    assert read_varint(data, 0, len(data)) == (value, len(data))


def test_negative_int64_is_ten_bytes() -> None:
    data = varint(-1)
    assert len(data) == 10
    assert read_varint(data, 0, 10)[0] == 2**64 - 1


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x80", "truncated varint"),
        (b"\xff" * 11, "longer than 10 bytes"),
        (tag(0, VARINT) + b"\x01", "field number 0"),
        (tag(1, 3), "group"),
        (tag(1, 4), "group"),
        (tag(1, 6), "invalid wire type"),
        (tag(1, LEN) + varint(5) + b"abc", "runs past"),
        (tag(1, I32) + b"ab", "truncated fixed32"),
    ],
)
def test_malformed_input_is_a_proto_error(data: bytes, error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        list(iter_fields(data, 0, len(data)))


def test_message_accessors() -> None:
    inner = message(field(1, "name"), field(2, 7))
    data = message(
        field(1, 5),
        field(1, 6),  # scalars: the last one wins
        field(2, "a"),
        field(2, "b"),
        field(3, inner),
        field(3, inner),
        packed(4, [1, 2, 300]),
        field(4, 4),
        float32(5, 1.5),
        field(6, field(1, "k") + field(2, "v")),
    )
    msg = Message.parse(data, Limits())
    assert msg.varint(1) == 6
    assert msg.varint(9, default=3) == 3
    assert msg.strings(2) == ["a", "b"] and msg.string(2) == "b"
    assert [m.string(1) for m in msg.messages(3)] == ["name", "name"]
    assert msg.varints(4) == [1, 2, 300, 4]
    assert msg.string_map(6) == {"k": "v"}
    assert msg.has(5) and not msg.has(7)
    with pytest.raises(ProtoError, match="wire type"):
        list(msg.messages(1))  # a varint read as a message


def test_strings_are_cut_at_the_cap() -> None:
    msg = Message.parse(field(1, "x" * 100), Limits(max_proto_string=10))
    assert msg.strings(1) == ["x" * 10]


def test_field_budget_is_shared_by_every_message() -> None:
    data = message(*(field(1, message(field(1, 1), field(2, 2))) for _ in range(10)))
    msg = Message.parse(data, Limits(max_proto_fields=20))
    with pytest.raises(LimitExceeded, match="protobuf fields"):
        for sub in msg.messages(1):
            sub.varint(1)


def test_nesting_depth_is_capped() -> None:
    data = b""
    for _ in range(40):
        data = field(1, data)
    msg = Message.parse(data, Limits(max_proto_depth=16))
    with pytest.raises(LimitExceeded, match="nesting depth"):
        while True:
            msg = next(msg.messages(1))


SCHEMA: protobuf.Schema = {1: (VARINT, None), 2: (LEN, {1: (LEN, None), 2: (VARINT, None)})}


def test_plausible_checks_a_prefix_cut_by_the_head() -> None:
    data = message(field(1, 1), field(2, message(field(1, "n" * 50), field(2, 3))))
    full = plausible(data, SCHEMA, len(data))
    assert full.ok and full.known == 4 and full.top == {1, 2} and full.first_varints[1] == 1
    cut = plausible(data[:20], SCHEMA, len(data))
    assert cut.ok and cut.known >= 2


def test_plausible_rejects_contradictions() -> None:
    assert not plausible(field(1, "text"), SCHEMA, None).ok  # field 1 must be a varint
    inner_wrong = field(2, field(2, "text"))
    assert not plausible(inner_wrong, SCHEMA, None).ok
    too_long = tag(2, LEN) + varint(1000) + b"x" * 10
    assert not plausible(too_long, SCHEMA, 20).ok  # longer than the whole file
    assert plausible(field(9, "unknown fields are skipped"), SCHEMA, None).known == 0


def test_load_buffer_maps_real_files_and_caps_streams(tmp_path: Path) -> None:
    path = tmp_path / "m.pb"
    path.write_bytes(field(1, 1))
    with open(path, "rb") as f:
        buf = protobuf.load_buffer(f, 1)  # mmapped: the in-memory cap does not apply
        assert isinstance(buf, mmap.mmap) and buf[:] == field(1, 1)
        protobuf.close_buffer(buf)
    assert protobuf.load_buffer(io.BytesIO(b"abc"), 3) == b"abc"
    with pytest.raises(LimitExceeded):
        protobuf.load_buffer(io.BytesIO(b"abcd"), 3)


def _walk(msg: Message, depth: int = 0) -> int:
    """Read every LEN field as a message, the way a schema-less walker would."""
    seen = 0
    for fields in msg.fields().values():
        for f in fields:
            seen += 1
            if f.wire == LEN and depth < 4:
                try:
                    seen += _walk(Message(msg.buf, f.value, f.end, msg.budget, msg.depth + 1))
                except ProtoError:
                    pass
    return seen


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_reader_raises_only_its_own_errors(data: bytes) -> None:
    try:
        _walk(Message.parse(data, Limits(max_proto_fields=10_000)))
    except (ProtoError, LimitExceeded):
        pass
    plausible(data, SCHEMA, len(data))
