"""User policy: extra allowed globals and severity changes, from a TOML file.

```toml
[allow]
globals = ["mypkg.models.Net", "mypkg.layers"]   # exact names or whole modules

[severity]
TG103 = "low"       # any rule id -> critical|high|medium|low|info

[ignore]
rules = ["TG109"]   # drop these findings entirely (use sparingly)
```
Denied globals stay critical whatever the policy says: an allowlist entry can
vouch for a user's own classes, not for ``os.system``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainguard.errors import PolicyError
from trainguard.findings import Finding, Severity
from trainguard.rules import RULES


@dataclass(frozen=True)
class Policy:
    allow_globals: frozenset[str] = frozenset()
    severity: dict[str, Severity] = field(default_factory=dict)
    ignore: frozenset[str] = frozenset()

    def apply(self, findings: list[Finding]) -> list[Finding]:
        out = []
        for f in findings:
            if f.rule in self.ignore:
                continue
            if f.rule in self.severity:
                f = replace(f, severity=self.severity[f.rule])
            out.append(f)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        # Imported here: most scans have no policy file.
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - exercised on Python 3.10 only
            import tomli as tomllib
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise PolicyError(f"cannot read policy {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy {path} is not valid TOML: {exc}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, object], source: str = "policy") -> Policy:
        problems: list[str] = []
        unknown = set(data) - {"allow", "severity", "ignore"}
        if unknown:
            problems.append(f"unknown section(s): {', '.join(sorted(unknown))}")
        allow = _table(data, "allow", problems)
        globals_ = allow.get("globals", [])
        if not isinstance(globals_, list) or not all(isinstance(g, str) for g in globals_):
            problems.append("[allow] globals must be a list of strings")
            globals_ = []
        severity: dict[str, Severity] = {}
        for rule_id, value in _table(data, "severity", problems).items():
            if rule_id not in RULES:
                problems.append(f"[severity] unknown rule id {rule_id!r}")
            elif not isinstance(value, str):
                problems.append(f"[severity] {rule_id} must be a string")
            else:
                try:
                    severity[rule_id] = Severity.parse(value)
                except ValueError as exc:
                    problems.append(f"[severity] {rule_id}: {exc}")
        ignore = _table(data, "ignore", problems).get("rules", [])
        if not isinstance(ignore, list) or not all(isinstance(r, str) for r in ignore):
            problems.append("[ignore] rules must be a list of rule ids")
            ignore = []
        for rule_id in ignore:
            if rule_id not in RULES:
                problems.append(f"[ignore] unknown rule id {rule_id!r}")
        if problems:
            raise PolicyError(f"invalid {source}:\n  " + "\n  ".join(problems))
        return cls(
            frozenset(g.strip().removesuffix(".*") for g in globals_), severity, frozenset(ignore)
        )


def _table(data: dict[str, object], key: str, problems: list[str]) -> dict[str, object]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        problems.append(f"[{key}] must be a table")
        return {}
    return value
