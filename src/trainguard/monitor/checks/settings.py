"""A module's own settings changed mid-run outside its forward (TG1318).

What a forward computes depends on more than the parameters and the code:
``Dropout.p``, ``LayerNorm.eps``, an activation chosen by name or held as a
function, a submodule (``model.drop = nn.Identity()``), and the ``training``
flag.  These are plain instance data, so the fingerprints and the identity
routes do not see them.  The invariant, with no list of module types:

* a module's public attributes may change only **inside** forward (a cache
  such as a rotary table's ``seq_len_cached`` is the module's own business),
  so each forward's start is compared with the end of the forward before it
  (or with start-up), and a child module at a name must stay the same object;
* the ``training`` flags are what ``model.eval()`` / ``model.train()`` switch
  between steps, and an evaluation pass does so honestly.  What matters is the
  flags the *training* forward ran with: the last forward with gradients
  enabled before each optimizer step must have the flags of the first step's.

Boolean attributes that flip back and forth during the first ``WARMUP``
steps are toggles of the loop and are not compared afterwards.
DistributedDataParallel's ``require_backward_grad_sync`` (``no_sync()`` around
the first micro-steps of gradient accumulation, which may begin at any step) is
judged by what it does instead: DDP reads it in each forward with gradients to
decide whether the coming backward averages the gradients across ranks, and
the locally accumulated ones are averaged by the last synced backward.  So it
may flip freely; the last forward with gradients before each optimizer step
must run with the first step's value (on), like the ``training`` flags.  A
change the loop makes on purpose (a dropout schedule, stochastic depth) is
declared: ``guard.step(changed={"drop.p": 0.0})`` (or
``changed=["drop.p"]``); ``"blocks.0.training"`` names one module's training
flag, ``"training"`` all of them (``model.apply(freeze_bn)`` from some epoch on).

Cost: at every forward's start and end, three tuples per module built and
compared in C (tens of microseconds for a model of a hundred modules; a
name-by-name comparison only when something differs).  Not seen: private
attributes (a leading underscore), and objects changed in place (a list, a
config object) that stay the same object.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor import clock
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.forwards import Change, ForwardWatch, Held, declared_names

WARMUP = 4  # optimizer steps during which flipping booleans are learnt as the loop's toggles
MAX_NAMED = 50
SYNC = "require_backward_grad_sync"  # DistributedDataParallel's gradient-sync switch

Signature = tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]]


def _signature(m: Any) -> Signature:
    d = m.__dict__
    return (tuple(d), tuple(d.values()), tuple(m._modules.values()))


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # a value whose == raises (a tensor) is not the one we saw
        return False


class SettingsCheck(Check):
    # Budget mode: the comparisons at a forward's start and end, and the training flags,
    # run at the steps the schedule draws (arm), the baseline taken at the step before's
    # pre-hook; a setting changed at a step left out is found by the baseline's comparison
    # with the state the last checked forward left (what forwards change themselves, learnt
    # at the checked ones, aside).
    unit = "settings"

    def __init__(self, model: Any, forwards: ForwardWatch) -> None:
        self.model = model
        self.held = Held()
        self._watching = True  # whether forwards now are compared (exact mode: always)
        self._watched = True  # whether this step's forwards were (set at its pre-hook)
        self._own: set[tuple[str, str]] = set()  # (module, attribute) a forward changed
        self._since: list[Change] = []  # found at arm, held at the drawn step's pre-hook
        self._said: set[str] = set()  # declared with guard.step(changed=) since the last
        self._spent = 0.0  # seconds in arm and the forward hooks (the unit's, outside)
        self.toggles: set[tuple[str, str]] = set()  # (module, attribute) flipped in warm-up
        self._seen_values: dict[tuple[str, str], set[bool]] = {}
        self._pending: dict[tuple[str, str], tuple[bool, bool]] = {}  # warm-up flips, once
        self.steps = 0
        self.signatures: list[Signature] = []
        self._walk()
        self.training_base: tuple[bool, ...] | None = None
        # DDP modules' sync switch at the last forward with gradients, and at the first step.
        self._sync_now: list[tuple[str, Any]] = []
        self._sync_base: dict[str, Any] | None = None
        self._training_now: tuple[bool, ...] | None = None  # at the last grad-enabled forward
        self._training_names: list[tuple[str, Any]] = []
        self._base_names: list[tuple[str, Any]] = []
        forwards.starts.append(self._forward_start)
        forwards.ends.append(self._take)
        self.forwards = forwards

    def _walk(self) -> None:
        """The module tree as it is now (a new list: older ones stay as they were)."""
        self.modules = list(self.model.named_modules())
        self._mods = [m for _, m in self.modules]
        self.signatures = [_signature(m) for m in self._mods]
        self._ddp = [(n, m) for n, m in self.modules if _ddp(m)]

    def _take(self) -> None:
        """At a forward's end: what the forward left is the baseline (its caches are its own)."""
        if not self._watching:
            return
        sigs = [_signature(m) for m in self._mods]
        if any(a[2] != b[2] for a, b in zip(sigs, self.signatures, strict=True)):
            self._walk()  # the forward added or replaced a submodule: watch the new tree
            return
        if sigs != self.signatures:  # what forwards change themselves (a cache): learnt
            for (mname, _), a, b in zip(self.modules, sigs, self.signatures, strict=True):
                if a != b:
                    was = dict(zip(b[0], b[1], strict=True))
                    now = dict(zip(a[0], a[1], strict=True))
                    changed = {
                        k for k in now.keys() | was.keys() if not _same(now.get(k), was.get(k))
                    }
                    self._own |= {(mname, k) for k in changed}
        self.signatures = sigs

    def outside_seconds(self) -> float:
        spent, self._spent = self._spent, 0.0
        return spent

    def arm(self, on: bool) -> None:
        """Budget mode, at step t's pre-hook: whether step t+1's forwards are compared.
        When they are, the settings now are compared with those the last compared forward
        left (a change at a step left out; what forwards change themselves aside) and are
        the baseline of t+1's first forward."""
        self._watched, self._watching = self._watching, on
        if not on:
            return
        started = clock.now()
        self._against_last()
        self._spent += clock.now() - started

    def _moved(self) -> bool:
        """Whether any module's signature differs from the last one taken."""
        now = [_signature(m) for m in self._mods]
        try:
            return not now == self.signatures
        except Exception:  # a value whose == raises: compare name by name
            return True

    def _against_last(self) -> None:
        if self._moved():
            held, self.held.changes = self.held.changes, []
            self._compare(skip=self._own)
            self._since += self.held.changes
            self.held.changes = held
            self._walk()

    def _forward_start(self, grad: bool) -> None:
        if not self._watching:
            return
        started = clock.now()
        self._start(grad)
        self._spent += clock.now() - started

    def _start(self, grad: bool) -> None:
        if self._moved():
            self._compare()
            self._walk()
        if grad:
            self._training_now = tuple([m.training for m in self._mods])
            self._training_names = self.modules
            if self._ddp:
                self._sync_now = [(n, getattr(m, SYNC, None)) for n, m in self._ddp]

    def _compare(self, skip: set[tuple[str, str]] | None = None) -> None:
        """Name what changed since the last snapshot (only when something did); ``skip``:
        (module, attribute) pairs left out."""
        step = self.steps
        found: list[tuple[str, str, Any, Any]] = []
        known = dict(self.modules)
        for (mname, m), sig in zip(self.modules, self.signatures, strict=True):
            before = {k: v for k, v in zip(sig[0], sig[1], strict=True) if not k.startswith("_")}
            now = {k: v for k, v in vars(m).items() if not k.startswith("_")}
            for k in sorted(set(now) | set(before)):
                if k == "training" or (k == SYNC and _ddp(m)):
                    continue  # judged at the optimizer step (before_step)
                old, new = before.get(k, "<absent>"), now.get(k, "<absent>")
                if _same(old, new) or (skip is not None and (mname, k) in skip):
                    continue
                if isinstance(old, bool) and isinstance(new, bool):
                    key = (mname, k)
                    if key in self.toggles:
                        continue
                    seen = self._seen_values.setdefault(key, {old})
                    if new in seen and step < WARMUP:  # flipped back: the loop's toggle
                        self.toggles.add(key)
                        self._pending.pop(key, None)
                        continue
                    seen.add(new)
                    if step < WARMUP:  # judged when the warm-up ends, unless it flips back
                        self._pending[key] = (old, new)
                        continue
                found.append((mname, k, old, new))
            for cname, child in dict(m._modules).items():
                old_child = known.get(f"{mname}.{cname}" if mname else cname)
                if old_child is not None and old_child is not child:
                    found.append((mname, cname, type(old_child).__name__, type(child).__name__))
        self._hold(found, step)

    def _hold(self, found: list[tuple[str, str, Any, Any]], step: int) -> None:
        for mname, k, old, new in found[:MAX_NAMED]:
            name = f"{mname}.{k}" if mname else k
            alert = Context(step, 0).alert(
                "TG1318",
                f"module setting changed outside forward: {name} {_short(old)} -> {_short(new)}",
                key=name,  # one aggregation group per setting (monitor/sink.py)
                module=mname or "root",
                attribute=k,
                old=_short(old),
                new=_short(new),
            )
            self.held.add(Change(name, new, alert))

    def before_step(self, ctx: Context) -> list[Alert]:
        for change in self._since:  # budget mode: found when this step was armed
            if change.name not in self._said:  # declared at a step left out: no finding
                self.held.add(change)
        self._since, self._said = [], set()
        if self._sync_now:
            self._judge_sync(ctx)
        now, names = self._training_now, self._training_names
        if now is None:
            return []
        if self.training_base is None:
            self.training_base, self._base_names = now, names
            return []
        if (
            names is not self._base_names and names != self._base_names
        ) or now == self.training_base:
            return []  # a changed module tree is named by _compare
        flipped = [
            (n or "root", a)
            for (n, _), a, b in zip(names, now, self.training_base, strict=True)
            if a != b
        ]
        shown = ", ".join(f"{n}.training={a}" for n, a in flipped[:5])
        alert = ctx.alert(
            "TG1318",
            f"the training forward ran with other training flags than at the start: {shown}",
            modules=[n for n, _ in flipped[:MAX_NAMED]],
            key="training",
            attribute="training",
        )
        for n, a in flipped:
            self.held.add(Change("training" if n == "root" else f"{n}.training", a, alert))
        return []

    def _judge_sync(self, ctx: Context) -> None:
        """The gradients of this step were averaged as at the first step: the last forward
        with gradients ran with each DDP module's sync switch as it was then."""
        if self._sync_base is None:
            self._sync_base = dict(self._sync_now)
            return
        for n, on in self._sync_now:
            was = self._sync_base.get(n, on)
            if on == was:
                continue
            name = f"{n}.{SYNC}" if n else SYNC
            alert = ctx.alert(
                "TG1318",
                f"the training forward before this optimizer step ran with {name}={on!r} "
                f"(at the first step {was!r}): DistributedDataParallel averaged this step's "
                f"gradients across ranks otherwise than at the first step",
                key=name,
                module=n or "root",
                attribute=SYNC,
                old=_short(was),
                new=_short(on),
            )
            self.held.add(Change(name, on, alert))

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        self.steps += 1
        if self.steps >= WARMUP and self._pending:  # flags that changed once in the warm-up
            pending, self._pending = self._pending, {}
            self._hold([(m, k, old, new) for (m, k), (old, new) in pending.items()], ctx.step)
        declared = declared_names(end.declared_changes)
        self._said |= set(declared)
        if declared and self._watching and self._moved():
            # Changed since the last forward (update_bn puts BatchNorm's momentum back after
            # its forwards): judged now, so a declared setting's baseline is the value the
            # loop left, not the one its own forwards saw (else TG1318 at the next step).
            self._compare()
            self._walk()
        if "training" in declared:  # the model's flags, every module's (freezing BatchNorm)
            for c in self.held.changes:
                if c.name.endswith(".training"):
                    declared.setdefault(c.name, c.value)
        out = self.held.release(ctx, declared)
        if any(n == "training" or n.endswith(".training") for n in declared):
            # Declared flags: the flags of this step's training forward are the new baseline.
            if not self._watched:  # budget mode: this step's forward was not read
                self.training_base = None  # the next compared forward's flags are the base
            elif self._training_now is not None:
                self.training_base, self._base_names = self._training_now, self._training_names
        unique: list[Alert] = []  # one alert per change: the flags of one forward share one
        for a in out:
            if all(a is not b for b in unique):
                unique.append(a)
        return [_at(a, ctx) for a in unique]

    def close(self) -> None:
        self.forwards.close()  # shared: closing twice is harmless


def _ddp(m: Any) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(m, DistributedDataParallel)


def _at(alert: Alert, ctx: Context) -> Alert:
    """The alert at the step ``guard.step`` closed (found during its forward)."""
    if alert.step == ctx.step and alert.rank == ctx.rank:
        return alert
    return Alert(alert.rule, ctx.step, ctx.rank, alert.message, alert.severity, alert.evidence)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
