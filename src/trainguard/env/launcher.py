"""Console scripts are written at install time: regenerate each from its entry point.

An installer writes a launcher for each ``console_scripts``/``gui_scripts`` entry point
from a fixed template (pip, distlib, installer and uv each have one or two): a header
naming the interpreter, then a body that imports the entry point's object and calls it.
:func:`launcher_problem` rebuilds every known template from the entry point and compares
the script with them byte for byte; the only part allowed to vary is the interpreter
path, which must name this environment's interpreter and be quoted the way the
installer quotes it.  Anything else (an option after the interpreter, shell code in the
``/bin/sh`` trampoline's exec line, a line added to the body) is not a launcher.
"""

from __future__ import annotations

import configparser
import os
import re
import sys

MAX_SCRIPT_BYTES = 64 * 1024
_PYTHON = re.compile(r"python[0-9.]*w?(\.exe)?")
_CODING = "# -*- coding: utf-8 -*-\n"
# The interpreter path of a plain shebang: no blank (the kernel splits the line there,
# passing the rest as an option), no quote, nothing a shell would expand.
_PLAIN = re.compile(rb"[^\s\"'\\$`]+")
# The /bin/sh trampoline that distlib (pip) and installer write when the path is too
# long or holds a space.  distlib quotes the path with "...", installer with
# shlex.quote ('...', or bare when every character is safe): nothing in it may expand.
_TRAMPOLINE = re.compile(
    rb"#!/bin/sh\n'''exec' "
    rb"(?:\"(?P<dq>[^\"$`\\\n]+)\"|'(?P<sq>[^'\n]+)'|(?P<bare>[\w@%+=:,./-]+))"
    rb" \"\$0\" \"\$@\"\n' '''\n"
)
# uv's relocatable form: the interpreter beside the script, found at run time.
_RELOCATABLE = re.compile(
    rb"#!/bin/sh\n'''exec' \"\$\(dirname -- \"\$\(realpath -- \"\$0\"\)\"\)\"/"
    rb"'(?P<exe>python[0-9.]*)' \"\$0\" \"\$@\"\n' '''\n"
)


def entry_points(text: str) -> dict[str, str]:
    """Script name -> ``module:object`` of an ``entry_points.txt``'s ``console_scripts``
    and ``gui_scripts`` (empty when it does not parse)."""
    groups = entry_point_groups(text)
    out: dict[str, str] = {}
    for section in ("console_scripts", "gui_scripts"):
        out.update(groups.get(section, {}))
    return out


def entry_point_groups(text: str) -> dict[str, dict[str, str]]:
    """Group -> name -> ``module:object`` (extras dropped) of an ``entry_points.txt``
    (empty when it does not parse)."""
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # names keep their case
    try:
        parser.read_string(text)
    except configparser.Error:
        return {}
    return {
        section: {k: v.split("[")[0].strip() for k, v in parser.items(section)}
        for section in parser.sections()
    }


def interpreter_problem(line: str, script: str) -> str | None:
    """The shebang must name this environment's interpreter: one beside the script
    (a venv's bin/) or the one running trainguard."""
    command = line[2:]
    if not _PYTHON.fullmatch(os.path.basename(command)):
        return f"its shebang runs {command[:120]!r}, not a Python interpreter"
    if not os.path.isabs(command):
        # uv's relocatable form: the interpreter beside the script, by name.
        command = os.path.join(os.path.dirname(os.path.realpath(script)), command)
    # A venv's launchers name the python beside them; pip --prefix/--target and system
    # installs name the interpreter that ran pip, which is the one verifying (or the
    # same binary: a system python and its /usr/bin/python3 link).
    if os.path.dirname(command) == os.path.dirname(script) or command == sys.executable:
        return None
    if os.path.realpath(command) == os.path.realpath(sys.executable):
        return None
    return f"its shebang runs {command[:120]!r}, not this environment's interpreter"


def body_after_shebang(data: bytes) -> tuple[str, bytes] | None:
    """(``#!`` and the interpreter path, the rest) of a script whose header is one an
    installer writes (a shebang naming only an interpreter, or the ``/bin/sh``
    trampoline); None otherwise."""
    if not data.startswith(b"#!"):
        return None
    for pattern in (_TRAMPOLINE, _RELOCATABLE):
        match = pattern.match(data)
        if match is not None:
            found = [g for g in match.groups() if g]
            return "#!" + found[0].decode("utf-8", "replace"), data[match.end() :]
    first, newline, rest = data.partition(b"\n")
    if not newline or not _PLAIN.fullmatch(first[2:]):
        return None
    return first.decode("utf-8", "replace"), rest


def launcher_bodies(module: str, attr: str) -> list[bytes]:
    """Every body a known installer writes for the entry point ``module:attr``."""
    name = attr.split(".")[0]
    call = f"    sys.exit({attr}())\n"
    imp = f"from {module} import {name}\n"
    resub = "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
    main = "if __name__ == '__main__':\n"
    uv_argv = (
        '    if sys.argv[0].endswith("-script.pyw"):\n'
        "        sys.argv[0] = sys.argv[0][:-11]\n"
        '    elif sys.argv[0].endswith(".exe"):\n'
        "        sys.argv[0] = sys.argv[0][:-4]\n"
    )
    bodies = [
        # pip 24.1 and later (its own template, without re)
        "import sys\n" + imp + main + "    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n" + call,
        # pip before 24.1, and distlib's older template
        _CODING + "import re\nimport sys\n" + imp + main + resub + call,
        # distlib's later template: the import inside the main block
        _CODING + "import re\nimport sys\n" + main + "    " + imp + resub + call,
        # installer (pdm, poetry, hatch) and older uv: the same, with double quotes
        _CODING
        + "import re\nimport sys\n"
        + imp
        + main.replace("'", '"')
        + resub.replace("'", '"')
        + call,
        # uv
        _CODING + "import sys\n" + imp + main.replace("'", '"') + uv_argv + call,
    ]
    # Some versions leave the coding line out.
    bodies += [b[len(_CODING) :] for b in bodies if b.startswith(_CODING)]
    return [b.encode() for b in bodies]


def launcher_problem(path: str, data: bytes, target: str) -> str | None:
    """Why ``data`` (the script at ``path``) is not what an installer writes for the
    entry point ``target`` (``module:object``), or None."""
    if len(data) > MAX_SCRIPT_BYTES:
        return "larger than any launcher"
    module, _, obj = (part.strip() for part in target.partition(":"))
    if not module or not obj:
        return f"its entry point {target!r} is not module:object"
    split = body_after_shebang(data)
    if split is None:
        return (
            "its header is not one an installer writes (a shebang naming only an "
            "interpreter, or the /bin/sh trampoline)"
        )
    problem = interpreter_problem(split[0], path)
    if problem is not None:
        return problem
    if split[1] not in launcher_bodies(module, obj):
        return f"its body is not the launcher an installer writes for {module}:{obj}"
    return None
