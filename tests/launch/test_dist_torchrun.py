"""launch.runtime.dist under torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from launch.runtime import dist

    info = dist.init(timeout_s=60)
    out = {"rank": info.rank, "world": info.world_size}
    t = torch.full((2,), float(info.rank + 1), dtype=torch.float64)
    out["sum"] = dist.all_reduce_sum(t).tolist()
    parts = dist.all_gather_tensor(torch.arange(info.rank + 1))
    out["gathered"] = [p.tolist() for p in parts]
    out["shared"] = dist.rank0_shares(lambda: {"from": dist.rank()})
    out["counts"] = dist.sum_over_ranks([1.0, float(info.rank)])
    out["progress"] = dist.all_reduce_progress(3, info.rank == 1)

    def fails_on_rank0():
        if dist.rank() == 0:
            raise FileNotFoundError("offline: pass --ckpt")
        return "never reached"

    try:
        dist.rank0_then_others(fails_on_rank0)
    except FileNotFoundError as exc:
        out["error"] = str(exc)

    import time
    def fetch():  # a "download": the node's processes must take turns, with no collective
        start = time.time()
        time.sleep(0.5)
        return [start, time.time()]
    dist.barrier()
    out["fetch"] = dist.node_first(fetch, "probe")
    dist.shutdown()
    out["after"] = [dist.group_size(), dist.sum_over_ranks([5.0])]
    with open(sys.argv[1] + f".{info.rank}", "w") as f:
        json.dump(out, f)
''')


def test_collectives_and_rank0_failure_reach_every_rank(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reports = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert (rep["rank"], rep["world"]) == (r, 2)
        assert rep["sum"] == [3.0, 3.0]
        assert rep["gathered"] == [[0], [0, 1]]
        assert rep["shared"] == {"from": 0}
        assert rep["counts"] == [2.0, 1.0]
        assert rep["progress"] == [6, True]  # one rank asked to stop: every rank stops
        assert rep["error"] == "offline: pass --ckpt"
        assert rep["after"] == [1, [5.0]]  # after shutdown: no group, collectives are no-ops
    (a0, a1), (b0, b1) = sorted(rep["fetch"] for rep in reports)
    assert a1 <= b0  # node_first: one process at a time on the node
