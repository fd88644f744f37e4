"""Sampling throughput: our loop (per-sample generators + background PNG writer) vs the plain loop.

    python benchmarks/bench_sampling.py --batches 2 --batch-size 8 --steps 8 --repeats 3
    python benchmarks/bench_sampling.py --device cuda --model DiT-XL/2 --batch-size 32 --steps 50 \
        --variants plain,ours,ours+tf32,ours+bf16,ours+compile      # on a GPU node

By default a DiT-S/2 (`--model`: any of the 12 configurations; random weights: speed does not depend
on them) on 32x32x4 latents, the shape at 256 px, with classifier-free guidance (the batch doubles
inside the model call). The VAE decode is left out: it is the same in every variant. Variants:
  plain       global torch.randn for all noise, no PNG writing (the floor)
  plain+sync  global RNG, PNGs encoded synchronously in the loop (what the official script does)
  ours        SampleNoise per-sample generators + PngWriter background threads
  ours+tf32   ours with TF32 matmuls and convolutions (CUDA; the same as ours on CPU)
  ours+bf16   ours under bf16 autocast
  ours+compile ours with torch.compile(model)
The variants run interleaved, `--repeats` rounds (a shared machine drifts by more than the 5% we look
for); prints one JSON line per run, then one summary line per variant: best and median images/s and
the median's cost relative to `plain`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion import create_diffusion
from diffusion.guidance import guided_model
from diffusion.rng import SampleNoise, sample_seed
from evaluation.batches import PngWriter
from models.dit import DiT_models
from models.vae import to_uint8_nhwc

DEFAULT_MODEL = "DiT-S/2"
LATENT_SIZE = 32  # 256 px / the VAE's factor 8
NUM_CLASSES = 1000
CFG_SCALE = 1.5


def to_images(x: torch.Tensor) -> np.ndarray:
    return to_uint8_nhwc(x[:, :3]).numpy()  # first 3 of 4 channels stand in for a decoded image


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(name: str, model: torch.nn.Module, args: argparse.Namespace, out: Path) -> dict:
    device = torch.device(args.device)
    diffusion = create_diffusion(str(args.steps))
    model_fn = guided_model(model, CFG_SCALE, NUM_CLASSES, "first3")
    shape = (args.batch_size, 4, LATENT_SIZE, LATENT_SIZE)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in name else contextlib.nullcontext())
    tf32 = "tf32" in name
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    writer = PngWriter(workers=2) if name.startswith("ours") else None
    torch.manual_seed(0)
    timings = []
    for b in range(args.batches + 1):  # batch 0 warms up (and compiles)
        start = time.perf_counter()
        indices = range(b * args.batch_size, (b + 1) * args.batch_size)
        if writer is not None:
            noise = SampleNoise([sample_seed(0, i) for i in indices])
            y = noise.randint(NUM_CLASSES).to(device)
            z = noise.randn(shape[1:], device)
            noise_fn = noise
        else:
            y = torch.randint(NUM_CLASSES, (args.batch_size,), device=device)
            z = torch.randn(shape, device=device)
            noise_fn = torch.randn_like
        with autocast:
            x = diffusion.p_sample_loop(model_fn, shape, noise=z, clip_denoised=False, model_kwargs={"y": y},
                                        noise_fn=noise_fn)
        images = to_images(x.float())  # to the CPU: waits for the device
        if writer is not None:
            for i, img in zip(indices, images):
                writer.submit(out / f"{i:06d}.png", img)
        elif name == "plain+sync":
            for i, img in zip(indices, images):
                Image.fromarray(img).save(out / f"{i:06d}.png")
        if b > 0:
            timings.append(time.perf_counter() - start)
    if writer is not None:
        start = time.perf_counter()
        writer.close()
        timings[-1] += time.perf_counter() - start  # the writes still in flight count
    synchronize(device)
    seconds = sum(timings)
    return {"variant": name, "images": args.batches * args.batch_size, "seconds": round(seconds, 2),
            "images_per_s": round(args.batches * args.batch_size / seconds, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(DiT_models))
    p.add_argument("--variants", default="plain,plain+sync,ours,ours+bf16,ours+compile")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the variants")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = DiT_models[args.model](input_size=LATENT_SIZE, num_classes=NUM_CLASSES).to(device).eval()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(json.dumps({"machine": platform.processor() or platform.machine(), "gpu": gpu, "threads": args.threads,
                      "torch": torch.__version__, "model": args.model, "steps": args.steps,
                      "batch_size": args.batch_size}))
    names = args.variants.split(",")
    models = {name: torch.compile(base) if "compile" in name else base for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    result = run_variant(name, models[name], args, Path(tmp))
                except Exception as exc:  # noqa: BLE001 - report and go on (e.g. no compiler for torch.compile)
                    print(json.dumps({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
                    continue
            rates[name].append(result["images_per_s"])
            print(json.dumps(result), flush=True)
    plain = statistics.median(rates["plain"]) if rates.get("plain") else None
    for name, got in rates.items():
        if got:
            median = statistics.median(got)
            summary = {"variant": name, "runs": len(got), "best_images_per_s": max(got),
                       "median_images_per_s": round(median, 3)}
            if plain:
                summary["median_vs_plain"] = f"{100 * (median / plain - 1):+.1f}%"
            print(json.dumps({"summary": summary}), flush=True)

if __name__ == "__main__":
    main()
