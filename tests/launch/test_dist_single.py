"""launch.runtime.dist at world size 1 (no torchrun): every helper works without a process group."""

from __future__ import annotations

import re

import pytest
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
    assert dist.rank0_then_others(lambda: 5) == 5 and dist.rank0_shares(lambda: 6) == 6
    assert dist.sum_over_ranks([2.0, 0.0]) == [2.0, 0.0]
    assert dist.all_reduce_progress(4, True) == (4, True) and dist.group_size() == 1
    dist.barrier()
    dist.shutdown()


@pytest.mark.parametrize(("env", "message"), [
    ({"WORLD_SIZE": "2"}, "RANK and WORLD_SIZE must be set together"),
    ({"RANK": "0"}, "RANK and WORLD_SIZE must be set together"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK=3 but WORLD_SIZE=2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x': expected an integer"),
    ({"DIT_CPU_THREADS": "abc"}, "DIT_CPU_THREADS='abc': expected an integer >= 1"),
    ({"DIT_CPU_THREADS": "0"}, "DIT_CPU_THREADS='0': expected an integer >= 1"),
])
def test_a_half_set_or_bad_launch_environment_is_one_line(monkeypatch, env, message):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "DIT_CPU_THREADS"):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist.shutdown()
    with pytest.raises(dist.DistConfigError, match=re.escape(message)) as info:
        dist.init(use_cuda=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), 1e300, 0.0, -5.0])
def test_a_collective_timeout_out_of_range_is_one_line(seconds):
    with pytest.raises(dist.DistConfigError, match="--dist-timeout"):
        dist.check_timeout(seconds, "--dist-timeout")
