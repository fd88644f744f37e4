"""train.py --objective flow: SiT's flow matching, its checkpoints sampled as family sit, one-line refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FOLDER_CLASSES, TINY_SIZE, load_ckpt

from models import training as T
from models.training import TrainConfig, TrainError, checkpoint_path


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(objective="flow", model="DiT-XL/2"), "--model SiT-XL/2"),
        (dict(model="SiT-B/4"), "--objective flow"),
        (dict(objective="flow", model="SiT-B/4", use_kl=True), "--use-kl"),
        (dict(objective="flow", model="SiT-B/4", timestep_sampler="loss-second-moment"), "--timestep-sampler"),
        (dict(objective="flow", model="SiT-B/4", noise_offset=0.1), "--noise-offset"),
        (dict(objective="rectified"), "--objective rectified"),
    ],
)
def test_objective_flags_are_checked_in_one_line(overrides, flag):
    cfg = TrainConfig(dataset="digits", **overrides)
    with pytest.raises(TrainError) as err:
        T.validate(cfg)
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_flow_loss_draws_t_and_noise_from_the_seeded_generator_and_trains_sits_target():
    """t ~ U[0,1] then the noise, from the global generator; the network sees 1 - t and learns x - noise."""
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def net(x_t, t_net, y=None):
        seen.update(x_t=x_t, t_net=t_net, y=y)
        return torch.zeros_like(x_t)

    torch.manual_seed(7)
    terms = T.flow_loss(net, x, {"y": torch.arange(4)})
    torch.manual_seed(7)
    t, noise = torch.rand(4), torch.randn_like(x)
    s = (1 - t).view(-1, 1, 1, 1)  # SiT's time: x_t = s x + (1 - s) noise
    torch.testing.assert_close(seen["t_net"], 1 - t)
    torch.testing.assert_close(seen["x_t"], s * x + (1 - s) * noise)
    expected = ((x - noise) ** 2).mean(dim=(1, 2, 3))  # zero output against the target x - noise
    torch.testing.assert_close(terms["loss"], expected)
    assert torch.equal(terms["raw_loss"], terms["loss"])


def test_flow_run_writes_a_sit_checkpoint_that_samples(tiny_config, train_run):
    from diffusion.flow import FlowSampler
    from models.checkpoints import build_model
    from models.sit import SiT

    cfg = tiny_config(objective="flow", learn_sigma=False, max_steps=4, ckpt_every=4, sample_every=4,
                      sample_steps=2, sample_cfg=2.0)
    assert train_run(cfg) == 0
    path = checkpoint_path(cfg.results_dir, 4)
    obj = load_ckpt(path)
    assert obj["config"]["objective"] == "flow" and obj["config"]["family"] == "sit"
    assert (Path(cfg.results_dir) / "samples" / "0000004.png").is_file()
    model, meta = build_model("custom", path, TINY_SIZE, len(FOLDER_CLASSES))
    assert type(model) is SiT and meta["family"] == "sit" and not meta["family_assumed"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, obj["ema"][k])
    x = FlowSampler("euler", 3, family=meta["family"])(model, torch.randn(2, 3, TINY_SIZE, TINY_SIZE),
                                                       model_kwargs={"y": torch.tensor([0, 1])})
    assert np.isfinite(x.numpy()).all()
    with pytest.raises(TrainError, match="--objective flow"):  # resuming it as a diffusion run
        train_run(dataclasses.replace(cfg, objective="diffusion", max_steps=6))
