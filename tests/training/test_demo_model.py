"""The committed demo models (models/assets): load like train.py checkpoints, draw the asked digits.

digits-dit.pt (v-prediction DDPM) is checked against the DiT-compatible DDIM loop; digits-sit.pt (flow
matching) against Euler on the probability-flow ODE written here from the published equations of the linear
interpolant (x_t = s x + (1 - s) noise in SiT's time s, where s = 1 is data, the network's output being
dx_s/ds), independent of diffusion.flow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO_CKPT = ROOT / "models" / "assets" / "digits-dit.pt"
FLOW_CKPT = ROOT / "models" / "assets" / "digits-sit.pt"
MAX_BYTES = 20 * 2**20
NUM_CLASSES = 10
PER_CLASS = 5  # 50 samples, class-balanced
DDIM_STEPS = 20
CFG_SCALE = 3.0
MIN_ACCURACY = 0.9
FLOW_EULER_STEPS = 10
FLOW_CFG_SCALE = 1.5


def _load(ckpt: Path):
    from models.checkpoints import build_model

    assert ckpt.is_file(), f"{ckpt} is missing"
    return build_model("custom", ckpt, 32, NUM_CLASSES)


@pytest.fixture(scope="module")
def demo():
    return _load(DEMO_CKPT)


@pytest.fixture(scope="module")
def flow_demo():
    return _load(FLOW_CKPT)


def _small_and_plain(ckpt: Path) -> dict:
    """The file's config, after checking its size, its plain-tensor loading and its class map."""
    assert ckpt.stat().st_size < MAX_BYTES
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert obj["class_to_idx"] == {str(d): d for d in range(NUM_CLASSES)}
    assert obj["config"]["model"] == "custom" and obj["config"]["dataset"] == "digits"
    return obj["config"]


def _sample_ddp_digits(
    ckpt: Path, sampler: str, steps: int, cfg_scale: float, out: Path
) -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, log) of sample_ddp.py on ``ckpt``, after checking that the SVM sees the asked digits."""
    from models.data import digits_classifier, digits_features

    n = NUM_CLASSES * PER_CLASS
    args = ["--model", "custom", "--ckpt", str(ckpt), "--vae", "none", "--image-size", "32",
            "--num-classes", str(NUM_CLASSES), "--cfg-scale", str(cfg_scale), "--guidance-channels", "all",
            "--num-fid-samples", str(n), "--per-proc-batch-size", str(n), "--sampler", sampler,
            "--num-sampling-steps", str(steps), "--label-sampling", "balanced", "--sample-dir", str(out)]
    done = subprocess.run([sys.executable, "sample_ddp.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DIT_CPU_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    (npz,) = out.glob("*.npz")
    with np.load(npz) as batch:
        images, labels = batch["arr_0"], batch["arr_1"]
    assert images.shape == (n, 32, 32, 3) and np.bincount(labels, minlength=NUM_CLASSES).tolist() == [PER_CLASS] * 10
    accuracy = float(np.mean(digits_classifier().predict(digits_features(images)) == labels))
    assert accuracy >= MIN_ACCURACY, f"only {accuracy:.0%} of sample_ddp's digits from {ckpt.name} show their label"
    return images, labels, done.stdout + done.stderr


def test_demo_checkpoint_is_small_and_plain(demo):
    _small_and_plain(DEMO_CKPT)
    model, meta = demo
    assert meta["null_label"] and model.num_classes == NUM_CLASSES


def test_demo_samples_are_the_requested_digits(demo):
    """>= 90% of class-balanced guided samples get their label from an SVM fitted on the real digits."""
    from diffusion import create_diffusion, guided_model
    from diffusion.rng import SampleNoise, sample_seed
    from models.data import digits_classifier, digits_features
    from models.vae import PixelCodec

    model, meta = demo
    config = meta["config"]
    labels = torch.arange(NUM_CLASSES).repeat(PER_CLASS)
    diffusion = create_diffusion(
        f"ddim{DDIM_STEPS}", learn_sigma=model.learn_sigma, predict_v=config.get("prediction") == "v"
    )
    noise = SampleNoise([sample_seed(0, i) for i in range(len(labels))])
    fn = guided_model(model, CFG_SCALE, NUM_CLASSES, channels="all")
    shape = (len(labels), model.in_channels, model.input_size, model.input_size)
    with torch.no_grad():
        z = diffusion.ddim_sample_loop(
            fn, shape, clip_denoised=True, model_kwargs={"y": labels}, noise_fn=noise
        )
    images = PixelCodec(model.in_channels).decode(z).numpy()  # uint8 [N, 32, 32, 3]
    predicted = digits_classifier().predict(digits_features(images))
    accuracy = float(np.mean(predicted == labels.numpy()))
    assert accuracy >= MIN_ACCURACY, f"only {accuracy:.0%} of the demo samples show their digit"


def test_sample_ddp_draws_the_requested_digits_with_the_stored_objective(demo, tmp_path):
    """End to end through the sampler: it must read v-prediction from the checkpoint's config."""
    images, labels, _ = _sample_ddp_digits(DEMO_CKPT, "ddim", DDIM_STEPS, CFG_SCALE, tmp_path)
    n = len(labels)

    # The same draws by hand with the v-prediction diffusion: sample i's stream is its label draw, then x_T, ...
    from diffusion import create_diffusion, guided_model
    from diffusion.rng import SampleNoise, sample_seed
    from models.vae import PixelCodec

    model, _ = demo
    diffusion = create_diffusion(f"ddim{DDIM_STEPS}", learn_sigma=model.learn_sigma, predict_v=True)
    noise = SampleNoise([sample_seed(0, i) for i in range(n)])
    noise.randint(NUM_CLASSES)  # draw 1, the label slot (the labels here are balanced)
    fn = guided_model(model, CFG_SCALE, NUM_CLASSES, channels="all")
    with torch.no_grad():
        z = diffusion.ddim_sample_loop(fn, (n, model.in_channels, 32, 32), clip_denoised=True,
                                       model_kwargs={"y": torch.from_numpy(labels)}, noise_fn=noise)
    expected = PixelCodec(model.in_channels).decode(z).numpy().astype(np.int16)
    assert np.abs(expected - images).max() <= 1, "sample_ddp did not sample with the checkpoint's objective"


