"""TorchScript archives are judged on the operators their code calls.

Real archives come from ``torch.jit.script``/``trace`` (benign, quiet); the
hostile ones are the same layout with code a TorchScript compiler accepts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainguard import Severity, scan_file
from trainguard.samples.zipwriter import ZipMember, write_zip

_HEAD = """class M(Module):
  __parameters__ = []
  __buffers__ = []
  training : bool
  def forward(self: __torch__.M,
    x: Tensor) -> Tensor:
"""


def _archive(path: Path, body: str) -> Path:
    members = [
        ZipMember("m/data.pkl", b"\x80\x02}q\x00."),
        ZipMember("m/code/__torch__.py", (_HEAD + body).encode()),
        ZipMember("m/constants.pkl", b"\x80\x02)."),
        ZipMember("m/version", b"3\n"),
    ]
    return write_zip(path, members)


@pytest.mark.parametrize(
    ("body", "worst"),
    [
        ('    y = torch.from_file("/tmp/x", True, 4)\n    return x\n', Severity.CRITICAL),
        ('    return ops.aten.save(x, "/tmp/x")\n', Severity.CRITICAL),
        ("    return ops.mylib.run_shell(x)\n", Severity.HIGH),
    ],
)
def test_file_and_custom_operators_are_found(body: str, worst: Severity, tmp_path: Path) -> None:
    result = scan_file(_archive(tmp_path / "m.pt", body))
    found = [f for f in result.findings if f.rule == "TG113"]
    assert found and max(f.severity for f in found) is worst, result.findings


def test_aten_arithmetic_is_quiet(tmp_path: Path) -> None:
    body = "    return torch.add(x, torch.sum(ops.aten.relu(x)))\n"
    result = scan_file(_archive(tmp_path / "m.pt", body))
    assert not [f for f in result.findings if f.rule == "TG113"]


def test_real_scripted_and_traced_modules_pass_the_default(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    torch.jit.save(torch.jit.script(net), tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 4)), tmp_path / "traced.pt")
    for name in ("scripted.pt", "traced.pt"):
        result = scan_file(tmp_path / name)
        assert result.verdict is None or result.verdict <= Severity.MEDIUM, result.findings
