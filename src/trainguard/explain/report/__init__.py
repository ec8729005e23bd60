"""`trainguard report`: a run's story from its ledger (data; render/ draws it)."""
