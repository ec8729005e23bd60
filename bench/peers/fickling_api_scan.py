"""Scan one file with fickling's library API, the way its README suggests for models.

Runs inside ``bench/.venv-peers`` (it imports fickling).  The fickling CLI
(``fickling --check-safety``) only reads a bare pickle stream and answers
"No pickle files detected" for a PyTorch zip, so the benchmark also gives fickling
this fairer path: ``scan_zip_archive`` for a zip (it scans members named
``*.pkl``, ``*.pickle`` or ``*.bin``) and ``scan_file`` for anything else, both
with ``graceful=True`` so a parse error becomes a finding instead of a traceback.

Prints one JSON object: ``{"severity": NAME, "unsafe": bool, "errors": [...],
"members": {name: severity}}``.  Exit status: 0 likely safe, 1 unsafe, 2 error.
"""

from __future__ import annotations

import json
import sys
import zipfile


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: fickling_api_scan.py FILE", file=sys.stderr)
        return 2
    path = argv[1]
    import fickling
    from fickling.analysis import Severity

    try:
        if zipfile.is_zipfile(path):
            per_member = fickling.scan_zip_archive(path, graceful=True)
        else:
            per_member = {"": fickling.scan_file(path, graceful=True)}
    except Exception as exc:  # any crash is reported as the tool's error
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 2
    if not per_member:
        # A zip with no member fickling considers a pickle: nothing was analysed.
        print(json.dumps({"error": "no pickle member found", "members": {}}))
        return 2
    worst = max((r.severity for r in per_member.values()), default=Severity.LIKELY_SAFE)
    unsafe = worst > Severity.LIKELY_SAFE
    errors = [e for r in per_member.values() for e in r.errors]
    print(
        json.dumps(
            {
                "severity": worst.name,
                "unsafe": unsafe,
                "errors": errors,
                "members": {k: r.severity.name for k, r in per_member.items()},
            }
        )
    )
    return 1 if unsafe else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
