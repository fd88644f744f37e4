"""Check a digits demo checkpoint: class-balanced guided DDIM samples, SVM accuracy, images/s, a grid PNG.

    python benchmarks/demo_digits.py --ckpt models/assets/digits-dit.pt --per-class 20 --steps 25

Samples like sample_ddp.py (per-sample seeds, guidance on all channels, clipped x0) with the objective
stored in the checkpoint's config (epsilon or v), then classifies them with an RBF SVM fitted on the
real digits (models.data.digits_classifier).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from diffusion import guided_model
from diffusion.rng import SampleNoise, sample_seed
from diffusion.samplers import DDIM, Sampler
from models.checkpoints import build_model
from models.data import DIGITS_NUM_CLASSES, DIGITS_SIZE, digits_classifier, digits_features
from models.vae import PixelCodec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write the samples (rows of 0..9) to this PNG")
    a = p.parse_args()

    model, meta = build_model("custom", a.ckpt, DIGITS_SIZE, DIGITS_NUM_CLASSES)
    config = meta.get("config") or {}
    sampler = Sampler(
        DDIM,
        a.steps,
        learn_sigma=model.learn_sigma,
        predict_v=config.get("prediction") == "v",
        noise_schedule=config.get("noise_schedule", "linear"),
    )
    fn = guided_model(model, a.cfg_scale, DIGITS_NUM_CLASSES, channels="all")
    labels = torch.arange(DIGITS_NUM_CLASSES).repeat(a.per_class)
    codec = PixelCodec(model.in_channels)
    images = []
    start = time.perf_counter()
    for s in range(0, len(labels), a.batch_size):
        y = labels[s : s + a.batch_size]
        noise = SampleNoise([sample_seed(a.seed, i) for i in range(s, s + len(y))])
        x_T = noise.randn((model.in_channels, model.input_size, model.input_size))  # draw 1 of each stream
        with torch.no_grad():
            z = sampler(fn, x_T, noise=noise, model_kwargs={"y": y}, clip_denoised=True)
        images.append(codec.decode(z).numpy())
    seconds = time.perf_counter() - start
    images = np.concatenate(images)
    predicted = digits_classifier().predict(digits_features(images))
    per_class = [float(np.mean(predicted[labels.numpy() == c] == c)) for c in range(DIGITS_NUM_CLASSES)]
    print(
        json.dumps(
            {
                "samples": len(labels),
                "ddim_steps": a.steps,
                "cfg_scale": a.cfg_scale,
                "threads": torch.get_num_threads(),
                "seconds": round(seconds, 2),
                "images_per_s": round(len(labels) / seconds, 2),
                "accuracy": float(np.mean(predicted == labels.numpy())),
                "per_class_accuracy": per_class,
            }
        )
    )
    if a.grid:
        n, h, w, _ = images.shape
        rows = n // DIGITS_NUM_CLASSES
        grid = images[: rows * DIGITS_NUM_CLASSES].reshape(rows, DIGITS_NUM_CLASSES, h, w, 3)
        Image.fromarray(grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, DIGITS_NUM_CLASSES * w, 3)).save(
            a.grid
        )


if __name__ == "__main__":
    main()
