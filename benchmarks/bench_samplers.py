"""Samplers against model evaluations (NFE) on the demo model: solver error and FID of 1,000 digits.

    python benchmarks/bench_samplers.py --ckpt models/assets/digits-dit.pt --ref demo_out/digits-ref.npz \
        --json benchmarks/results/samplers.json --plot benchmarks/results/solver-error.png
    python benchmarks/bench_samplers.py --part fid --runs ddim:25 --num-samples 500 \
        --ckpt run/checkpoints/0004000.pt run/checkpoints/0005000.pt --ref demo_out/digits-ref.npz   # checkpoints

One process: the model is loaded once (per --ckpt), Inception once, the reference statistics once.

(a) `error`: 64 fixed x_T (sample i's generator seeded as sample_ddp.py seeds index i of global seed 0,
    balanced labels), the guided probability-flow ODE (cfg --cfg-scale on all channels, no x_0 clipping)
    solved by each deterministic sampler at NFE 5..100. Solver error: RMS distance of the result to the
    same ODE solved by DPM-Solver++(2M) with --reference-steps steps, in model units ([-1, 1] = 2 x 127.5
    grey levels), over all samples and for the median sample (one sample whose trajectory ends in another
    mode can dominate the pooled number). The reference's own error is estimated by
    the same solver at --check-steps steps and, independently, by ADM's DDIM at all 1,000 training steps.
(b) `fid`: --num-samples images per run drawn exactly as README command 1 draws them (sample_ddp.py:
    balanced labels of global seed 0, per-sample generators, clipped x_0, guidance on all channels), scored
    with FID/sFID/precision/recall against --ref, and the share an RBF SVM fitted on the real digits labels
    as the requested class. Seconds: the sampling loop only (model + sampler), per 1,000 images.
(c) `speed`: the sampling loop of each run again, alone, on --speed-samples images: the seconds per 1,000
    images that the table shows (the FID part's own timing shares the cores with Inception and other load).

Runs are `sampler:NFE` (Heun: the step count whose NFE 2 x steps - 1 is the largest not above NFE).
A flow-matching checkpoint (train.py --objective flow, SiT, REPA) takes the flow samplers (default runs:
FLOW_FID_RUNS, euler-maruyama 250 first: the published protocol the others are measured against); dopri5's
NFE is adaptive and reported as the mean over the batches. The error part is DDPM-family only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion.flow import DOPRI5, EULER_MARUYAMA, FLOW_FAMILIES, FlowSampler
from diffusion.flow import EULER as FLOW_EULER
from diffusion.flow import HEUN as FLOW_HEUN
from diffusion.guidance import CHANNELS_ALL, guided_model
from diffusion.rng import BALANCED_LABELS, SampleNoise, class_labels
from diffusion.samplers import DDIM, DDPM, DPMPP_2M, DPMPP_2M_SDE, EULER, HEUN, UNIPC, Sampler
from evaluation.features import POOL, SPATIAL, FeatureAccumulator
from evaluation.inception import InceptionExtractor, resolve_weights
from evaluation.inputs import check_batch
from evaluation.metrics import METRIC_FID, METRIC_PREC, METRIC_RECALL, METRIC_SFID
from evaluation.reference_cache import DEFAULT_CACHE_DIR, Reference, load_reference
from evaluation.report import report_metrics
from launch.runtime.files import available_cpus
from models.checkpoints import build_model
from models.data import DIGITS_NUM_CLASSES, DIGITS_SIZE, digits_classifier, digits_features
from models.vae import PixelCodec

PARTS = ("error", "fid", "speed")
DETERMINISTIC = (DDIM, DPMPP_2M, UNIPC, EULER, HEUN)
ERROR_NFE = (5, 10, 15, 25, 50, 100)
FID_RUNS = (
    [f"{DDPM}:{n}" for n in (50, 100, 250)]
    + [f"{DDIM}:{n}" for n in (10, 25, 50)]
    + [f"{s}:{n}" for s in (DPMPP_2M, DPMPP_2M_SDE, UNIPC, EULER, HEUN) for n in (5, 10, 15, 25)]
)
FLOW_FID_RUNS = (
    [f"{EULER_MARUYAMA}:{n}" for n in (250, 50, 25, 15, 10)]
    + [f"{s}:{n}" for s in (FLOW_EULER, FLOW_HEUN, DPMPP_2M, UNIPC) for n in (10, 15, 25)]
    + [f"{DOPRI5}:2"]
)
METRICS = (METRIC_FID, METRIC_SFID, METRIC_PREC, METRIC_RECALL)
REFERENCE_SAMPLER = DPMPP_2M
DDIM_ALL_STEPS = 1000  # the independent check: DDIM on every training step
GLOBAL_SEED = 0
GREY_LEVELS_PER_UNIT = 127.5  # model units [-1, 1] -> uint8 grey levels
PER_THOUSAND = 1000


@dataclass
class Demo:
    """The demo network and how to sample it: its trained objective and the guided model function."""

    path: str
    model: torch.nn.Module
    objective: dict[str, Any]
    model_fn: Any
    family: str

    @property
    def flow(self) -> bool:
        return self.family in FLOW_FAMILIES


def load_demo(path: str, cfg_scale: float) -> Demo:
    """A pixel-space digits checkpoint (exported or a train.py checkpoint: its EMA weights)."""
    model, meta = build_model("custom", path, DIGITS_SIZE, DIGITS_NUM_CLASSES)
    model = model.eval().requires_grad_(False)
    config = meta.get("config") or {}
    objective = {"predict_v": config.get("prediction") == "v",
                 "noise_schedule": config.get("noise_schedule", "linear"),
                 "diffusion_steps": int(config.get("diffusion_steps", 1000))}
    return Demo(path, model, objective, guided_model(model, cfg_scale, DIGITS_NUM_CLASSES, CHANNELS_ALL),
                meta.get("family", "dit"))


def steps_for_nfe(name: str, nfe: int) -> int:
    """Sampling steps giving at most `nfe` model evaluations (Heun: 2 per step, 1 on the last)."""
    return (nfe + 1) // 2 if name == HEUN else nfe


def make_sampler(demo: Demo, name: str, steps: int) -> Sampler | FlowSampler:
    if demo.flow:
        return FlowSampler(name, steps, family=demo.family)
    return Sampler(name, steps, learn_sigma=demo.model.learn_sigma, **demo.objective)


def parse_run(text: str) -> tuple[str, int]:
    name, _, nfe = text.rpartition(":")
    return name, int(nfe)


@torch.no_grad()
def sample(demo: Demo, sampler: Sampler, indices: Sequence[int], labels: np.ndarray, clip: bool) -> torch.Tensor:
    """x_0 [B, C, H, W] float32 of global `indices`, each from its own generator as sample_ddp.py draws it."""
    model = demo.model
    noise = SampleNoise.for_samples(GLOBAL_SEED, indices, DIGITS_NUM_CLASSES)
    z = noise.randn((model.in_channels, model.input_size, model.input_size))
    y = torch.as_tensor(labels[list(indices)])
    return sampler(demo.model_fn, z, noise=noise, model_kwargs={"y": y}, clip_denoised=clip).float()


def draw(demo: Demo, sampler: Sampler, num: int, labels: np.ndarray, batch: int, clip: bool
         ) -> tuple[torch.Tensor, float]:
    """x_0 of samples 0..num-1 and the model evaluations per image (dopri5's adapt per batch: their mean)."""
    parts, nfes = [], []
    for s in range(0, num, batch):
        parts.append(sample(demo, sampler, range(s, min(s + batch, num)), labels, clip))
        nfes.append(sampler.nfe)
    nfe = float(np.mean(nfes))
    return torch.cat(parts), (nfe if getattr(sampler, "name", None) == DOPRI5 else int(nfe))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((a.double() - b.double()) ** 2)))


