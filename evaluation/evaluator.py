"""`python -m evaluation.evaluator REF.npz SAMPLE.npz`: ADM's report (IS, FID, sFID, precision, recall), and
EDM2's FD_DINOv2 when asked (`--metrics fid,fd_dinov2`).

Same definitions and output lines as ADM's `evaluations/evaluator.py`, computed in PyTorch on torch-fidelity's
TF-exact Inception (see `evaluation.report`). Under torchrun each rank extracts a contiguous slice of every
batch; the statistics are all-reduced running sums and precision/recall splits its distance rows over ranks.
Every input and output path is checked before the network is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.bootstrap import check_bootstrap
from evaluation.cli import (
    HelpFormatter,
    add_device_arg,
    add_metric_args,
    dinov2_options,
    open_extractor,
)
from evaluation.errors import EvaluationError
from evaluation.inputs import EvaluationInputs, check_inputs
from evaluation.metrics import METRIC_IS, format_report, format_spread, parse_metrics
from evaluation.networks import check_weight_files, expected_dims
from evaluation.report import evaluate_inputs
from launch.runtime import dist
from launch.runtime.checks import check_positive, check_writable
from launch.runtime.command import run_command
from launch.runtime.files import atomic_write

EXAMPLES = """examples:
  python -m evaluation.evaluator VIRTUAL_imagenet256_labeled.npz samples/DiT-XL-2.npz
  python -m evaluation.evaluator ref.npz samples.npz --metrics fid,sfid --json results.json
  python -m evaluation.evaluator ref.npz samples.npz --bootstrap 10
  torchrun --standalone --nproc_per_node=8 -m evaluation.evaluator ref.npz samples.npz
  python -m evaluation.evaluator ref.npz sample_pngs/ --inception-weights weights-inception-2015-12-05-6726825d.pth
  python -m evaluation.evaluator ref.npz samples.npz --metrics fid,fd_dinov2 --json results.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.evaluator", formatter_class=HelpFormatter,
                                epilog=EXAMPLES,
                                description="ADM-compatible Inception Score, FID, sFID, precision and recall of a "
                                            "sample batch against a reference batch (.npz with arr_0 uint8 NHWC, "
                                            "or a folder of PNGs).")
    p.add_argument("ref_batch", help="reference batch (.npz; mu/sigma/mu_s/sigma_s are used when present, and "
                                     "suffice for FID/sFID without arr_0)")
    p.add_argument("sample_batch", help="sample batch (.npz or PNG folder; a sampler's run folder is read in the "
                                        "index range its manifest.json gives)")
    p.add_argument("--json", metavar="OUT", help="also write the results (and counts, weights, versions) here")
    add_metric_args(p)
    add_device_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _check(args), lambda checked: _run(args, *checked))


def _check(args: argparse.Namespace) -> tuple[list[str], Path | None, EvaluationInputs]:
    """Every flag and input checked before the network loads: a bad file or flag fails in a second."""
    metrics = parse_metrics(args.metrics)
    check_positive({"--eval-batch-size": args.eval_batch_size})
    check_bootstrap(args.bootstrap, args.bootstrap_seed)
    json_out = check_writable(args.json, "--json") if args.json else None
    dinov2_path, dinov2_resize = dinov2_options(args)
    inputs = check_inputs(args.ref_batch, args.sample_batch, metrics, expected_dims(), args.bootstrap, dinov2_resize)
    check_weight_files(metrics, args.inception_weights, dinov2_path)
    return metrics, json_out, inputs


def _run(args: argparse.Namespace, metrics: list[str], json_out: Path | None, inputs: EvaluationInputs) -> int:
    extractor = open_extractor(args, metrics)
    weights = extractor.weights  # Inception's: None when no Inception metric was asked
    if metrics == [METRIC_IS] and not weights.has_classifier:
        raise EvaluationError(weights.is_unavailable_reason())
    if METRIC_IS in metrics and not weights.has_classifier and dist.is_main():
        print(weights.is_unavailable_reason(), file=sys.stderr)
    report = evaluate_inputs(inputs, extractor, None if args.no_cache else Path(args.cache_dir),
                             bootstrap_seed=args.bootstrap_seed)
    if dist.is_main():
        for line in [*format_report(report, metrics), *format_spread(report, metrics)]:
            print(line, flush=True)
        if json_out is not None:
            with atomic_write(json_out, "w") as f:
                f.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
