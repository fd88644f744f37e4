"""Sample a class-conditional DiT on any number of processes and pack an ADM `.npz` for FID.

    torchrun --nproc_per_node=8 sample_ddp.py --cfg-scale 1.5
    torchrun --nproc_per_node=8 sample_ddp.py --cfg-scale 1.5 --ref VIRTUAL_imagenet256_labeled.npz --save npz
    python sample_ddp.py --model DiT-S/2 --ckpt my.pt --image-size 32 --vae none --num-fid-samples 100

With --ref, every decoded batch also goes through the evaluator's Inception on the sampling device; the
features are stored beside the images and `<run>.metrics.json` holds the evaluator's report at the end.

Sample i's class label, initial noise and every step's noise come from its own generator,
seeded with global_seed * 2**21 + i, so the images do not depend on the number of processes,
the batch size or interruptions. Rerunning the same command resumes; see docs and --help.
The work is the library in sampling/ (docs/DESIGN.md); this file is the command.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from launch.runtime.command import exit_process, run_command
from sampling.options import build_parser as sampler_parser
from sampling.options import config_from_args
from sampling.run import run

EXAMPLES = """examples:
  torchrun --nproc_per_node=8 sample_ddp.py --cfg-scale 1.5
  torchrun --standalone --nproc_per_node=2 sample_ddp.py --model DiT-S/2 --ckpt run/0100000.pt \\
      --image-size 32 --vae none --num-classes 10 --num-fid-samples 1000 --label-sampling balanced
  torchrun --nproc_per_node=8 sample_ddp.py --ref VIRTUAL_imagenet256_labeled.npz --save npz --bootstrap 10
"""


def build_parser() -> argparse.ArgumentParser:
    return sampler_parser(__doc__.split("\n\n")[0], EXAMPLES)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # an unknown flag exits 2 here (argparse)
    return run_command(lambda: config_from_args(args), run)


if __name__ == "__main__":
    exit_process(main())
