"""Turn what the symbolic pickle machine saw into findings.

Data flows one way: bytes -> :mod:`picklevm` events -> findings here.  The
severity of an import comes from :mod:`pickle_globals`; the shape checks here
catch payloads that use only allowed imports (calls on computed callables,
attribute writes on classes, in-place edits of tensors while loading).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from trainguard.findings import Finding, Severity
from trainguard.rules import finding
from trainguard.scanner.picklevm.calls import (
    CallIndex,
    existing_object,
    judge,
    known_reconstructor,
    qualname,
)
from trainguard.scanner.picklevm.machine import (
    Call,
    ExtRef,
    Global,
    ListV,
    Opaque,
    PickleEvents,
    describe,
)
from trainguard.scanner.picklevm.names import NESTED_LOADERS, classify
from trainguard.scanner.picklevm.probe import Probe, probe_head
from trainguard.scanner.picklevm.tensors import is_tensor, state_issues

# Scans embedded bytes as a file of their own and returns its findings.
NestedScanner = Callable[[bytes, str], list[Finding]]

_CONTAINER_CALLS = frozenset(["append", "setitem", "additems"])


@dataclass(frozen=True)
class PickleContext:
    """What the surrounding format tells us about how the pickle will be loaded."""

    persistent_ids_expected: bool = False  # PyTorch checkpoints resolve storages this way
    allow: frozenset[str] = frozenset()


def _finding(
    rule_id: str,
    message: str,
    offset: int | None,
    trigger: str = "",
    severity: Severity | None = None,
    **evidence: str,
) -> Finding:
    return finding(
        rule_id, message, offset=offset, trigger=trigger, severity=severity, evidence=evidence
    )


def analyse(
    ev: PickleEvents, ctx: PickleContext = PickleContext(), nested: NestedScanner | None = None
) -> list[Finding]:
    return list(_analyse(ev, ctx, nested))


def _analyse(
    ev: PickleEvents, ctx: PickleContext, nested: NestedScanner | None
) -> Iterator[Finding]:
    yield from _globals(ev, ctx)

    for off, text in ev.dynamic_globals:
        yield _finding(
            "TG104",
            f"an import whose module or name is computed at load time "
            f"({text}); plain checkpoints never do this",
            off,
            trigger=text,
        )

    for call in ev.calls:
        yield from _call_shape(call)

    for build in ev.builds:
        if is_tensor(build.obj):
            yield _finding(
                "TG105",
                "BUILD sets state on a tensor while loading (torch never writes this; it "
                "can attach hooks or attributes to weights)",
                build.offset,
                trigger="BUILD",
                state=describe(build.state),
            )
        elif existing_object(build.obj) and not isinstance(build.obj, Global):
            yield _finding(
                "TG105",
                f"BUILD writes attributes onto an object that already exists in the loading "
                f"process ({describe(build.obj)}), changing it for everything that uses it",
                build.offset,
                trigger=describe(build.obj),
                state=describe(build.state),
            )
        elif isinstance(build.obj, Global):
            yield _finding(
                "TG105",
                f"BUILD writes attributes onto {build.obj.qualname} itself (a class or "
                "module), changing code for everything that uses it after loading",
                build.offset,
                trigger=build.obj.qualname,
                state=describe(build.state),
            )

    for issue in state_issues(ev):
        what = "backward hooks" if issue.what == "hooks" else "attribute state"
        yield _finding(
            "TG105",
            f"a tensor or Parameter is rebuilt with {what} ({issue.detail}) by an allowlisted "
            "rebuild function: it acts after loading (a hook runs on every backward pass)",
            issue.offset,
            trigger=issue.what,
            severity=None if issue.acts_later else Severity.MEDIUM,
        )

    if ev.persistent_ids and not ctx.persistent_ids_expected:
        first = ev.persistent_ids[0]
        yield _finding(
            "TG109",
            f"{len(ev.persistent_ids)} persistent id reference(s); "
            "what they load depends on the loading code",
            first.offset,
            trigger=describe(first.pid),
        )
    for ext in ev.extensions:
        yield _finding(
            "TG106",
            f"extension code {ext.code} resolves to a callable chosen by "
            "the loading process's copyreg registry",
            ext.offset,
            trigger=f"EXT {ext.code}",
        )

    if nested is not None:
        yield from _nested(ev, nested)

    if ev.limit is not None:
        yield _finding("TG002", f"pickle analysis stopped: {ev.limit}", ev.error_offset)
    elif ev.error is not None:
        yield _finding(
            "TG107",
            f"the pickle stream is broken ({ev.error}); a loader runs "
            "everything before this point and then fails",
            ev.error_offset,
        )


def _globals(ev: PickleEvents, ctx: PickleContext) -> Iterator[Finding]:
    index = CallIndex(ev, ctx.allow)
    seen: set[str] = set()
    for g in ev.globals:
        verdict = classify(g.module, g.name, ctx.allow)
        if verdict.severity is None:
            continue  # allowlisted by trainguard or by the user's policy: calls included
        name = qualname(g)
        if name in seen:
            continue  # one finding per distinct import; the first offset is the useful one
        seen.add(name)
        verdict, call = judge(g, verdict, index)
        if verdict.severity is None:
            continue
        evidence = {"import": g.qualname}
        if call is not None:
            evidence["call"] = describe(call)
        message = verdict.reason
        if call is not None and verdict.severity >= Severity.HIGH and verdict.rule != "TG112":
            message += f"; it is called as {describe(call)}"
        yield _finding(
            verdict.rule,
            message,
            g.offset,
            trigger=g.qualname,
            severity=verdict.severity,
            **evidence,
        )


def _call_shape(call: Call) -> Iterator[Finding]:
    func = call.func
    if call.kind in _CONTAINER_CALLS:
        target = call.args[0] if isinstance(call.args, tuple) and call.args else None
        if is_tensor(target):
            yield _finding(
                "TG105",
                f"{call.kind.upper()} on a tensor while loading: writes into its "
                "data (the CVE-2026-24747 technique)",
                call.offset,
                trigger=call.kind,
            )
        elif existing_object(target):
            yield _finding(
                "TG105",
                f"{call.kind.upper()} on an object that already exists in the loading process "
                f"({describe(target)}): writes into it for everything that uses it",
                call.offset,
                trigger=call.kind,
            )
        return
    if isinstance(func, Global):
        return
    if isinstance(func, Opaque) and func.what == "dynamic global":
        return  # already reported where the import was computed
    if isinstance(func, ExtRef):
        return  # reported as TG106
    if known_reconstructor(call):
        return  # getattr(ZoneInfo, "_unpickle")(key, 1): how the stdlib pickles it
    yield _finding(
        "TG104",
        f"calls a value computed at load time: {describe(call)}",
        call.offset,
        trigger=describe(func),
    )


_MAX_BUILT_BYTES = 1 << 20


def _constant_bytes(func: str, first: object) -> bytes | None:
    """The bytes a call builds from constants, evaluated without running it (bounded).

    Protocols 0-2 write bytes as ``_codecs.encode(text, "latin1")``; a payload may
    spell them ``bytes([112, 105, ...])`` (the red team's nested_1) or
    ``str.encode(text)`` so that no byte string appears in the file.
    """
    if func in ("_codecs.encode", "codecs.encode") and isinstance(first, str):
        return first[:_MAX_BUILT_BYTES].encode("latin-1", "replace")
    if func in ("builtins.str.encode", "__builtin__.str.encode") and isinstance(first, str):
        return first[:_MAX_BUILT_BYTES].encode("utf-8", "replace")
    if func in ("builtins.bytes", "builtins.bytearray", "__builtin__.bytearray"):
        items = first.items if isinstance(first, ListV) else first
        if isinstance(items, (list, tuple)) and 0 < len(items) <= _MAX_BUILT_BYTES:
            if all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 256 for x in items):
                return bytes(items)
    return None


def _nested(ev: PickleEvents, scan: NestedScanner) -> Iterator[Finding]:
    # Byte strings a loader may unpickle later (pickle.loads of a field, numpy
    # object arrays, torch's _load_from_bytes): any protocol, any header.  The
    # probe keeps raw data (array bytes) from costing a nested scan; a pickle of
    # plain data is scanned too, since it may carry the next nested pickle.
    payloads: list[tuple[bytes, int, int]] = []
    for n in ev.nested:
        complete = not n.length
        if probe_head(n.data, complete=complete) is not Probe.REJECTS:
            payloads.append((n.data, n.offset, n.length))
    for call in ev.calls:
        if not (isinstance(call.func, Global) and isinstance(call.args, tuple) and call.args):
            continue
        first = call.args[0]
        if call.func.qualname in NESTED_LOADERS and isinstance(first, bytes):
            payloads.append((first, call.offset, 0))
        else:
            raw = _constant_bytes(call.func.qualname, first)
            if raw is not None and probe_head(raw, complete=True) is not Probe.REJECTS:
                payloads.append((raw, call.offset, 0))
    done: set[bytes] = set()
    for data, off, length in payloads:
        if data in done:
            continue  # the same string reached twice (as text, then via _codecs.encode)
        done.add(data)
        inner = scan(data, f"nested@{off}")
        if length:
            inner = [f for f in inner if f.rule != "TG107"]  # the cut is ours, not the data's
            yield _finding(
                "TG110",
                f"a byte string of {length} bytes at offset {off}, too long to analyse "
                "whole, starts with a pickle that a nested pickle.loads would execute",
                off,
                trigger="nested",
            )
        if any(f.severity >= Severity.MEDIUM for f in inner):
            yield from inner
            worst = max(f.severity for f in inner)
            if worst >= Severity.HIGH:
                yield _finding(
                    "TG110",
                    f"a byte string at offset {off} is itself a checkpoint with {worst} findings",
                    off,
                    trigger="nested",
                )
