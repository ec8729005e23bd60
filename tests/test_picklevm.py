"""The symbolic pickle machine against real pickles and hand-built tricks."""

from __future__ import annotations

import collections
import pickle

import pytest

from tests.helpers import call1, global0, short_str, stack_global
from trainguard import Severity, scan_bytes
from trainguard.scanner.picklevm.machine import Call, Global, run_pickle
from trainguard.scanner.stream import ByteStream


def rules(data: bytes) -> dict[str, Severity]:
    result = scan_bytes(data)
    assert result.error is None, result.error
    out: dict[str, Severity] = {}
    for f in result.findings:
        out[f.rule] = max(out.get(f.rule, f.severity), f.severity)
    return out


@pytest.mark.parametrize("proto", range(6))
def test_plain_data_every_protocol_is_clean(proto: int) -> None:
    data = {
        "lr": 1e-3,
        "steps": [1, 2, 3],
        "name": "run",
        "t": (1, b"x"),
        "s": {1, 2},
        "f": frozenset([3]),
        "od": collections.OrderedDict(a=1),
        "n": None,
        "big": 2**80,
    }
    blob = pickle.dumps(data, protocol=proto)
    ev = run_pickle(ByteStream.of_bytes(blob))
    assert ev.error is None and ev.end == len(blob)
    assert {g.qualname for g in ev.globals} <= {
        "collections.OrderedDict",
        "__builtin__.set",
        "__builtin__.frozenset",
        "builtins.set",
        "builtins.frozenset",
        "_codecs.encode",
    }
    assert rules(blob) == {}


def test_reduce_is_recorded_with_arguments() -> None:
    ev = run_pickle(ByteStream.of_bytes(call1("os", "system", "touch x")))
    [call] = ev.calls
    assert isinstance(call.func, Global) and call.func.qualname == "os.system"
    assert call.args == ("touch x",)


def test_stack_global_operands_from_memo_are_resolved() -> None:
    # Module and name strings are memoised, then fetched with BINGET: scanners
    # that only look at the opcode right before STACK_GLOBAL miss this.
    data = (
        pickle.PROTO
        + b"\x04"
        + short_str("os")
        + pickle.BINPUT
        + b"\x01"
        + short_str("system")
        + pickle.BINPUT
        + b"\x02"
        + pickle.POP
        + pickle.POP
        + pickle.BINGET
        + b"\x01"
        + pickle.BINGET
        + b"\x02"
        + pickle.STACK_GLOBAL
        + short_str("id")
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )
    assert rules(data)["TG101"] is Severity.CRITICAL


def test_memo_slot_overwritten_before_use() -> None:
    # Slot 1 first holds a harmless module name, then is overwritten with "os".
    data = (
        pickle.PROTO
        + b"\x04"
        + short_str("collections")
        + pickle.BINPUT
        + b"\x01"
        + pickle.POP
        + short_str("os")
        + pickle.BINPUT
        + b"\x01"
        + pickle.POP
        + pickle.BINGET
        + b"\x01"
        + short_str("system")
        + pickle.STACK_GLOBAL
        + short_str("id")
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )
    ev = run_pickle(ByteStream.of_bytes(data))
    assert [g.qualname for g in ev.globals] == ["os.system"]


def test_protocol0_string_built_names() -> None:
    data = global0("posix", "system") + b"(S'id'\ntR."
    assert rules(data)["TG101"] is Severity.CRITICAL


def test_dynamic_stack_global_is_critical() -> None:
    # The module name is the result of a call: no static name to check.
    data = (
        pickle.PROTO
        + b"\x04"
        + stack_global("builtins", "str")
        + short_str("os")
        + pickle.TUPLE1
        + pickle.REDUCE
        + short_str("system")
        + pickle.STACK_GLOBAL
        + pickle.STOP
    )
    assert rules(data)["TG104"] is Severity.CRITICAL


def test_call_on_call_result_is_critical() -> None:
    # getattr-free gadget: call whatever an allowlisted call returned.
    data = (
        pickle.PROTO
        + b"\x04"
        + stack_global("collections", "OrderedDict")
        + pickle.EMPTY_TUPLE
        + pickle.REDUCE
        + pickle.EMPTY_TUPLE
        + pickle.REDUCE
        + pickle.STOP
    )
    assert rules(data)["TG104"] is Severity.CRITICAL


def test_build_on_a_class_is_tampering() -> None:
    data = (
        pickle.PROTO
        + b"\x04"
        + stack_global("collections", "OrderedDict")
        + pickle.EMPTY_DICT
        + short_str("x")
        + short_str("y")
        + pickle.SETITEM
        + pickle.BUILD
        + pickle.STOP
    )
    assert rules(data)["TG105"] is Severity.CRITICAL


