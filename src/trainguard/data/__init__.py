"""Sealed data: signed manifests of datasets, and reading samples through them.

``seal_dataset`` / ``verify_dataset`` (:mod:`.seal`) sign and check a manifest
with per-shard and per-sample digests; :class:`~.sealed.SealedDataset` reads
samples through it, checking each on read.  Import submodules directly
(``from trainguard.data.sealed import SealedDataset``): this package imports
nothing heavy.
"""
