"""A model buffer changed between a step's end and the next forward (TG1317).

Registered buffers (nanoGPT's causal mask, rotary and positional tables,
BatchNorm's running statistics) and tensors a module keeps as plain
attributes are training state as much as the weights: a forward reads them.
Some change honestly, and always inside a forward (BatchNorm's statistics and
``num_batches_tracked``, an EMA codebook, a cache grown for a longer
sequence), or inside backward (a checkpointed block's forward re-run).  None
changes between the end of an optimizer step and the start of the next
forward: that is where the loop's own code runs, and where the red team
zeroed half of a mask.  The invariant, with no list of module types:

    the buffers at the first forward after optimizer step t are the buffers
    at the end of step t: the same tensors, the same names, the same bits.

At the end of each step (the optimizer's post-hook) the buffers are read
again by name, every module walked (a buffer replaced or added is seen), and
fingerprinted with the parameters' own keyed fingerprint; at the next
forward's start the same is compared.  Version counters and tensor identity
are compared too: they name an in-place write at no cost.

In budget mode the whole comparison is the schedule's unit ``buffers``, armed a
step ahead: for a drawn step t+1 the buffers are taken at the end of step t and
compared at t+1's first forward, as above; at the ends of the other steps nothing
is read.  The buffers taken for a drawn step are also compared with those at the
last compared forward, but for the buffers a compared forward changed itself
(BatchNorm's statistics): a buffer edited in a window left out, and left so, is
found at the next drawn step.  An edit put back (or rewritten by the forward
after it) within a window left out is not seen (docs/watch.md).  A loop that
changes a buffer on purpose between steps declares it: ``guard.step(changed=["pos_table"])``.

A forward without gradients (an evaluation pass between steps) is compared
like the training forward, and the comparison is armed again at its end.

Not seen: a change made between two gradient-enabled forwards of one step
(gradient accumulation) with a write that bypasses the version counter
(``buf.data``, a NumPy view), and a buffer of a module that is not reachable
from the watched model.
"""

from __future__ import annotations

from typing import Any

from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check, StepEnd
from trainguard.monitor.fingerprint import Fingerprint, Fingerprinter
from trainguard.monitor.forwards import Change, ForwardWatch, Held, declared_names

MAX_NAMED = 50


