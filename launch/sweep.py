"""Guidance sweep: one model and one Inception load, a grid of runs, a table and a plot.

    torchrun --nproc_per_node=8 -m launch.sweep --ref VIRTUAL_imagenet256_labeled.npz --cfg-scales 1,1.25,1.5,2,3
    python -m launch.sweep --ref ref.npz --cfg-scales 1,1.5,2,4 --guidance-intervals none,0:600 --steps 25,50 ...
    DIT_PROGRAM="-m launch.sweep" sbatch launch/slurm/sweep.sbatch --ref REF.npz --cfg-scales 1,1.5,2

Every (guidance interval, steps, cfg scale) point is a run of sample_ddp.py with --ref (default here:
--num-fid-samples 10000 and --save none, i.e. FID-10K from the features alone), in its own run folder under
--sample-dir: resumable point by point, and a point already finished only has its metrics recomputed from its
stored features. Every other flag of sample_ddp.py is accepted and means the same. At the end rank 0 writes
sweep.json, sweep.csv and sweep.png (FID against the guidance scale, one line per interval/steps setting;
the IS-FID trade-off; precision against recall) into --sweep-dir. Exit codes as the sampler's.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.metrics import ALL_METRICS, JSON_KEYS, METRIC_FD_DINOV2, STD_SUFFIX
from launch.runtime import dist
from launch.runtime.checks import check_writable_dir
from launch.runtime.command import exit_process, run_command
from launch.runtime.errors import EXIT_OK, EXIT_PREEMPTED, UserError
from launch.runtime.files import atomic_write, write_json_atomic
from sampling.config import SAVE_NONE, SampleConfig, validate
from sampling.finish import finish_folder
from sampling.network import build_sampler, load_network, settle
from sampling.options import build_parser as sampler_parser
from sampling.options import config_from_args
from sampling.run import PREEMPTED_LINE, Outcome, open_evaluation, run_labels, sample_folder, start_process

SWEEP_SAMPLES = 10_000  # FID-10K per point, the usual budget of a guidance sweep
NO_INTERVAL = "none"
SWEEP_FILES = ("sweep.json", "sweep.csv", "sweep.png")
PLOT_DPI = 120
FIGURE_SIZE = (15.0, 4.2)

EXAMPLES = """examples:
  torchrun --standalone --nproc_per_node=8 -m launch.sweep --ref VIRTUAL_imagenet256_labeled.npz \\
      --cfg-scales 1,1.25,1.5,1.75,2,3,4 --guidance-intervals none,0:600
  python -m launch.sweep --ref demo_out/digits-ref.npz --model custom --ckpt models/assets/digits-dit.pt \\
      --vae none --image-size 32 --num-classes 10 --sampler ddim --steps 25 --num-fid-samples 1000 \\
      --cfg-scales 1,1.5,2,3,4 --sample-dir demo_out/sweep
