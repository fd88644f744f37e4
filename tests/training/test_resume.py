"""Resuming at scale: state on the training device, one checkpoint choice for all ranks, memory-mapped loads.

Device, without a GPU: a float64 move stands in for the move to CUDA.
`Optimizer.load_state_dict` puts every state tensor on its parameter's device and dtype at load time, so a
state loaded before the networks move stays behind (on the CPU, in float32) and the first `opt.step()` on a
GPU fails.
"""

from __future__ import annotations

import torch


def test_resumed_optimizer_state_has_its_parameters_device_and_dtype(tiny_config, train_run, monkeypatch):
    import train
    from models.training import checkpoint_path

    first = tiny_config(max_steps=2, ckpt_every=2)
    assert train_run(first) == 0
    monkeypatch.setattr(train, "to_device", lambda module, device: module.to(device=device, dtype=torch.float64))
    cfg = tiny_config(max_steps=4, resume="auto")
    device = torch.device("cpu")
    state = train.build_state(cfg, train.prepare_data(cfg, device), device, checkpoint_path(cfg.results_dir, 2))
    assert state.step == 2
    checked = 0
    for group in state.opt.param_groups:
        for param in group["params"]:
            assert param.dtype == torch.float64  # the stand-in move happened
            state_of_param = state.opt.state[param]
            for name in ("exp_avg", "exp_avg_sq"):
                value = state_of_param[name]
                assert (value.device, value.dtype) == (param.device, param.dtype), name
                checked += 1
    assert checked == 2 * sum(len(g["params"]) for g in state.opt.param_groups) > 0
    for p, e in zip(state.model.parameters(), state.ema.parameters()):
        assert p.dtype == e.dtype == torch.float64
    # the resumed state takes a step without a device or dtype mismatch
    for p in state.model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    state.opt.step()


def test_only_rank_0_lists_the_checkpoints(tiny_config, monkeypatch):
    """Every rank resumes from the path rank 0 found: the others never list the folder."""
    from pathlib import Path

    import train

    listed = []
    monkeypatch.setattr(train.T, "latest_checkpoint", lambda results: listed.append(results) or Path("own.pt"))
    cfg = tiny_config(resume="auto")
    assert train.resume_path(cfg, Path(cfg.results_dir)) == Path("own.pt") and len(listed) == 1  # rank 0
    # another rank: launch.runtime.dist.rank0_shares hands it rank 0's answer without running the listing
    monkeypatch.setattr(train.dist, "rank0_shares", lambda fn: Path("checkpoints/0000400.pt"))
    assert train.resume_path(cfg, Path(cfg.results_dir)) == Path("checkpoints/0000400.pt") and len(listed) == 1


def test_checkpoints_load_memory_mapped(tiny_config, train_run, monkeypatch, tmp_path):
    from models import training

    assert train_run(tiny_config(max_steps=1, ckpt_every=1)) == 0
    path = training.checkpoint_path(tiny_config().results_dir, 1)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(training.torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    obj = training.load_training_checkpoint(path)
    assert calls[-1]["mmap"] is True and calls[-1]["weights_only"] is True
    # a file in torch's legacy (non-zip) format cannot be mapped: it still loads, read into memory
    legacy = tmp_path / "legacy.pt"
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    again = training.load_training_checkpoint(legacy)
    assert calls[-1]["mmap"] is False and again["step"] == 1
    for name, value in obj["model"].items():
        assert torch.equal(again["model"][name], value)
