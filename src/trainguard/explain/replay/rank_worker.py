"""One rank of a data-parallel replay: ``python -m trainguard.explain.replay.rank_worker``.

:func:`~trainguard.explain.replay.ranks.replay_ranks` starts one of these per
recorded rank and writes its job (ledger, run, entry point, rank, port, key)
on stdin.  The process joins the gloo group, replays its rank through
:func:`~trainguard.explain.replay.engine.replay` and writes the report (or the
error) as JSON where the job says.

Apart from :mod:`.ranks` because the engine uses :class:`~.ranks.Ranks`
while this entry point uses the engine: together they were an import cycle.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from trainguard.errors import TrainguardError
from trainguard.explain.replay.engine import replay
from trainguard.explain.replay.ranks import join_group
from trainguard.explain.replay.result import report_to_dict


def main(job: dict[str, Any]) -> None:
    import torch.distributed as dist

    join_group(job["port"], job["rank"], job["world_size"])
    result: dict[str, Any]
    try:
        key = bytes.fromhex(job["key"]) if job["key"] else None
        report = replay(
            job["ledger"], job["run_id"], job["entry"], rank=job["rank"], key=key, **job["options"]
        )
        result = {"report": report_to_dict(report)}
        dist.barrier()  # leave together (gloo's teardown with a departed peer can abort)
    except TrainguardError as exc:
        result = {"error": str(exc)}
    with open(job["out"], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.stdin.read(1 << 20)))
