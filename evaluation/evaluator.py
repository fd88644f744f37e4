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

from evaluation.cli import (
    HelpFormatter,
    add_dinov2_args,
    add_network_args,
    check_positive,
    check_writable,
    dinov2_options,
    open_extractor,
    run_command,
)
from evaluation.errors import EvaluationError
from evaluation.inception import DEFAULT_BATCH_SIZE
from evaluation.inputs import check_inputs, open_checked
from evaluation.metrics import ALL_METRICS, METRIC_IS, METRICS, format_report, format_spread, parse_metrics
from evaluation.networks import expected_dims
from evaluation.reference_cache import DEFAULT_CACHE_DIR
from evaluation.report import evaluate, evaluate_inputs
from launch import dist
from launch.files import atomic_write

# The library entry points, importable from here as before (launch.pipeline uses some of them).
__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_CACHE_DIR", "METRICS", "EvaluationError", "build_parser", "evaluate",
           "main", "open_checked"]

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
    p.add_argument("--metrics", default=",".join(METRICS),
                   help=f"comma-separated metrics, from {','.join(ALL_METRICS)} (the report's names "
                        "inception_score, precision, ... work too)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                   help="where reference statistics are cached by content hash")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    p.add_argument("--bootstrap", type=int, default=0, metavar="K",
                   help="add fid_std, sfid_std, inception_score_std: the spread over K seeded resamples (with "
                        "replacement) of the sample images, reference fixed; 0: none")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")
    add_network_args(p)
    add_dinov2_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    metrics = parse_metrics(args.metrics)
    check_positive(batch_size=args.batch_size)
    json_out = check_writable(args.json, "--json") if args.json else None
    # Inputs first: a bad file or flag fails in a second, before the network is loaded.
    inputs = check_inputs(args.ref_batch, args.sample_batch, metrics, expected_dims(), args.bootstrap,
                          dinov2_options(args)[1])
    extractor = open_extractor(args, metrics)
    weights = extractor.weights
    if metrics == [METRIC_IS] and not weights.has_classifier:
        raise EvaluationError(weights.is_unavailable_reason())
    if METRIC_IS in metrics and not weights.has_classifier and dist.is_main():
        print(weights.is_unavailable_reason(), file=sys.stderr)
    report = evaluate_inputs(inputs, extractor, None if args.no_cache else args.cache_dir,
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
