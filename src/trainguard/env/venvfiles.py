"""The virtual environment's own files outside the site folders, which set up the
interpreter before any site folder is read (red_env2 A2, A3, A6).

* ``pyvenv.cfg``'s ``home`` names the interpreter, whose standard library is what
  ``import ctypes`` runs: a home inside the venv is a standard library nothing
  verifies (``--stdlib`` compares its compiled files with its sources, not the sources
  with anything), so it is TG629 high; a home that is not
  a folder too.  ``include-system-site-packages = true`` puts folders this verify
  did not look at on ``sys.path``: TG629 medium, naming them.
* ``bin/python*`` must lead to that interpreter: a link whose target is in
  ``home``'s folder, or a copy byte for byte of one there.  A script (a wrapper that
  runs code, then ``exec``\\ s the real one) or a link elsewhere is TG629 high.
* ``bin/activate*`` is compared with what the standard library's own ``venv`` module
  (the home interpreter's, read from its files) writes for this venv: only the venv's
  folder, its name, the prompt and the interpreter path may differ, and they may
  hold no quote, ``$``, backtick or backslash (no shell can run them).  Any other
  difference is TG629 high (an ``export LD_PRELOAD=...`` line runs code in every
  activated shell); a script made for another folder (a copied venv) is medium:
  activating it puts that folder's ``bin`` first on ``PATH``.  Venvs made by other
  tools (``virtualenv``, ``uv``: their ``pyvenv.cfg`` says so) write other scripts,
  which are not compared (TG629 low says so).

The verdict cache fingerprints these files (see :func:`fingerprint_paths`), so an
edit to any of them is never answered by a stale verdict.
"""

from __future__ import annotations

import hashlib
import os
import re

from trainguard.env.findings import finding
from trainguard.findings import Finding, Severity

MAX_CFG_BYTES = 64 * 1024
MAX_SCRIPT_BYTES = 1024 * 1024
_PYTHON = re.compile(r"python(?:[0-9]+(?:\.[0-9]+)*)?(?:\.exe)?\Z")
_ACTIVATE = re.compile(r"activate", re.IGNORECASE)
_SAFE = r"[^\n\"'`$\\]*"  # a placeholder's value: nothing a shell expands or ends
_OTHER_TOOLS = ("virtualenv", "uv")


def venv_of(root: str) -> str | None:
    """The venv whose site folder ``root`` is (``lib/pythonX.Y/site-packages`` or
    ``Lib/site-packages``), if it has a ``pyvenv.cfg``."""
    for up in (3, 2):
        folder = root
        for _ in range(up):
            folder = os.path.dirname(folder)
        if os.path.isfile(os.path.join(folder, "pyvenv.cfg")):
            return folder
    return None


def read_cfg(venv: str) -> dict[str, str]:
    """``pyvenv.cfg`` as ``site`` reads it: ``key = value`` lines, keys lower-cased."""
    out: dict[str, str] = {}
    try:
        with open(os.path.join(venv, "pyvenv.cfg"), "rb") as f:
            text = f.read(MAX_CFG_BYTES).decode("utf-8", "replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip().lower()] = value.strip()
    return out


def _bin(venv: str) -> str:
    return os.path.join(venv, "Scripts" if os.name == "nt" else "bin")


def fingerprint_paths(venv: str) -> list[str]:
    """What the verdict cache must see change: the cfg, the bin folder's interpreters and
    activate scripts, and what the interpreters resolve to."""
    paths = [os.path.join(venv, "pyvenv.cfg")]
    try:
        names = sorted(os.listdir(_bin(venv)))
    except OSError:
        names = []
    for name in names:
        if _PYTHON.match(name) or _ACTIVATE.search(name):
            path = os.path.join(_bin(venv), name)
            paths.append(path)
            if os.path.islink(path):
                paths.append(os.path.realpath(path))
    return paths


def _inside(path: str, folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top + os.sep)


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _interpreter_findings(venv: str, home: str) -> list[Finding]:
    out: list[Finding] = []
    try:
        names = sorted(n for n in os.listdir(_bin(venv)) if _PYTHON.match(n))
        ours = sorted(n for n in os.listdir(home) if _PYTHON.match(n))
    except OSError:
        names, ours = [], []
    # The home interpreters, by where they resolve to (Homebrew's home links elsewhere).
    real = {os.path.realpath(os.path.join(home, n)) for n in ours}
    digests: set[str | None] | None = None
    for name in names:
        path = os.path.join(_bin(venv), name)
        target = os.path.realpath(path)
        linked = os.path.islink(path)
        if linked and target in real and os.path.isfile(target):
            continue
        if not linked:
            if digests is None:  # a copied interpreter (venv --copies): same bytes
                digests = {_sha256(p) for p in real} - {None}
            if _sha256(path) in digests:
                continue
        out.append(
            finding(
                "TG629",
                f"{name} does not lead to the interpreter pyvenv.cfg's home names ({home}): "
                f"it {'links to ' + target if linked else 'is a file of its own'}, "
                "and every run of it runs that first",
                path,
                target=target[:200],
                home=home[:200],
            )
        )
    return out


def _template_folder(home: str, cfg: dict[str, str]) -> str | None:
    version = ".".join(cfg.get("version", cfg.get("version_info", "")).split(".")[:2])
    prefix = os.path.dirname(os.path.realpath(home))
    for folder in (
        os.path.join(prefix, "lib", f"python{version}", "venv", "scripts"),
        os.path.join(prefix, "Lib", "venv", "scripts"),
    ):
        if os.path.isdir(folder):
            return folder
    return None


def _templates(folder: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for sub in ("common", "nt" if os.name == "nt" else "posix"):
        try:
            names = os.listdir(os.path.join(folder, sub))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(folder, sub, name), "rb") as f:
                    out[name] = f.read(MAX_SCRIPT_BYTES).decode("utf-8", "replace")
            except OSError:
                continue
    return out


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(__VENV_(?:DIR|NAME|PROMPT|BIN_NAME|PYTHON)__)", template)
    out = []
    for part in parts:
        if part == "__VENV_DIR__":
            out.append(f"({_SAFE})")
        elif part == "__VENV_BIN_NAME__":
            out.append("(?:bin|Scripts)")
        elif part.startswith("__VENV_") and part.endswith("__"):
            out.append(f"(?:{_SAFE})")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out), re.DOTALL)


