"""Every malicious sample is caught at its expected severity; benign ones stay quiet.

The samples (``trainguard.samples``) are built by readable code with harmless
payloads; ``test_samples_fire.py`` proves each one really runs under its
loader. Each malicious sample carries its advisory link (``Sample.advisory``),
so every published bypass listed there is a regression test here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from trainguard import Severity, scan_file
from trainguard.samples import BENIGN, MALICIOUS, Sample

_LEVEL = {
    "clean": None,
    "low": Severity.LOW,
    "medium": Severity.MEDIUM,
    "high": Severity.HIGH,
    "critical": Severity.CRITICAL,
}


def _build(sample: Sample, tmp_path: Path) -> Path:
    # Only what building needs: scanning never needs the victim's loader
    # (keras, tensorflow) to be installed.
    missing = [m for m in sample.requires if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    return sample.build(tmp_path, tmp_path / "canary")


@pytest.mark.parametrize("sample", MALICIOUS.values(), ids=list(MALICIOUS))
def test_malicious_sample_is_detected(sample: Sample, tmp_path: Path) -> None:
    path = _build(sample, tmp_path)
    result = scan_file(path)
    expected = _LEVEL[sample.expect]
    assert expected is not None
    summary = [(f.rule, str(f.severity), f.member, f.trigger) for f in result.findings]
    assert result.verdict is not None and result.verdict >= expected, (sample.advisory, summary)
    assert not (tmp_path / "canary").exists()


@pytest.mark.parametrize("sample", BENIGN.values(), ids=list(BENIGN))
def test_benign_sample_has_no_false_alarm(sample: Sample, tmp_path: Path) -> None:
    path = _build(sample, tmp_path)
    result = scan_file(path)
    assert result.error is None, result.error
    allowed = _LEVEL[sample.expect] or Severity.LOW
    summary = [(f.rule, str(f.severity), f.message) for f in result.findings]
    assert result.verdict is None or result.verdict <= allowed, summary
    if sample.expect == "medium":
        assert result.verdict == Severity.MEDIUM, summary


def test_real_library_files_slice_has_no_high_finding(tmp_path: Path) -> None:
    """A slice of bench/benign_corpus.py: files torch, scikit-learn and scipy write themselves."""
    import importlib.util as iu

    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    spec = iu.spec_from_file_location(
        "benign_corpus", Path(__file__).resolve().parent.parent / "bench" / "benign_corpus.py"
    )
    assert spec is not None and spec.loader is not None
    corpus = iu.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    corpus.build_generated(tmp_path, small=True, only=("torch", "sklearn", "scipy"))
    from trainguard import scan

    report = scan([tmp_path])
    assert len(report.files) >= 20
    loud = [
        (f.path, x.rule, x.trigger)
        for f in report.files
        for x in f.findings
        if x.severity >= Severity.HIGH or f.error
    ]
    assert not loud, loud