class BufferCheck(Check):
    unit = "buffers"

    def __init__(self, model: Any, fp: Fingerprinter, forwards: ForwardWatch) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.fp = fp
        self.held = Held()
        # Taken at a step's end, compared at the next forward's start (None: nothing due).
        self._armed: tuple[Fingerprint | None, dict[str, tuple[Any, int]]] | None = None
        self.checked = 0  # boundaries compared with full fingerprints
        self._attrs: dict[int, tuple[Any, list[str]]] = {}  # module id -> (module, tensor attrs)
        self._seen_at_step, self._unseen, self._told = 0, 0, False  # forwards seen (_blind)
        forwards.starts.append(self._forward_start)
        forwards.ends.append(self._forward_end)
        self.forwards = forwards
        # A forward without gradients (an evaluation pass between steps) used the armed
        # comparison; nothing honest changes a buffer between its end and the next forward
        # (no backward follows it), so the comparison is armed again at its end: the red
        # team's write after an evaluation pass went unseen until the next step's end.
        self._rearm: bool | None = None  # None: nothing to re-arm; else take full fingerprints
        # Budget mode: the buffers a compared forward changed itself (BatchNorm's statistics),
        # the fingerprint at the last step compared, and whether steps were left out since.
        self._own: set[str] = set()
        self._at_start: dict[str, tuple[Any, int]] | None = None
        self._last: tuple[int, Fingerprint] | None = None
        self._left_out = False
        self._said: set[str] = set()  # declared with guard.step(changed=) since then
        self._since: list[Change] = []  # found at the arming, held at the drawn forward
        self._next = True  # whether the next step is drawn (exact mode: always)
        self._sampled = False  # budget mode (armed by the schedule): learn what forwards change
        self._start_fp: Fingerprint | None = None  # at a compared forward's start (learning)
        self._steps = 0  # steps ended (the step the last compared forward belongs to)

    def tensors(self) -> list[tuple[str, Any]]:
        """Every buffer and plain tensor attribute of every module, by name, as installed now."""
        out = []
        for mname, m in self.model.named_modules():
            prefix = f"{mname}." if mname else ""
            for k, b in m._buffers.items():
                if b is not None:
                    out.append((prefix + k, b))
            for k in self._plain_tensors(m):
                v = m.__dict__.get(k)
                if v is not None:
                    out.append((prefix + k, v))
        return out

    def _plain_tensors(self, m: Any) -> list[str]:
        """The attributes of ``m`` that held a tensor (not a parameter) when first seen: a
        tensor attribute added later is a new setting, which SettingsCheck names."""
        found = self._attrs.get(id(m))
        if found is None or found[0] is not m:
            tensor, param = self.torch.Tensor, self.torch.nn.Parameter
            names = [
                k for k, v in vars(m).items() if isinstance(v, tensor) and not isinstance(v, param)
            ]
            found = self._attrs[id(m)] = (m, names)
        return found[1]

    @staticmethod
    def _cheap(named: list[tuple[str, Any]]) -> dict[str, tuple[Any, int]]:
        return {n: (t, t._version) for n, t in named}

    def after_step(self, ctx: Context) -> list[Alert]:
        blind = self._blind(ctx)
        if blind is not None:
            return blind
        self._baseline(ctx)
        return []

    def arm(self, on: bool) -> None:
        """Budget mode, at step t's pre-hook: whether step t+1 is drawn, i.e. whether the
        window from t's end to t+1's forward is compared."""
        self._next, self._sampled = on, True

    def _baseline(self, ctx: Context) -> None:
        """At a step's end: the buffers the next forward is compared with, when the next
        step is drawn (exact mode: always); after steps left out, also compared with the
        buffers at the last compared forward (a buffer edited in a window left out, and
        left so, is found at the next drawn step)."""
        if not self._next:
            self._armed, self._left_out = None, True
            return
        named = self.tensors()
        full = self.fp.fingerprint(named) if named else None
        self._armed = (full, self._cheap(named))
        if full is not None and self._left_out and self._last is not None:
            self._since_last(ctx, full)
        self._left_out = False

    def _since_last(self, ctx: Context, full: Fingerprint) -> None:
        """The buffers at the last compared forward against ``full`` (now), but for those
        a compared forward changed itself; held until the drawn step's forward."""
        assert self._last is not None
        since, was = self._last
        for name in [n for n in was.changed(full) if n not in self._own][:MAX_NAMED]:
            alert = ctx.alert(
                "TG1317",
                f"buffer {name} changed after step {since}, outside the forwards compared, "
                "and is still changed (its bits)",
                tensors=[name],
                reason="changed since the last step compared",
            )
            self._since.append(Change(name, None, alert, by_value=False))

    def _blind(self, ctx: Context) -> list[Alert] | None:
        """None when forwards are seen; else (once) a TG1315 saying these checks are off.

        A forward traced by ``torch.compile`` runs no Python hook on the model: after two
        optimizer steps without a forward start seen, the compiled wrapper is looked for
        and hooked; without one, the buffers and module settings are not checked (and no
        more fingerprints are taken for nothing) until a forward is seen."""
        if self.forwards.seen != self._seen_at_step:
            self._seen_at_step, self._unseen = self.forwards.seen, 0
            return None
        self._unseen += 1
        if self._unseen < 2:
            return None
        if self._unseen == 2 and self.forwards.adopt_compiled():
            return None  # the compiled wrapper's hooks see the next forward
        if self._unseen in (2, 3) and self.forwards.adopt_submodules():
            return None  # a loop that calls the layers, not the root
        self._armed = None
        if self._told:
            return []
        self._told = True
        return [
            ctx.alert(
                "TG1315",
                "no forward of the watched model or of its layers was seen for several steps "
                "(a forward compiled without a wrapper the guard can find runs no Python "
                "hook): buffers (TG1317) and module settings (TG1318) are not checked until "
                "one is seen",
                check="BufferCheck, SettingsCheck",
            )
        ]

    def skipped(self, ctx: Context) -> list[Alert]:
        # Budget mode, a step the schedule leaves out: nothing compared at the next forward
        # (identity and versions of every buffer at every step were a fixed cost of it).
        blind = self._blind(ctx)
        if blind is not None:
            return blind
        self._baseline(ctx)
        return []

    def _forward_start(self, grad: bool) -> None:
        if self._armed is None:
            return
        full, cheap = self._armed
        self._armed = None
        self._rearm = None if grad else full is not None
        named = self.tensors()
        now = self._cheap(named)
        if self._sampled:
            self._at_start = now
        start = self._judge(full, cheap, named, now)
        if start is not None:
            self._start_fp = start if self._sampled else None
        for change in self._since:  # budget mode: found at the arming, released now
            if change.name not in self._said:  # declared at a step left out: no finding
                self.held.add(change)
        self._since, self._said = [], set()

    def _judge(
        self,
        full: Fingerprint | None,
        cheap: dict[str, tuple[Any, int]],
        named: list[tuple[str, Any]],
        now: dict[str, tuple[Any, int]],
    ) -> Fingerprint | None:
        """The buffers now against those armed: each change held; the fingerprint now."""
        why: dict[str, str] = {}
        for name in sorted(set(now) | set(cheap)):
            if name not in now:
                why[name] = "removed"
            elif name not in cheap:
                why[name] = "added"
            elif now[name][0] is not cheap[name][0]:
                why[name] = "replaced by another tensor"
            elif now[name][1] != cheap[name][1]:
                why[name] = "written in place"
        start = None
        if full is not None:
            self.checked += 1
            start = self.fp.fingerprint(named)
            for name in full.changed(start):
                why.setdefault(name, "its bits changed")
            self._last = (self._steps, start)
        tensors = dict(named)
        for name, reason in sorted(why.items())[:MAX_NAMED]:
            alert = Context(0, 0).alert(
                "TG1317",
                f"buffer {name} changed between the end of the optimizer step (or of an "
                f"evaluation forward after it) and the next forward ({reason})",
                tensors=[name],
                reason=reason,
            )
            self.held.add(Change(name, tensors.get(name), alert, by_value=False))
        return start

    def _forward_end(self) -> None:
        if self._at_start is not None:  # what a compared forward changes is its own
            was, self._at_start = self._at_start, None
            named = self.tensors()
            for name, (t, version) in self._cheap(named).items():
                if name not in was or was[name][0] is not t or was[name][1] != version:
                    self._own.add(name)
            if self._start_fp is not None:  # BatchNorm's statistics move no version counter
                self._own |= set(self._start_fp.changed(self.fp.fingerprint(named)))
                self._start_fp = None
        if self._rearm is None:
            return
        named = self.tensors()
        full = self.fp.fingerprint(named) if self._rearm and named else None
        self._armed, self._rearm = (full, self._cheap(named)), None

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        declared = declared_names(end.declared_changes)
        self._said |= set(declared)
        if declared and self._armed is not None:
            # Written since the last forward (PreciseBN copies its averaged statistics in
            # after its forwards): judged now, so what the loop declared is what it left,
            # and the next forward is compared with that (else TG1317 at the next step).
            full, cheap = self._armed
            named = self.tensors()
            start = self._judge(full, cheap, named, self._cheap(named))
            self._armed = (start, self._cheap(named))
        self._steps = ctx.step + 1
        out = self.held.release(ctx, declared)
        return [
            a
            if a.rule == "TG1316"
            else Alert(a.rule, ctx.step, ctx.rank, a.message, a.severity, a.evidence)
            for a in out
        ]

    def close(self) -> None:
        self.forwards.close()  # shared: closing twice is harmless
