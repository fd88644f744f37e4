"""`python -m evaluation.reference IMAGES --image-size 256 --out ref.npz`: an ADM reference batch from a folder of
images or an .npz of images (arr_0 uint8 NHWC, any size); `--dinov2` adds FD_DINOv2's statistics.

See `evaluation.reference_batch` for the preprocessing, the statistics and the seeded arr_0 choice.
Under torchrun the images are split over ranks; rank 0 writes the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.cli import (
    HelpFormatter,
    add_device_arg,
    add_dinov2_args,
    add_network_args,
    dinov2_options,
    open_extractor,
)
from evaluation.errors import EvaluationError
from evaluation.metrics import METRIC_FD_DINOV2, METRIC_FID, METRIC_SFID
from evaluation.networks import check_weight_files
from evaluation.reference_batch import DEFAULT_NUM_IMAGES, DEFAULT_SEED, build_reference, open_source
from evaluation.reference_cache import DEFAULT_CACHE_DIR
from launch.runtime.checks import check_positive, check_writable
from launch.runtime.command import run_command

EXAMPLES = """examples:
  python -m evaluation.reference /data/imagenet/train --image-size 256 --out VIRTUAL_imagenet256.npz
  torchrun --standalone --nproc_per_node=8 -m evaluation.reference photos/ --image-size 512 --out ref512.npz \\
      --num-images 5000
  python -m evaluation.reference my_images.npz --image-size 64 --out ref64.npz --dinov2
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.reference", formatter_class=HelpFormatter, epilog=EXAMPLES,
                                description="Build an ADM reference batch (arr_0 + mu/sigma/mu_s/sigma_s) from an "
                                            "image folder or an .npz of images with ADM's resize and centre crop.")
    p.add_argument("images", help="folder of images (searched recursively), or an .npz whose arr_0 holds uint8 "
                                  "NHWC images of any size (read in chunks)")
    p.add_argument("--image-size", type=int, required=True, help="side of the square images (e.g. 256)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES,
                   help="images stored in arr_0 (seeded choice; statistics always use every image)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the arr_0 choice")
    add_network_args(p)
    p.add_argument("--dinov2", action="store_true",
                   help="also store FD_DINOv2 statistics (mu_dinov2/sigma_dinov2; _pil with --dinov2-resize pil)")
    add_dinov2_args(p)
    add_device_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                   help="the evaluator's reference cache, seeded when arr_0 holds every image")
    p.add_argument("--no-cache", action="store_true", help="do not seed that cache")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _check(args), _run)


def _check(args: argparse.Namespace) -> argparse.Namespace:
    """Every check before the network loads: counts, the output path, the images."""
    check_positive({"--image-size": args.image_size, "--num-images": args.num_images,
                    "--eval-batch-size": args.eval_batch_size})
    if Path(args.out).exists() and not args.overwrite:
        raise EvaluationError(f"--out {args.out} exists; pass --overwrite to rebuild it or choose another path")
    check_writable(args.out, "--out")
    open_source(Path(args.images))
    check_weight_files(_metrics(args), args.inception_weights, dinov2_options(args)[0])
    return args


def _metrics(args: argparse.Namespace) -> list[str]:
    """The statistics the reference file gets: ADM's, and FD_DINOv2's with --dinov2."""
    return [METRIC_FID, METRIC_SFID, *([METRIC_FD_DINOV2] if args.dinov2 else [])]


def _run(args: argparse.Namespace) -> int:
    extractor = open_extractor(args, _metrics(args))
    out = build_reference(args.images, args.image_size, args.out, extractor, args.num_images, args.seed,
                          cache_dir=None if args.no_cache else args.cache_dir)
    if out is not None:
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