"""


class SweepError(UserError):
    """A sweep argument that cannot be used."""


SWEEP_FLAGS = {"--cfg-scale": "--cfg-scales", "--guidance-interval": "--guidance-intervals",
               "--num-sampling-steps": "--steps"}  # the sweep's grid flags name the sampler's values


@dataclasses.dataclass(frozen=True)
class Point:
    cfg: SampleConfig

    @property
    def setting(self) -> str:
        """The line of the plot this point belongs to: its interval and step count."""
        gi = self.cfg.guidance_interval
        return f"{self.cfg.num_sampling_steps} steps" + (f", interval {gi[0]:g}-{gi[1]:g}" if gi else "")


def build_parser() -> argparse.ArgumentParser:
    p = sampler_parser(__doc__.split("\n\n")[0], EXAMPLES, prog="python -m launch.sweep", require_ref=True)
    p.set_defaults(num_fid_samples=SWEEP_SAMPLES, save=SAVE_NONE)
    g = p.add_argument_group("sweep")
    g.add_argument("--cfg-scales", required=True, help="comma-separated guidance scales, e.g. 1,1.5,2,4")
    g.add_argument("--guidance-intervals", default=NO_INTERVAL,
                   help="comma-separated LOW:HIGH training-timestep intervals, or none (guidance at every step)")
    g.add_argument("--steps", default=None, help="comma-separated step counts (None: --num-sampling-steps)")
    g.add_argument("--sweep-dir", default=None, help="where sweep.json/.csv/.png go (None: --sample-dir)")
    g.add_argument("--no-plot", action="store_true", help="no sweep.png (no matplotlib needed)")
    return p


def _numbers(text: str, flag: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values:
        raise SweepError(f"{flag} {text!r}: give at least one value")
    return list(dict.fromkeys(values))  # in order, without repeats


def _intervals(text: str) -> list[tuple[float, float] | None]:
    out: list[tuple[float, float] | None] = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        if item.lower() == NO_INTERVAL:
            out.append(None)
            continue
        try:
            low, high = (float(x) for x in item.split(":"))
        except ValueError:
            raise SweepError(f"--guidance-intervals {item!r}: expected LOW:HIGH (e.g. 0:600) or none") from None
        out.append((low, high))
    if not out:
        raise SweepError("--guidance-intervals: give at least one interval or none")
    return list(dict.fromkeys(out))


def plan_points(args: argparse.Namespace) -> list[Point]:
    """The grid, every point's config validated (one line naming the sweep's flag otherwise), and the output
    folder tried, before any work."""
    base = config_from_args(args)
    if base.pack_only:
        raise SweepError("--pack-only: a sweep samples and evaluates; pack a point with sample_ddp.py --pack-only")
    scales = _numbers(args.cfg_scales, "--cfg-scales", float)
    steps = _numbers(args.steps, "--steps", int) if args.steps else [base.num_sampling_steps]
    points = []
    for interval, n_steps, scale in itertools.product(_intervals(args.guidance_intervals), steps, scales):
        cfg = dataclasses.replace(base, cfg_scale=scale, guidance_interval=interval, num_sampling_steps=n_steps)
        validate(cfg, SWEEP_FLAGS)
        points.append(Point(cfg))
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        raise SweepError("sweep.png needs matplotlib: pip install -e '.[plot]', or pass --no-plot")
    check_writable_dir(args.sweep_dir or base.sample_dir, "--sweep-dir" if args.sweep_dir else "--sample-dir")
    return points


def run_sweep(points: list[Point], sweep_dir: Path, plot: bool) -> int:
    """Every point on every rank with one model and one feature network, in the run's order: each point's
    folder sampled and its report reduced; then, after the last collective, rank 0 finishes every point (grid,
    .npz, metrics) and writes the sweep files. Returns an exit code."""
    base = points[0].cfg
    info = start_process(base)
    labels = run_labels(base)
    network = load_network(base, info.device)
    points = [Point(settle(point.cfg, network)) for point in points]  # the checkpoint's family and its defaults
    samplers = [build_sampler(point.cfg, network) for point in points]  # every point checked against the model
    evaluation = open_evaluation(base, info.device)
    outcomes: list[Outcome] = []
    for k, (point, sampler) in enumerate(zip(points, samplers)):
        cfg = point.cfg
        dist.print0(f"sweep point {k + 1}/{len(points)}: cfg scale {cfg.cfg_scale}, {point.setting}")
        outcome = sample_folder(cfg, info, network, sampler, labels, evaluation)
        if outcome.stopped:
            dist.print0(PREEMPTED_LINE)
            return EXIT_PREEMPTED
        outcomes.append(outcome)
    dist.barrier()  # every rank's files are on disk; rank 0 finishes alone, with no collective pending
    dist.shutdown()
    if info.is_main:
        rows = []
        for point, outcome in zip(points, outcomes):
            dist.clear_reports(point.cfg.run_dir)
            finish_folder(point.cfg, outcome.run, outcome.report)
            rows.append(point_row(point, outcome.report))
        write_sweep(rows, sweep_dir, base, plot)
    return EXIT_OK


def point_row(point: Point, report: dict[str, Any]) -> dict[str, Any]:
    """One line of the table: the point's settings, its metrics (and their bootstrap spread), its files."""
    cfg = point.cfg
    keys = [JSON_KEYS[m] for m in ALL_METRICS if JSON_KEYS[m] in report]
    row: dict[str, Any] = {"cfg_scale": cfg.cfg_scale, "num_sampling_steps": cfg.num_sampling_steps,
                           "guidance_interval": list(cfg.guidance_interval) if cfg.guidance_interval else None,
                           "setting": point.setting}
    row.update({key: report.get(key) for key in keys})
    row.update({key + STD_SUFFIX: report[key + STD_SUFFIX] for key in keys if key + STD_SUFFIX in report})
    row.update(num_samples=cfg.num_fid_samples, run_dir=str(cfg.run_dir), metrics_json=str(cfg.metrics_path))
    return row


