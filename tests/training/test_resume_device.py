"""Resume on the training device: the optimizer state must follow the parameters (issue 10, item 1).

No GPU is needed: a float64 move stands in for the move to CUDA. `Optimizer.load_state_dict` puts every state
tensor on its parameter's device and dtype at load time, so a state loaded before the networks move stays
behind (on the CPU, in float32) and the first `opt.step()` on a GPU fails.
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
