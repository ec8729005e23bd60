"""``trainguard verify-run``: recompute sampled segments of a run while it trains.

A separate, long-lived process (:class:`~trainguard.explain.verifier.follow.Verifier`)
follows a run's ledger and checkpoints, picks segments at random with a secret
the training process never sees (:mod:`.sampling`), replays each picked segment
through the honest entry point (:mod:`trainguard.explain.replay`) and writes
its verdicts, signed with its own key, to a chain of its own in the ledger.
"""
