"""The scanner never unpickles, imports, compiles or runs what it reads.

A Python audit hook watches a scan of malicious samples in a fresh interpreter
and fails on any import, exec/compile, process or socket event that happens
during the scan itself.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import call1

_WATCHER = textwrap.dedent(
    """
    import sys, trainguard, trainguard.scanner.engine, trainguard.render
    import trainguard.render.text, trainguard.render.jsonfmt, trainguard.render.sarif
    # The scanner imports its own format modules, by fixed names, on first use:
    # load them all first so that any import seen below is one the data caused.
    from trainguard.scanner import registry; registry.preload()
    import zlib, bz2, lzma, tarfile, io, lz4.frame, py7zr
    events = []
    watching = False
    BAD = ("import", "exec", "compile", "subprocess.Popen", "os.system", "os.exec",
           "os.posix_spawn", "os.spawn", "socket.connect", "pickle.find_class", "marshal.loads",
           "ctypes.dlopen")
    def hook(event, args):
        if watching and event.startswith(BAD):
            events.append((event, repr(args)[:200]))
    sys.addaudithook(hook)
    watching = True
    report = trainguard.scan(sys.argv[1:])
    watching = False
    assert report.verdict is not None and report.verdict.name == "CRITICAL", report.verdict
    print("EVENTS", events)
    sys.exit(1 if events else 0)
    """
)


def test_scanning_malicious_files_triggers_no_exec_import_or_process(tmp_path: Path) -> None:
    import gzip
    import pickle
    import zipfile

    canary = tmp_path / "canary"
    payload = call1("os", "system", f"touch {canary}")
    (tmp_path / "a.pkl").write_bytes(payload)
    (tmp_path / "b.pkl.gz").write_bytes(gzip.compress(payload))
    with zipfile.ZipFile(tmp_path / "c.pt", "w") as z:
        z.writestr("archive/data.pkl", payload)
    exec_payload = call1("builtins", "exec", f"open({str(canary)!r}, 'w')")
    (tmp_path / "d.bin").write_bytes(pickle.dumps([1]) + exec_payload)
    proc = subprocess.run(
        [sys.executable, "-c", _WATCHER, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "EVENTS []" in proc.stdout
    assert not canary.exists()
