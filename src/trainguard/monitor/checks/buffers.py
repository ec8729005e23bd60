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

In budget mode the fingerprints are the schedule's unit ``buffers`` (their
cost grows with the buffers); at the steps it leaves out, identity and version
counters are still compared.  A loop that changes a buffer on purpose between
steps declares it: ``guard.step(changed=["pos_table"])``.

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
        named = self.tensors()
        self._armed = (self.fp.fingerprint(named) if named else None, self._cheap(named))
        return []

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
        # Budget mode, a step the schedule leaves out: identity and versions only.
        blind = self._blind(ctx)
        if blind is not None:
            return blind
        self._armed = (None, self._cheap(self.tensors()))
        return []

    def _forward_start(self, grad: bool) -> None:
        if self._armed is None:
            return
        full, cheap = self._armed
        self._armed = None
        self._rearm = None if grad else full is not None
        named = self.tensors()
        now = self._cheap(named)
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
        if full is not None:
            self.checked += 1
            for name in full.changed(self.fp.fingerprint(named)):
                why.setdefault(name, "its bits changed")
        if not why:
            return
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

    def _forward_end(self) -> None:
        if self._rearm is None:
            return
        named = self.tensors()
        full = self.fp.fingerprint(named) if self._rearm and named else None
        self._armed, self._rearm = (full, self._cheap(named)), None

    def step_end(self, ctx: Context, end: StepEnd) -> list[Alert]:
        out = self.held.release(ctx, declared_names(end.declared_changes))
        return [
            a
            if a.rule == "TG1316"
            else Alert(a.rule, ctx.step, ctx.rank, a.message, a.severity, a.evidence)
            for a in out
        ]

    def close(self) -> None:
        self.forwards.close()  # shared: closing twice is harmless
