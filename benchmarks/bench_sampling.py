"""Sampling benchmark: images/s, model FLOP/s and utilisation, host time per step outside the model.

    python benchmarks/bench_sampling.py --model tiny --latent-size 8 --batch-size 4 --steps 4 --batches 1 \
        --repeats 1 --variants fp32,bf16                                   # CI-sized, CPU, seconds
    python benchmarks/bench_sampling.py --device meta --model DiT-XL/2 --variants fp32   # host overhead only
    python benchmarks/bench_sampling.py --device cuda --model DiT-XL/2 --batch-size 32 --steps 50 \
        --peak-tflops 989 --stages                                           # on a GPU node (H100 bf16 dense)

A DiT (`--model`: any of the 12 configurations, or `tiny`; random weights: speed does not depend on them)
on latents of `--latent-size` (32 = 256 px), DDPM with classifier-free guidance (scale 1.5, the batch is
doubled inside each model call), per-sample noise streams (SampleNoise) as in sample_ddp.py. Variants:
fp32, tf32 (TF32 matmuls/convolutions on CUDA), bf16 (autocast), bf16+compile (torch.compile) and
bf16+compile-ro (mode reduce-overhead: CUDA graphs). The first batch of each run warms up (and compiles;
its time is reported once as warmup_s). Each run prints one JSON line:
  images_per_s            images per second per device (wall time, the whole sampling loop)
  model_tflops            DiT's analytic FLOPs (2 x multiply-adds, guided batch) / time inside the model
  achieved_tflops         the same FLOPs / wall time; utilisation = achieved / --peak-tflops
  outside_ms_per_step     wall time per step not spent in the model (device time on CUDA, via events)
  outside_share           that time as a share of the step: what the device waits for the host
`--device meta` runs the model on the meta device (nothing is computed): wall time is then pure host
work, and outside_ms_per_step is the host cost of the loop itself. `--stages` adds per-image times of
the VAE decode (SD-VAE architecture, random weights), PNG encoding and Inception features (skipped
without local weights). Variants run interleaved, `--repeats` rounds (a shared machine drifts); a summary
line per variant gives the median.
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

import torch

from diffusion.guidance import guided_model
from diffusion.rng import SampleNoise, sample_seed
from diffusion.samplers import DDPM, Sampler
from evaluation.batches import write_png
from models.dit import DiT, DiT_models

DEFAULT_MODEL = "DiT-S/2"
TINY = "tiny"
TINY_ARCH = dict(depth=2, hidden_size=64, patch_size=2, num_heads=2)
LATENT_SIZE = 32  # 256 px / the VAE's factor 8
VAE_FACTOR = 8
LATENT_CHANNELS = 4
NUM_CLASSES = 1000
CFG_SCALE = 1.5
FREQUENCY_FEATURES = 256  # DiT's timestep embedding input width
ADALN_CHUNKS, FINAL_ADALN_CHUNKS = 6, 2
VARIANTS = ("fp32", "tf32", "bf16", "bf16+compile", "bf16+compile-ro")
COMPILE_MODES = {"compile": "default", "compile-ro": "reduce-overhead"}
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=LATENT_CHANNELS,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TERA = 1e12


def dit_macs_per_sample(model: DiT) -> int:
    """Multiply-adds of one DiT forward for one sample (the DiT paper's "Gflops": 118.6 G for XL/2 at 256)."""
    d, tokens = model.hidden_size, model.x_embedder.num_patches
    p2 = model.patch_size**2
    mlp = model.blocks[0].mlp.fc1.out_features
    block = ADALN_CHUNKS * d * d + 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * mlp
    embed = tokens * p2 * model.in_channels * d + FREQUENCY_FEATURES * d + d * d
    final = FINAL_ADALN_CHUNKS * d * d + tokens * d * p2 * model.out_channels
    return embed + model.depth * block + final


class TimedModel:
    """Wraps the network: counts samples and the time spent inside (CUDA events on CUDA, host clock else)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.cuda = model, device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.samples, self.host_seconds, self.events = 0, 0.0, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.samples += x.shape[0]
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.model(x, t, y)
            end.record()
            self.events.append((start, end))
            return out
        begin = time.perf_counter()
        out = self.model(x, t, y)
        self.host_seconds += time.perf_counter() - begin
        return out

    def seconds(self) -> float:
        """Time inside the model since reset() (call after the device has synchronised)."""
        return self.host_seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1000


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args: argparse.Namespace, device: torch.device) -> DiT:
    make = DiT_models.get(args.model) or (lambda **kw: DiT(**TINY_ARCH, **kw))
    with torch.device(device) if device.type == "meta" else contextlib.nullcontext():  # meta: no memory
        return make(input_size=args.latent_size, num_classes=NUM_CLASSES).to(device).eval()


def sample_batch(sampler: Sampler, model_fn, args: argparse.Namespace, b: int, device: torch.device) -> torch.Tensor:
    """One batch as the sampler draws it: label, x_T and every step's noise from sample i's generator."""
    indices = range(b * args.batch_size, (b + 1) * args.batch_size)
    noise = SampleNoise([sample_seed(0, i) for i in indices])
    y = noise.randint(NUM_CLASSES).to(device)
    z = noise.randn((LATENT_CHANNELS, args.latent_size, args.latent_size), device)
    return sampler(model_fn, z, noise=noise, model_kwargs={"y": y}, clip_denoised=False)


def run_variant(name: str, net: torch.nn.Module, macs: int, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    timed = TimedModel(net, device)
    model_fn = guided_model(timed, CFG_SCALE, NUM_CLASSES, "first3")
    sampler = Sampler(DDPM, args.steps)
    bf16 = name.startswith("bf16") and device.type != "meta"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    with autocast:
        start = time.perf_counter()
        sample_batch(sampler, model_fn, args, 0, device)  # warm-up (and compile)
        synchronize(device)
        warmup = time.perf_counter() - start
        timed.reset()
        start = time.perf_counter()
        for b in range(1, args.batches + 1):
            sample_batch(sampler, model_fn, args, b, device)
        synchronize(device)
        wall = time.perf_counter() - start
    inside, steps = timed.seconds(), args.batches * args.steps
    flops = 2 * macs * timed.samples
    result = {"variant": name, "images_per_s": round(args.batches * args.batch_size / wall, 3),
              "warmup_s": round(warmup, 2), "model_ms_per_step": round(1000 * inside / steps, 3),
              "outside_ms_per_step": round(1000 * (wall - inside) / steps, 3),
              "outside_share": round((wall - inside) / wall, 4)}
    if device.type != "meta":
        result.update(model_tflops=round(flops / inside / TERA, 4), achieved_tflops=round(flops / wall / TERA, 4))
        if args.peak_tflops:
            result["utilisation"] = round(flops / wall / TERA / args.peak_tflops, 4)
    return result


def stage_times(args: argparse.Namespace, device: torch.device) -> dict:
    """Per-image milliseconds of the VAE decode, the PNG encoding and the Inception features."""
    from diffusers import AutoencoderKL  # seconds to import: only with --stages

    from evaluation.inception import InceptionExtractor, InceptionWeightsError, resolve_weights
    from models.vae import LatentCodec

    n = args.batch_size
    codec = LatentCodec(AutoencoderKL(**SD_VAE).to(device).eval(), device)
    z = torch.randn(n, LATENT_CHANNELS, args.latent_size, args.latent_size, device=device)
    codec.decode(z[:1])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    images = codec.decode(z).numpy()  # uint8 NHWC on the host: waits for the device
    out = {"image_size": args.latent_size * VAE_FACTOR, "vae_decode_ms": 1000 * (time.perf_counter() - start) / n}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for i, image in enumerate(images):
            write_png(Path(tmp) / f"{i:06d}.png", image)
        out["png_ms"] = 1000 * (time.perf_counter() - start) / n
    try:
        extractor = InceptionExtractor(resolve_weights(allow_download=False), device)
    except InceptionWeightsError as exc:
        out["features_ms"] = f"skipped: {str(exc)[:80]}"
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}
    extractor.extract(images[:1])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    extractor.extract(images)
    synchronize(device)
    out["features_ms"] = 1000 * (time.perf_counter() - start) / n
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", type=int, default=2, help="timed batches per run (after one warm-up batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="DDPM steps")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N], or meta (host work only)")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=[*DiT_models, TINY])
    p.add_argument("--latent-size", type=int, default=LATENT_SIZE)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for utilisation")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over the variants")
    p.add_argument("--stages", action="store_true", help="also time VAE decode, PNG and features per image")
    args = p.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = build_model(args, device)
    macs = dit_macs_per_sample(base)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(json.dumps({"machine": platform.processor() or platform.machine(), "gpu": gpu, "threads": args.threads,
                      "torch": torch.__version__, "model": args.model, "latent_size": args.latent_size,
                      "gmacs_per_forward": round(macs / 1e9, 3), "steps": args.steps,
                      "batch_size": args.batch_size, "cfg_scale": CFG_SCALE}), flush=True)
    names = args.variants.split(",")
    nets = {name: base for name in names}
    for name in names:
        mode = COMPILE_MODES.get(name.partition("+")[2])
        if mode is not None and device.type != "meta":
            nets[name] = torch.compile(base, mode=mode)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            try:
                result = run_variant(name, nets[name], macs, args)
            except Exception as exc:  # report and go on (e.g. no compiler for torch.compile)
                print(json.dumps({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
                continue
            results[name].append(result)
            print(json.dumps(result), flush=True)
    for name, runs in results.items():
        if runs:
            keys = [k for k, v in runs[0].items() if isinstance(v, float)]
            print(json.dumps({"summary": name, "runs": len(runs),
                              **{k: statistics.median(r[k] for r in runs) for k in keys}}), flush=True)
    if args.stages:
        print(json.dumps({"stages_per_image": stage_times(args, device)}), flush=True)


if __name__ == "__main__":
    main()