def test_flow_demo_checkpoint_is_small_plain_and_a_flow_model(flow_demo):
    config = _small_and_plain(FLOW_CKPT)
    assert (config["objective"], config["family"], config["learn_sigma"]) == ("flow", "sit", False)
    model, meta = flow_demo
    assert meta["family"] == "sit" and not meta.get("family_assumed")
    assert model.num_classes == NUM_CLASSES and not model.learn_sigma


def _flow_euler_by_hand(model, labels: torch.Tensor, x_T: torch.Tensor) -> np.ndarray:
    """SiT time s from 0 (noise) to 1 (data) in equal steps, guided velocity on all channels -> uint8 NHWC."""
    null = torch.full_like(labels, NUM_CLASSES)
    s_grid = np.linspace(0.0, 1.0, FLOW_EULER_STEPS + 1)
    x = x_T.double()
    with torch.no_grad():
        for s, s_next in zip(s_grid[:-1], s_grid[1:]):
            s_in = torch.full((2 * len(labels),), float(s), dtype=torch.float32)
            out = model(torch.cat([x, x]).float(), s_in, torch.cat([labels, null])).double()
            cond, uncond = out.chunk(2)
            x = x + (s_next - s) * (uncond + FLOW_CFG_SCALE * (cond - uncond))
    grey = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)  # DiT's and SiT's uint8 conversion
    return grey.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()  # the grey channel as RGB


def test_sample_ddp_draws_the_asked_digits_from_the_flow_demo(flow_demo, tmp_path):
    from diffusion.rng import SampleNoise, sample_seed

    images, labels, log = _sample_ddp_digits(FLOW_CKPT, "euler", FLOW_EULER_STEPS, FLOW_CFG_SCALE, tmp_path)
    assert "family sit" in log
    model, _ = flow_demo
    noise = SampleNoise([sample_seed(0, i) for i in range(len(labels))])
    noise.randint(NUM_CLASSES)  # draw 1: the label slot (the labels here are balanced)
    x_T = noise.draw((model.in_channels, 32, 32))  # draw 2: x_T
    expected = _flow_euler_by_hand(model, torch.from_numpy(labels).long(), x_T).astype(np.int16)
    assert np.abs(expected - images).max() <= 1, "sample_ddp's flow Euler differs from the published equations"