def per_sample_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] RMS distance of each sample: the pooled RMS is dominated by any sample whose trajectory changes mode."""
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1).sqrt()


def solver_error(demo: Demo, args: argparse.Namespace) -> dict[str, Any]:
    """Part (a): each deterministic sampler's RMS distance to the converged ODE solution, per NFE."""
    n = args.error_samples
    labels = class_labels(n, DIGITS_NUM_CLASSES, GLOBAL_SEED, BALANCED_LABELS)

    def solve(name: str, steps: int) -> tuple[torch.Tensor, int, float]:
        sampler = make_sampler(demo, name, steps)
        start = time.perf_counter()
        x0, nfe = draw(demo, sampler, n, labels, args.batch_size, clip=False)
        return x0, nfe, time.perf_counter() - start

    reference, _, ref_seconds = solve(REFERENCE_SAMPLER, args.reference_steps)
    check, _, _ = solve(REFERENCE_SAMPLER, args.check_steps)
    independent, _, _ = solve(DDIM, DDIM_ALL_STEPS)
    rows = []
    for name in DETERMINISTIC:
        for target in args.error_nfe:
            x0, nfe, seconds = solve(name, steps_for_nfe(name, target))
            each = per_sample_rms(x0, reference)
            rows.append({"sampler": name, "nfe": nfe, "rms": rms(x0, reference), "median_rms": float(each.median()),
                         "max_rms": float(each.max()), "seconds": round(seconds, 2)})
            print(json.dumps({"part": "error", **rows[-1]}), flush=True)
    return {"samples": n, "reference": f"{REFERENCE_SAMPLER} {args.reference_steps} steps",
            "reference_seconds": round(ref_seconds, 1),
            "reference_check": {"steps": args.check_steps, "rms": rms(check, reference),
                                f"{DDIM}_{DDIM_ALL_STEPS}_rms": rms(independent, reference)}, "rows": rows}


