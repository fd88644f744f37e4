"""The committed demo model (models/assets): loads like a train.py checkpoint, draws the asked digits."""

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
MAX_BYTES = 20 * 2**20
NUM_CLASSES = 10
PER_CLASS = 5  # 50 samples, class-balanced
DDIM_STEPS = 20
CFG_SCALE = 3.0
MIN_ACCURACY = 0.9


@pytest.fixture(scope="module")
def demo():
    from models.checkpoints import build_model

    assert DEMO_CKPT.is_file(), f"{DEMO_CKPT} is missing"
    return build_model("custom", DEMO_CKPT, 32, NUM_CLASSES)


def test_demo_checkpoint_is_small_and_plain(demo):
    assert DEMO_CKPT.stat().st_size < MAX_BYTES
    obj = torch.load(DEMO_CKPT, map_location="cpu", weights_only=True)
    assert obj["class_to_idx"] == {str(d): d for d in range(NUM_CLASSES)}
    assert obj["config"]["model"] == "custom" and obj["config"]["dataset"] == "digits"
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
    from models.data import digits_classifier, digits_features

    n = NUM_CLASSES * PER_CLASS
    args = ["--model", "custom", "--ckpt", str(DEMO_CKPT), "--vae", "none", "--image-size", "32",
            "--num-classes", str(NUM_CLASSES), "--cfg-scale", str(CFG_SCALE), "--guidance-channels", "all",
            "--num-fid-samples", str(n), "--per-proc-batch-size", str(n), "--sampler", "ddim",
            "--num-sampling-steps", str(DDIM_STEPS), "--label-sampling", "balanced", "--sample-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "sample_ddp.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DIT_CPU_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    (npz,) = tmp_path.glob("*.npz")
    with np.load(npz) as batch:
        images, labels = batch["arr_0"], batch["arr_1"]
    assert images.shape == (n, 32, 32, 3) and np.bincount(labels, minlength=NUM_CLASSES).tolist() == [PER_CLASS] * 10
    accuracy = float(np.mean(digits_classifier().predict(digits_features(images)) == labels))
    assert accuracy >= MIN_ACCURACY, f"only {accuracy:.0%} of sample_ddp's demo digits show their label"

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