def test_dotted_name_reaching_os_through_an_allowed_module() -> None:
    assert rules(call1("torch", "os.system", "id"))["TG101"] is Severity.CRITICAL


def test_dotted_inplace_tensor_method_is_tampering() -> None:
    assert rules(call1("torch", "Tensor.mul_", "x"))["TG105"] is Severity.CRITICAL


def test_unknown_stdlib_function_is_high() -> None:
    assert rules(call1("smtpd", "DebuggingServer", "x"))["TG102"] is Severity.HIGH


def test_calling_a_user_global_is_high_until_a_policy_allows_it() -> None:
    # Net("x") may be a class or a function that runs "x": REDUCE calls it either way.
    assert rules(call1("mypkg.models", "Net", "x")) == {"TG112": Severity.HIGH}


def test_extension_code_is_high() -> None:
    data = pickle.PROTO + b"\x02" + pickle.EXT1 + b"\x07" + pickle.STOP
    assert rules(data)["TG106"] is Severity.HIGH


def test_payload_before_a_broken_stream_is_still_critical() -> None:
    # nullifAI: the payload runs, then the loader fails on garbage.
    data = call1("os", "system", "id")[:-1] + b"\xff\xfe garbage"
    found = rules(data)
    assert found["TG101"] is Severity.CRITICAL
    assert "TG107" in found


def test_second_concatenated_pickle_is_analysed() -> None:
    data = pickle.dumps([1, 2]) + call1("os", "system", "id")
    assert rules(data)["TG101"] is Severity.CRITICAL


def test_trailing_garbage_after_stop() -> None:
    found = rules(pickle.dumps({"a": 1}) + b"\x00\x01 not a pickle")
    assert found == {"TG108": Severity.LOW}


def test_nested_pickle_in_bytes_is_scanned() -> None:
    inner = call1("os", "system", "id")
    outer = pickle.dumps({"blob": inner}, protocol=4)
    found = rules(outer)
    assert found["TG101"] is Severity.CRITICAL and "TG110" in found


def test_long_bytes_are_skipped_not_copied() -> None:
    big = b"\x00" * (3 << 20)
    blob = pickle.dumps({"w": big}, protocol=4)
    ev = run_pickle(ByteStream.of_bytes(blob))
    assert ev.error is None and ev.end == len(blob)


def test_setitem_on_a_tensor_is_tampering() -> None:
    # CVE-2026-24747 wrote into tensor memory with SETITEM on a rebuilt tensor.
    rebuild = stack_global("torch._utils", "_rebuild_tensor_v2")
    data = (
        pickle.PROTO
        + b"\x04"
        + rebuild
        + pickle.EMPTY_TUPLE
        + pickle.REDUCE
        + short_str("k")
        + short_str("v")
        + pickle.SETITEM
        + pickle.STOP
    )
    assert rules(data)["TG105"] is Severity.CRITICAL


def test_events_keep_offsets() -> None:
    data = call1("os", "system", "id")
    result = scan_bytes(data)
    [finding] = [f for f in result.findings if f.rule == "TG101"]
    assert finding.offset == data.index(pickle.STACK_GLOBAL)
    assert finding.trigger == "os.system"


def test_call_events_are_calls() -> None:
    ev = run_pickle(ByteStream.of_bytes(pickle.dumps(collections.OrderedDict(a=1), 2)))
    assert any(isinstance(c, Call) for c in ev.calls)


# -- recognition: what a pickle loader would execute, whatever the header ------------

_PAYLOAD_P0 = b"cposix\nsystem\n(S'true'\ntR"


def _recognition_variants() -> dict[str, bytes]:
    body = _PAYLOAD_P0 + b"."
    frame = pickle.FRAME + len(body).to_bytes(8, "little") + body
    return {
        "no-proto": body,
        "proto-0": b"\x80\x00" + body,
        "proto-1": b"\x80\x01" + body,
        "frame-first": frame,
        "broken-after-payload": _PAYLOAD_P0 + b"\xff\xfe",
        "truncated-after-payload": _PAYLOAD_P0,
        "hex-int-first": b"I0x10\n0" + body,
        "octal-int-first": b"I010\n0" + body,
        "long-string-first": b"X" + (8000).to_bytes(4, "little") + b"a" * 8000 + b"0" + body,
    }


@pytest.mark.parametrize("name", list(_recognition_variants()))
def test_pickles_are_recognised_by_what_a_loader_would_run(name: str) -> None:
    result = scan_bytes(_recognition_variants()[name])
    assert result.verdict is Severity.CRITICAL, [(f.rule, f.message) for f in result.findings]


