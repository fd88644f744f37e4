"""Sample, pack and evaluate in one command: `<run>.npz`, then `<run>.metrics.json` next to it.

    torchrun --nproc_per_node=8 -m launch.pipeline --ref VIRTUAL_imagenet256_labeled.npz --cfg-scale 1.5
    DIT_PROGRAM="-m launch.pipeline" sbatch launch/slurm/sample.sbatch --ref REF.npz --cfg-scale 1.5

Every flag of sample_ddp.py is accepted and means the same. Each rank runs the sampler in this process
(no nested torchrun); rank 0 packs the `.npz`, then calls the evaluator's `evaluate()` on it in this same
process, as a world of one (the sampler has left its process group: packing and evaluating 50,000 images
on one rank would outlast any collective timeout), and writes the report. The other ranks leave once their
images are on disk. Exit codes as the sampler's: 0 done, 1 a rank failed, 2 bad input, 3 preempted (rerun
the same command: it resumes, then evaluates).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import sample_ddp
from evaluation.batches import BatchError
from evaluation.errors import EvaluationError
from evaluation.inception import DEFAULT_BATCH_SIZE, InceptionExtractor, InceptionWeightsError, resolve_weights
from evaluation.inputs import open_checked
from evaluation.metrics import METRICS, format_report, parse_metrics
from evaluation.reference_cache import DEFAULT_CACHE_DIR
from evaluation.report import evaluate
from launch import dist
from launch.exits import EXIT_BAD_INPUT, EXIT_OK
from launch.files import FileWriteError, write_json_atomic

METRICS_SUFFIX = ".metrics.json"

EXAMPLES = """examples:
  torchrun --standalone --nproc_per_node=8 -m launch.pipeline --ref VIRTUAL_imagenet256_labeled.npz \\
      --cfg-scale 1.5
  python -m launch.pipeline --ref ref.npz --model DiT-S/2 --ckpt run/0100000.pt --image-size 32 --vae none \\
      --num-classes 10 --num-fid-samples 1000 --metrics fid,sfid
every other flag goes to the sampler: see `python sample_ddp.py --help`
"""
EVAL_ERRORS = (EvaluationError, InceptionWeightsError, BatchError, FileWriteError)


class PipelineError(Exception):
    """An argument the pipeline cannot use; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.pipeline", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLES, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="reference batch (.npz) for the evaluator")
    p.add_argument("--eval-batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per Inception forward (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated subset (default: all)")
    p.add_argument("--inception-weights", metavar="PATH", help="Inception weights file (default: the caches)")
    p.add_argument("--no-download", action="store_true", help="never try to download Inception weights")
    p.add_argument("--eval-cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                   help="where the evaluator caches reference statistics")
    p.add_argument("--no-eval-cache", action="store_true", help="neither read nor write that cache")
    return p


def metrics_path(run_dir: Path) -> Path:
    """`<sample-dir>/<run>.metrics.json`, next to `<run>.npz` (the run name holds dots: no with_suffix)."""
    return Path(f"{run_dir}{METRICS_SUFFIX}")


def evaluate_run(opts: argparse.Namespace, run_dir: Path) -> int:
    """Evaluate `<run>.npz` against --ref in this process; write `<run>.metrics.json`. Returns an exit code."""
    npz, out = Path(f"{run_dir}.npz"), metrics_path(run_dir)
    metrics = parse_metrics(opts.metrics)
    with dist.alone():  # the sampler's group is gone: evaluate as a world of one on this rank's device
        weights = resolve_weights(opts.inception_weights, allow_download=not opts.no_download)
        extractor = InceptionExtractor(weights, dist.info().device, opts.eval_batch_size)
        if "is" in metrics and not weights.has_classifier:
            print(weights.is_unavailable_reason(), file=sys.stderr, flush=True)
        report = evaluate(opts.ref, npz, extractor, metrics, None if opts.no_eval_cache else opts.eval_cache_dir)
    inputs = {"reference_batch": str(Path(opts.ref).resolve()), "sample_batch": str(npz.resolve()),
              "run_dir": str(run_dir.resolve())}
    for line in format_report(report, metrics):
        print(line, flush=True)
    write_json_atomic(out, {**inputs, **report})
    print(f"Saved metrics to {out}", flush=True)
    return EXIT_OK


def _prepare(opts: argparse.Namespace, sampler_args: argparse.Namespace) -> sample_ddp.SampleConfig:
    """The sampler's config, after every check that needs no model: bad input fails before any sampling."""
    cfg = sample_ddp.config_from_args(sampler_args)
    if cfg.no_npz:
        raise PipelineError("--no-npz: the pipeline evaluates the .npz; drop the flag")
    if opts.eval_batch_size < 1:
        raise PipelineError(f"--eval-batch-size must be positive, got {opts.eval_batch_size}")
    parse_metrics(opts.metrics)
    if opts.inception_weights and not Path(opts.inception_weights).is_file():
        raise PipelineError(f"--inception-weights {opts.inception_weights}: no such file")
    open_checked(opts.ref, "reference")  # a missing or unreadable --ref fails now, not after the sampling
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    opts, rest = build_parser().parse_known_args(argv)
    sampler_args = sample_ddp.build_parser().parse_args(rest)  # an unknown flag exits 2 here (argparse)
    try:
        cfg = _prepare(opts, sampler_args)
    except (*sample_ddp.BAD_INPUT_ERRORS, *EVAL_ERRORS, PipelineError) as exc:
        if dist.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    try:
        code = sample_ddp.run(cfg)
    except sample_ddp.BAD_INPUT_ERRORS as exc:
        sample_ddp.exit_bad_input(exc)
    if code != EXIT_OK or not dist.is_main():
        return code
    try:
        return evaluate_run(opts, cfg.run_dir)
    except EVAL_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: a process-group thread destroyed late can abort a finished rank
