"""Explain what happened to a run: checkpoint forensics (``diff/``), bit-exact replay
(``replay/``) and the run report (``report/``).  Data only: render/ draws it."""