def _activate_findings(venv: str, cfg: dict[str, str], home: str) -> list[Finding]:
    try:
        names = sorted(n for n in os.listdir(_bin(venv)) if _ACTIVATE.search(n))
    except OSError:
        return []
    if not names:
        return []
    tool = next((t for t in _OTHER_TOOLS if t in cfg), None)
    folder = _template_folder(home, cfg) if tool is None else None
    if folder is None:
        why = f"made by {tool}" if tool else "the home interpreter's venv templates are not found"
        return [
            finding(
                "TG629",
                f"the activate scripts are not compared ({why}): activating runs what they hold",
                _bin(venv),
                severity=Severity.LOW,
            )
        ]
    templates = _templates(folder)
    out: list[Finding] = []
    for name in names:
        path = os.path.join(_bin(venv), name)
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_SCRIPT_BYTES + 1).decode("utf-8", "replace")
        except OSError as exc:
            text = f"\0unreadable: {exc}"
        template = templates.get(name)
        match = _pattern(template).fullmatch(text) if template is not None else None
        if match is None:
            why = (
                "is not"
                if template is not None
                else "is a script the venv module never writes, not"
            )
            out.append(
                finding(
                    "TG629",
                    f"{why} what the standard library's venv module writes for this venv "
                    "(only its folder, name, prompt and interpreter path may differ): "
                    "every shell that activates the venv runs it",
                    path,
                )
            )
        elif any(os.path.realpath(d) != os.path.realpath(venv) for d in match.groups()):
            other = next(d for d in match.groups() if os.path.realpath(d) != os.path.realpath(venv))
            out.append(
                finding(
                    "TG629",
                    f"activates another folder ({other[:200]}), whose bin then comes first "
                    "on PATH (a copied venv?)",
                    path,
                    severity=Severity.MEDIUM,
                    folder=other[:200],
                )
            )
    return out


def venv_findings(venv: str, roots: list[str]) -> list[Finding]:
    """TG629 for the venv's interpreter, configuration and activate scripts."""
    cfg_path = os.path.join(venv, "pyvenv.cfg")
    cfg = read_cfg(venv)
    home = cfg.get("home", "")
    if not home or not os.path.isdir(home):
        return [
            finding(
                "TG629",
                f"pyvenv.cfg's home ({home or 'missing'}) is not a folder: which interpreter "
                "and standard library run is not known",
                cfg_path,
            )
        ]
    out: list[Finding] = []
    if _inside(home, venv):
        out.append(
            finding(
                "TG629",
                f"pyvenv.cfg's home ({home}) is inside the venv: the interpreter and standard "
                "library every run uses live where nothing verifies them (a snapshot taken "
                "before would)",
                cfg_path,
                home=home[:200],
            )
        )
    if cfg.get("include-system-site-packages", "false").lower() == "true":
        out.append(
            finding(
                "TG629",
                "include-system-site-packages = true: the base interpreter's site folders are "
                "on sys.path too, and this verify did not look at them (name them with --path)",
                cfg_path,
                severity=Severity.MEDIUM,
            )
        )
    out.extend(_interpreter_findings(venv, home))
    out.extend(_activate_findings(venv, cfg, home))
    return out