@pytest.mark.parametrize(
    "data",
    [b"Introduction\n", b"\x00\x01\x02\x03" * 100, b"(a)", b"Ideas 0x\n", b"BM6\x00\x00"],
)
def test_bytes_no_loader_would_run_stay_unidentified(data: bytes) -> None:
    result = scan_bytes(data)
    assert [f.rule for f in result.findings] == ["TG001"]


@pytest.mark.parametrize("proto", range(6))
def test_nested_pickles_of_every_protocol_are_analysed(proto: int) -> None:
    for inner in (_PAYLOAD_P0 + b".", b"\x80\x02" + _PAYLOAD_P0 + b"."):
        found = rules(pickle.dumps({"blob": inner, "pad": b"x" * 10}, protocol=proto))
        assert found.get("TG101") is Severity.CRITICAL and "TG110" in found, (proto, found)


def test_a_nested_pickle_longer_than_the_kept_bytes_is_seen_starting() -> None:
    inner = _PAYLOAD_P0 + b"." + b"\x00" * (2 << 20)
    found = rules(pickle.dumps({"blob": inner}, protocol=4))
    assert found.get("TG101") is Severity.CRITICAL and "TG110" in found


def test_a_tar_whose_header_is_a_pickle_is_both() -> None:
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(_PAYLOAD_P0.decode() + ".")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    found = rules(out.getvalue())
    assert found.get("TG111") is Severity.HIGH and found.get("TG101") is Severity.CRITICAL


# -- severity by what a global does when called ----------------------------------------


def _call_p0(module: str, name: str, arg: str = "x") -> bytes:
    return f"c{module}\n{name}\n(S'{arg}'\ntR.".encode()


@pytest.mark.parametrize(
    "qualname",
    ["numexpr.evaluate", "asteval.Interpreter", "mylib.testing.run_script", "pkg.decoders.decode"],
)
def test_calling_an_unknown_third_party_global_fails_the_default(qualname: str) -> None:
    module, _, name = qualname.rpartition(".")
    found = rules(_call_p0(module, name))
    assert found.get("TG112") is Severity.HIGH, found


def test_constructing_an_unknown_class_stays_medium() -> None:
    data = b"\x80\x02cmylib.models\nNet\nq\x00)\x81}q\x01X\x01\x00\x00\x00wK\x01sb."
    assert rules(data) == {"TG103": Severity.MEDIUM}


def test_a_policy_allows_a_call_it_names() -> None:
    from trainguard.scanner.policy import Policy

    result = scan_bytes(_call_p0("mylib.ops", "build"), policy=Policy(frozenset(["mylib.ops"])))
    assert result.verdict is None


def test_an_allowlisted_rebuild_that_calls_its_argument_calls_it() -> None:
    # _rebuild_from_type_v2(func, new_type, args, state) runs func(*args).
    data = (
        b"ctorch._tensor\n_rebuild_from_type_v2\n(cmylib.tools\nrun\nctorch\nTensor\n(S'x'\ntNtR."
    )
    assert rules(data).get("TG112") is Severity.HIGH


@pytest.mark.parametrize(
    "qualname",
    [
        "torch.nn.init.normal_",
        "torch.nn.init.kaiming_uniform_",
        "torch.index_put_",
        "torch.relu_",
        "torch.Tensor.copy_",
        "torch.from_file",
        "torch.storage.UntypedStorage.from_file",
        "numpy.memmap",
        "numpy.fromfile",
        "torch.save",
    ],
)
def test_mutators_and_file_accessors_are_critical_under_any_name(qualname: str) -> None:
    module, _, name = qualname.rpartition(".")
    found = rules(_call_p0(module, name))
    assert max(found.values()) is Severity.CRITICAL, found


def test_a_parameter_rebuilt_with_backward_hooks_is_tampering() -> None:
    # _rebuild_parameter(data, requires_grad, backward_hooks): a non-empty hooks dict
    # runs its function on every backward pass (the incident's negated gradients).
    hooks = b"ccollections\nOrderedDict\n)RI0\ncbuiltins\nhash\ns"
    data = b"ctorch._utils\n_rebuild_parameter\n(NI01\n" + hooks + b"tR."
    found = rules(data)
    assert found.get("TG105") is Severity.CRITICAL, found
    empty = b"ctorch._utils\n_rebuild_parameter\n(NI01\nccollections\nOrderedDict\n)RtR."
    assert "TG105" not in rules(empty)