class Scorer:
    """Inception loaded once, the reference statistics read once; scores uint8 NHWC images."""

    def __init__(self, ref: str, batch_size: int) -> None:
        self.extractor = InceptionExtractor(resolve_weights(), batch_size=batch_size)
        checked = check_batch(ref, "reference", METRICS, self.extractor.feature_dims)
        self.reference: Reference = load_reference(checked, METRICS, self.extractor, DEFAULT_CACHE_DIR, batch_size)
        self.classifier = digits_classifier()

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        accumulator = FeatureAccumulator(self.extractor, len(images), stats=(POOL, SPATIAL), inception_score=False,
                                         keep=(POOL,))
        for s in range(0, len(images), self.extractor.batch_size):
            accumulator.add_images(images[s: s + self.extractor.batch_size], s)
        report = report_metrics(self.reference, accumulator.reduce(), METRICS)
        predicted = self.classifier.predict(digits_features(images))
        return {**{k: float(v) for k, v in report.items()}, "class_accuracy": float(np.mean(predicted == labels))}


TimedRun = tuple[str, Sampler | FlowSampler, torch.Tensor, float, float]  # name, sampler, x_0, NFE, seconds


def timed_runs(demo: Demo, args: argparse.Namespace, n: int) -> Iterator[TimedRun]:
    """For each run (--runs, else the family's defaults): (name, sampler, x_0, NFE, seconds of the sampling
    loop) for n images with balanced labels of global seed 0, drawn as README command 1 draws them."""
    labels = class_labels(n, DIGITS_NUM_CLASSES, GLOBAL_SEED, BALANCED_LABELS)
    for run in args.runs or (FLOW_FID_RUNS if demo.flow else FID_RUNS):
        name, target = parse_run(run)
        sampler = make_sampler(demo, name, steps_for_nfe(name, target))
        start = time.perf_counter()
        x0, nfe = draw(demo, sampler, n, labels, args.batch_size, clip=True)
        yield name, sampler, x0, nfe, time.perf_counter() - start


