"""launch.runtime.dist at world size 1 (no torchrun): every helper works without a process group."""

from __future__ import annotations

import torch

from launch.runtime import dist


def test_world_size_one_helpers(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist.shutdown()
    info = dist.init(use_cuda=False)
    assert (info.rank, info.world_size, info.is_main, info.device.type) == (0, 1, True, "cpu")
    t = torch.ones(3, dtype=torch.float64)
    assert dist.all_reduce_sum(t) is t and t.tolist() == [1, 1, 1]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    assert dist.rank0_first(lambda: 5) == 5 and dist.main_only(lambda: 6) == 6
    assert dist.all_reduce_counts([2.0, 0.0]) == [2.0, 0.0]
    assert dist.any_rank(True) and not dist.any_rank(False)
    dist.barrier()
    dist.shutdown()