def _stdlib_data() -> dict[str, object]:
    import array
    import datetime
    import logging
    import random
    import re
    import types
    import typing
    import zoneinfo

    return {
        "any": typing.Any,
        "optional": typing.Optional[int],  # noqa: UP045 (the pickled shape under test)
        "namespace": types.SimpleNamespace(a=1),
        "logger": logging.getLogger("x"),
        "pattern": re.compile("a", re.I),
        "flags": re.I | re.M,
        "hash": hash,
        "zoneinfo": datetime.datetime(2024, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        "utc": datetime.timezone.utc,
        "array": array.array("f", [1.0, 2.0]),
        "random": random.Random(1),
    }


@pytest.mark.parametrize("key", list(_stdlib_data()))
@pytest.mark.parametrize("proto", [2, 4, 5])
def test_standard_library_data_is_not_an_alarm(key: str, proto: int) -> None:
    found = rules(pickle.dumps({"v": _stdlib_data()[key]}, protocol=proto))
    assert not found or max(found.values()) <= Severity.MEDIUM, found


# -- adversarial review: writes into objects the process already has ------------------


@pytest.mark.parametrize(
    "data",
    [
        # getattr(torch.backends, "cudnn").__dict__.update({"deterministic": False})
        b"cbuiltins\ngetattr\n(ctorch.backends\ncudnn\nS'cudnn'\ntR(dS'deterministic'\nI00\nsb.",
        # the shared "train" logger silenced
        b"clogging\ngetLogger\n(S'train'\ntR(dS'disabled'\nI01\nsb.",
        # SETITEM on an imported mapping (a registry, os.environ-like)
        b"cmylib.registry\nHANDLERS\nS'pickle'\ncmylib.evil\nhandler\ns.",
        # a tensor's state set by BUILD: Tensor.__setstate__ installs _backward_hooks
        b"ctorch\nTensor\n)R(NI01\ncbuiltins\nhash\n(dtb.",
    ],
    ids=["getattr-build", "logger-build", "global-setitem", "tensor-build"],
)
def test_writes_into_existing_objects_are_tampering(data: bytes) -> None:
    assert rules(data).get("TG105") is Severity.CRITICAL, rules(data)


def test_reconstructor_with_a_base_class_calls_the_base() -> None:
    # copyreg._reconstructor(cls, base, state) runs base.__init__(obj, state).
    data = b"ccopyreg\n_reconstructor\n(cmylib.run\nRunner\ncmylib.run\nRunner\nS'cmd'\ntR."
    assert rules(data).get("TG112") is Severity.HIGH


def test_setitem_on_a_list_does_not_stop_the_analysis() -> None:
    # list[0] = 1 is valid for the real unpickler; what follows must still be read.
    data = b"]I0\naI0\nI1\nscposix\nsystem\n(S'true'\ntR."
    assert rules(data).get("TG101") is Severity.CRITICAL


def test_an_attribute_fetched_by_getattr_and_called_through_a_rebuild_is_critical() -> None:
    # _rebuild_from_type_v2(getattr(torch, "save"), Tensor, (0, path), None) calls torch.save.
    data = (
        b"ctorch._tensor\n_rebuild_from_type_v2\n(cbuiltins\ngetattr\n(ctorch\nnn\nS'init'\ntR"
        b"ctorch\nTensor\n(I0\nS'/tmp/x'\ntNtR."
    )
    assert rules(data).get("TG101") is Severity.CRITICAL


def test_old_numpy_random_state_pickles_are_not_an_alarm() -> None:
    # numpy < 1.17 pickled RandomState as numpy.random.__RandomState_ctor() (old gensim).
    assert rules(b"cnumpy.random\n__RandomState_ctor\n(tR.") == {"TG103": Severity.MEDIUM}


def test_build_with_a_state_only_a_custom_setstate_takes_is_a_call() -> None:
    # NEWOBJ mylib.Pipe, then BUILD with a string: object's default __setstate__ takes
    # only a dict (or a (dict, slots) pair), so Pipe.__setstate__(state) runs the state.
    custom = b"\x80\x02cmylib.pipes\nPipe\n)\x81X\x07\x00\x00\x00payloadb."
    assert rules(custom).get("TG112") is Severity.HIGH
    plain = b"\x80\x02cmylib.pipes\nPipe\n)\x81}X\x01\x00\x00\x00aK\x01sb."
    assert rules(plain) == {"TG103": Severity.MEDIUM}


@pytest.mark.parametrize("levels", [2, 4, 40])
def test_pickles_nested_in_plain_data_pickles_are_followed(levels: int) -> None:
    # Each level is a harmless dict holding the next level's bytes; past the depth
    # limit the scan says so (TG205) instead of calling the rest clean.
    data = _PAYLOAD_P0 + b"."
    for _ in range(levels):
        data = pickle.dumps({"b": data}, protocol=4)
    found = rules(data)
    assert max(found.values()) >= Severity.HIGH and "TG110" in found, found