def fid_runs(demo: Demo, scorer: Scorer, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part (b): each run's images drawn as README command 1 draws them, timed, then scored."""
    n = args.num_samples
    labels = class_labels(n, DIGITS_NUM_CLASSES, GLOBAL_SEED, BALANCED_LABELS)
    codec = PixelCodec(demo.model.in_channels)
    rows = []
    for name, sampler, x0, nfe, seconds in timed_runs(demo, args, n):
        images = codec.decode(x0).numpy()
        row = {"ckpt": demo.path, "sampler": name, "steps": sampler.steps, "nfe": nfe,
               "s_per_1000": round(seconds * PER_THOUSAND / n, 1), **scorer.score(images, labels)}
        rows.append(row)
        print(json.dumps({"part": "fid", **row}), flush=True)
    return rows


def plot_error(error: dict[str, Any], out: Path) -> None:
    """Solver error against NFE, log-log, one line per sampler: pooled RMS and the median sample's RMS."""
    import matplotlib  # only this output needs it (not a dependency of the package)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, key, what in zip(axes, ("rms", "median_rms"), ("RMS over all samples", "median sample's RMS")):
        for name in DETERMINISTIC:
            rows = [r for r in error["rows"] if r["sampler"] == name]
            ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.axhline(error["reference_check"][f"{DDIM}_{DDIM_ALL_STEPS}_rms"], color="grey", linestyle=":",
                   label=f"reference vs DDIM {DDIM_ALL_STEPS} steps")
        ax.set(xscale="log", yscale="log", xlabel="model evaluations per image (NFE)",
               ylabel="RMS distance to the converged ODE solution", title=what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Solver error, demo digits model, cfg {error.get('cfg_scale', 1.5)}, {error['samples']} x_T")
    fig.tight_layout()
    fig.savefig(out)


def speed_runs(demo: Demo, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Part (c): seconds per 1,000 images of each run's sampling alone (no Inception in between), on
    --speed-samples images, so that the timing is not the FID part's, which shares the cores with Inception."""
    n = args.speed_samples
    rows = []
    for name, sampler, _, nfe, seconds in timed_runs(demo, args, n):
        rows.append({"sampler": name, "steps": sampler.steps, "nfe": nfe,
                     "s_per_1000": round(seconds * PER_THOUSAND / n, 1)})
        print(json.dumps({"part": "speed", **rows[-1]}), flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/BENCHMARKS.md."""
    lines = []
    if "error" in result:
        error = result["error"]
        nfes = sorted({r["nfe"] for r in error["rows"]})
        lines += ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
        for name in DETERMINISTIC:
            cells = {r["nfe"]: f"{r['rms']:.2e} / {r['median_rms']:.2e}" for r in error["rows"] if r["sampler"] == name}
            lines.append(f"| {name} | " + " | ".join(cells.get(n, "") for n in nfes) + " |")
        lines.append("")
    if "fid" in result:
        speed = {(r["sampler"], r["steps"]): r["s_per_1000"] for r in result.get("speed", [])}
        lines += ["| checkpoint | sampler | steps | NFE | FID | sFID | precision | recall | class acc. | s / 1,000 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {Path(r['ckpt']).name} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | "
                  f"{r['sfid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.1%} | "
                  f"{speed.get((r['sampler'], r['steps']), r['s_per_1000'])} |" for r in result["fid"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", nargs="+", default=["models/assets/digits-dit.pt"],
                   help="demo checkpoints; the FID part runs on each, the error part on the first")
    p.add_argument("--ref", default="demo_out/digits-ref.npz", help="reference batch of the real digits")
    p.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--batch-size", type=int, default=100, help="images per sampling batch (guidance doubles it)")
    p.add_argument("--error-samples", type=int, default=64)
    p.add_argument("--error-nfe", type=int, nargs="+", default=list(ERROR_NFE))
    p.add_argument("--reference-steps", type=int, default=999, help="steps of the converged ODE solution")
    p.add_argument("--check-steps", type=int, default=500, help="the same solver again, to estimate its error")
    p.add_argument("--num-samples", type=int, default=1000, help="images per FID run")
    p.add_argument("--runs", nargs="+", default=None,
                   help="sampler:NFE (default: FID_RUNS, or FLOW_FID_RUNS for a flow-matching checkpoint)")
    p.add_argument("--speed-samples", type=int, default=200, help="images per run of the speed part")
    p.add_argument("--inception-batch", type=int, default=64)
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--plot", type=Path, default=None, help="solver error PNG (needs matplotlib)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(available_cpus())
    result: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": available_cpus(),
                                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                                          "load_average_start": os.getloadavg()},
                              "cfg_scale": args.cfg_scale}
    start = time.perf_counter()
    if "error" in args.part:
        result["error"] = {**solver_error(load_demo(args.ckpt[0], args.cfg_scale), args), "cfg_scale": args.cfg_scale}
        if args.plot:
            plot_error(result["error"], args.plot)
    if "fid" in args.part:
        scorer = Scorer(args.ref, args.inception_batch)
        result["fid"] = [row for ckpt in args.ckpt for row in fid_runs(load_demo(ckpt, args.cfg_scale), scorer, args)]
    if "speed" in args.part:
        result["speed"] = speed_runs(load_demo(args.ckpt[0], args.cfg_scale), args)
    result["machine"]["load_average_end"] = os.getloadavg()
    result["seconds"] = math.ceil(time.perf_counter() - start)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