def write_sweep(rows: list[dict[str, Any]], sweep_dir: Path, base: SampleConfig, plot: bool) -> None:
    json_path, csv_path, png_path = (sweep_dir / name for name in SWEEP_FILES)
    write_json_atomic(json_path, {"reference_batch": str(Path(base.ref).resolve()), "metrics": base.metrics,
                                  "num_samples": base.num_fid_samples, "points": rows}, fsync=False)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_write(csv_path, "w") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
    print(f"Saved {json_path}, {csv_path}", flush=True)
    if plot:
        draw(rows, png_path, f"{base.model} {Path(base.ckpt).name if base.ckpt else 'DiT-XL/2'}, "
                             f"{base.num_fid_samples:,} samples per point")
        print(f"Saved {png_path}", flush=True)


def _by_setting(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault(row["setting"], []).append(row)
    return {name: sorted(part, key=lambda r: r["cfg_scale"]) for name, part in lines.items()}


def _panel(ax: Any, lines: dict[str, list[dict[str, Any]]], x: str, y: str, labels: tuple[str, str],
           annotate: bool = False, missing: str = "not in --metrics") -> None:
    """One panel: a line per setting through the points that have both values; bootstrap error bars."""
    drawn = False
    for name, part in lines.items():
        part = [r for r in part if r.get(x) is not None and r.get(y) is not None]
        if not part:
            continue
        drawn = True
        ax.errorbar([r[x] for r in part], [r[y] for r in part], marker="o", capsize=3, label=name,
                    xerr=[r.get(x + STD_SUFFIX, 0.0) for r in part] if x != "cfg_scale" else None,
                    yerr=[r.get(y + STD_SUFFIX, 0.0) for r in part])
        if annotate:
            for r in part:
                ax.annotate(f"{r['cfg_scale']:g}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no {labels[1]} / {labels[0]}\n({missing})", ha="center", va="center",
                transform=ax.transAxes)
    ax.grid(alpha=0.3)


def draw(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """sweep.png: FID vs guidance scale, IS vs FID (labelled by scale), precision vs recall, and FD_DINOv2 vs
    guidance scale when it was computed."""
    import matplotlib  # optional dependency (checked before sampling) that costs seconds to import: only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = _by_setting(rows)
    dinov2 = any(row.get(JSON_KEYS[METRIC_FD_DINOV2]) is not None for row in rows)
    fig, axes = plt.subplots(1, 4 if dinov2 else 3, figsize=(FIGURE_SIZE[0] * (4 / 3 if dinov2 else 1),
                                                             FIGURE_SIZE[1]))
    _panel(axes[0], lines, "cfg_scale", "fid", ("guidance scale", "FID"))
    _panel(axes[1], lines, "fid", "inception_score", ("FID", "Inception Score"), annotate=True,
           missing="not in --metrics, or Inception weights without a classifier")
    _panel(axes[2], lines, "recall", "precision", ("recall", "precision"), annotate=True)
    if dinov2:
        _panel(axes[3], lines, "cfg_scale", JSON_KEYS[METRIC_FD_DINOV2], ("guidance scale", "FD_DINOv2"))
    spread = any(key.endswith(STD_SUFFIX) for row in rows for key in row)
    fig.suptitle(title + (" (error bars: one bootstrap standard deviation)" if spread else ""))
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=PLOT_DPI)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # an unknown flag exits 2 here (argparse)

    def sweep(points: list[Point]) -> int:
        return run_sweep(points, Path(args.sweep_dir or points[0].cfg.sample_dir), not args.no_plot)

    return run_command(lambda: plan_points(args), sweep)


if __name__ == "__main__":
    exit_process(main())
