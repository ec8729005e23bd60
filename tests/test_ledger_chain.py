"""The canonical record encoding, digests, payload normalisation and ledger URLs."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzzing import fuzz_examples
from trainguard.errors import MissingExtraError, UsageError
from trainguard.ledger import GENESIS, Ledger, LedgerError, open_ledger
from trainguard.ledger.chain import (
    canonical_json,
    check_fields,
    normalise_payload,
    record_bytes,
    record_digest,
)
from trainguard.ledger.heads import parse_statement
from trainguard.ledger.sqlite_store import SqliteLedger
from trainguard.ledger.store import UNREADABLE_KEY, decode_row


def test_canonical_json_is_sorted_compact_ascii_and_repr_floats() -> None:
    value = {"b": [1, 2.5, 0.1], "a": {"z": None, "y": True}, "é": "ü", "f": 1e-7}
    assert canonical_json(value) == (
        '{"a":{"y":true,"z":null},"b":[1,2.5,0.1],"f":1e-07,"\\u00e9":"\\u00fc"}'
    )
    # repr: the shortest text that reads back to the same double.
    assert canonical_json(0.1 + 0.2) == repr(0.1 + 0.2) == "0.30000000000000004"
    assert canonical_json(float("nan")) == "NaN"


def test_record_bytes_are_one_canonical_object_with_the_payload_spliced_in() -> None:
    data = record_bytes("run", 3, 7, "step", 12, 1700000000.25, '{"loss":0.5}', GENESIS)
    expected = {
        "v": 1,
        "run_id": "run",
        "stream": 3,
        "seq": 7,
        "kind": "step",
        "step": 12,
        "time": 1700000000.25,
        "payload": {"loss": 0.5},
        "prev": GENESIS,
    }
    assert data == canonical_json(expected).encode("ascii")
    digest = record_digest("run", 3, 7, "step", 12, 1700000000.25, '{"loss":0.5}', GENESIS)
    assert digest == hashlib.sha256(data).hexdigest()


def test_a_kind_that_looks_like_json_cannot_move_the_splice() -> None:
    kind = 'x","prev":"evil'
    data = record_bytes("r", 0, 0, kind, None, 1.0, "{}", GENESIS)
    assert json.loads(data)["kind"] == kind
    assert json.loads(data)["prev"] == GENESIS


def test_every_field_changes_the_digest() -> None:
    base = ("r", 0, 1, "step", 5, 2.0, '{"a":1}', GENESIS)
    digests = {record_digest(*base)}
    variants = [
        ("r2", 0, 1, "step", 5, 2.0, '{"a":1}', GENESIS),
        ("r", 1, 1, "step", 5, 2.0, '{"a":1}', GENESIS),
        ("r", 0, 2, "step", 5, 2.0, '{"a":1}', GENESIS),
        ("r", 0, 1, "alert", 5, 2.0, '{"a":1}', GENESIS),
        ("r", 0, 1, "step", None, 2.0, '{"a":1}', GENESIS),
        ("r", 0, 1, "step", 5, 2.0000000000000004, '{"a":1}', GENESIS),
        ("r", 0, 1, "step", 5, 2.0, '{"a":2}', GENESIS),
        ("r", 0, 1, "step", 5, 2.0, '{"a":1}', "1" * 64),
    ]
    for v in variants:
        digests.add(record_digest(*v))  # type: ignore[arg-type]
    assert len(digests) == len(variants) + 1


def test_payloads_are_normalised_to_what_reads_back() -> None:
    normal, text = normalise_payload({2: "b", 10: "a", "t": (1, 2), "n": float("inf")})
    assert normal == {"10": "a", "2": "b", "t": [1, 2], "n": float("inf")}
    assert text == '{"10":"a","2":"b","n":Infinity,"t":[1,2]}'
    assert normalise_payload(normal) == (normal, text)


def test_numpy_scalars_become_plain_numbers() -> None:
    np = pytest.importorskip("numpy")
    normal, text = normalise_payload({"loss": np.float32(0.5), "n": np.int64(3)})
    assert text == '{"loss":0.5,"n":3}'
    assert type(normal["loss"]) is float and type(normal["n"]) is int


@pytest.mark.parametrize(
    "payload",
    [{"x": object()}, {"x": b"bytes"}, [1, 2], "text"],
)
def test_payloads_that_are_not_json_objects_are_refused(payload: object) -> None:
    with pytest.raises(ValueError):
        normalise_payload(payload)  # type: ignore[arg-type]


def test_deeply_nested_payloads_are_refused_not_crashing() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError):
        normalise_payload({"x": deep})


@pytest.mark.parametrize(
    ("run_id", "kind", "step", "stream"),
    [
        ("", "step", None, 0),
        ("r", "", None, 0),
        ("r", "k" * 201, None, 0),
        ("r", "step", 1.5, 0),
        ("r", "step", True, 0),
        ("r", "step", None, -2),
        ("r", "step", 2**63, 0),
    ],
)
def test_bad_fields_are_refused(run_id: str, kind: str, step: object, stream: int) -> None:
    with pytest.raises(ValueError):
        check_fields(run_id, kind, step, stream)  # type: ignore[arg-type]


def test_append_refuses_head_records_and_bad_payloads(tmp_path: Path) -> None:
    with SqliteLedger(str(tmp_path / "l.db")) as ledger:
        with pytest.raises(ValueError, match="sign_head"):
            ledger.append("r", "head", {})
        with pytest.raises(ValueError):
            ledger.append("r", "step", {"x": {1, 2}})
        assert ledger.runs() == []


def test_decode_row_flags_what_a_writer_never_stores() -> None:
    good = ("r", 0, 0, "step", 1, 2.0, '{"a":1}', GENESIS, "0" * 64)
    assert decode_row(good).payload == {"a": 1}
    for bad in (
        ("r", 0, 0, "step", 1, 2.0, '{"a": 1}', GENESIS, "0" * 64),  # not canonical
        ("r", 0, 0, "step", 1, 2.0, "{not json", GENESIS, "0" * 64),
        ("r", 0, 0, "step", 1, 2.0, "[1]", GENESIS, "0" * 64),
        ("r", 0, "zero", "step", 1, 2.0, "{}", GENESIS, "0" * 64),
        ("r", 0, 0, None, 1, 2.0, "{}", GENESIS, "0" * 64),
        ("r", 0, 0, "step", 1, "noon", "{}", GENESIS, "0" * 64),
        ("r", 0, 0, "step", 1, 2.0, b"{}", GENESIS, "0" * 64),
    ):
        assert UNREADABLE_KEY in decode_row(bad).payload


def test_statements_from_the_database_are_checked() -> None:
    for bad in (b"", b"[]", b'{"_type": "other"}', b"\xff"):
        with pytest.raises(ValueError):
            parse_statement(bad)


# -- open_ledger ------------------------------------------------------------------
def test_open_ledger_urls(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    ledger = open_ledger(f"sqlite:///{path}")
    assert isinstance(ledger, SqliteLedger) and isinstance(ledger, Ledger)
    ledger.append("r", "x", {})
    ledger.close()
    assert path.is_file()
    full = open_ledger(f"sqlite:///{path}?synchronous=full")
    assert [r.kind for r in full.records("r")] == ["x"]
    full.close()
    with pytest.raises(UsageError):
        open_ledger(f"sqlite:///{path}?synchronous=maybe")
    with pytest.raises(UsageError):
        open_ledger(f"sqlite:///{path}?journal=off")
    with pytest.raises(UsageError):
        open_ledger("mysql://host/db")
    with pytest.raises(UsageError):
        open_ledger("")


def test_open_without_create_never_makes_a_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    ledger = open_ledger(str(missing), create=False)
    with pytest.raises(LedgerError, match="no such ledger"):
        ledger.runs()
    assert not missing.exists()
    other = tmp_path / "other.db"
    import sqlite3

    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(LedgerError, match="not a trainguard ledger"):
        open_ledger(str(other), create=False).runs()


def test_postgres_without_psycopg_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(MissingExtraError, match=r"trainguard\[postgres\]"):
        open_ledger("postgresql://user:secret@localhost/db")


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.dictionaries(st.text(), _JSON, max_size=6))
def test_normalising_is_idempotent_and_reads_back(payload: dict[str, object]) -> None:
    normal, text = normalise_payload(payload)
    assert json.loads(text) == normal
    assert normalise_payload(normal) == (normal, text)
    assert decode_row(("r", 0, 0, "k", None, 1.0, text, GENESIS, "0" * 64)).payload == normal
