"""Sample and evaluate in one command: `<run>.npz`, then `<run>.metrics.json` next to it.

    torchrun --nproc_per_node=8 -m launch.pipeline --ref VIRTUAL_imagenet256_labeled.npz --cfg-scale 1.5
    DIT_PROGRAM="-m launch.pipeline" sbatch launch/slurm/sample.sbatch --ref REF.npz --cfg-scale 1.5

The sampler with --ref required: each rank passes every decoded batch through the evaluator's Inception on its
own device, in this process, and stores the features beside the images; at the end the ranks reduce them as
the sharded evaluator does, and rank 0 packs the `.npz` and writes the report (the keys of
`python -m evaluation.evaluator --json`, plus the inputs). No second Inception pass, no image read back. Every
flag of sample_ddp.py is accepted and means the same. Exit codes as the sampler's: 0 done, 1 a rank failed,
2 bad input, 3 preempted (rerun the same command: it resumes, features included, then evaluates).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from launch.runtime.command import exit_process, run_command
from launch.runtime.errors import UserError
from sampling.config import SampleConfig
from sampling.options import build_parser as sampler_parser
from sampling.options import config_from_args
from sampling.run import run

EXAMPLES = """examples:
  torchrun --standalone --nproc_per_node=8 -m launch.pipeline --ref VIRTUAL_imagenet256_labeled.npz \\
      --cfg-scale 1.5
  python -m launch.pipeline --ref ref.npz --model DiT-S/2 --ckpt run/0100000.pt --image-size 32 --vae none \\
      --num-classes 10 --num-fid-samples 1000 --metrics fid,sfid
  torchrun --standalone --nproc_per_node=8 -m launch.pipeline --ref ref.npz --save npz --bootstrap 10
"""


class PipelineError(UserError):
    """An argument the pipeline cannot use."""


def build_parser() -> argparse.ArgumentParser:
    return sampler_parser(__doc__.split("\n\n")[0], EXAMPLES, prog="python -m launch.pipeline", require_ref=True)


def _prepare(args: argparse.Namespace) -> SampleConfig:
    """The sampler's config, after every check that needs no model: bad input fails before any sampling."""
    cfg = config_from_args(args)
    if cfg.no_npz:
        raise PipelineError("--no-npz: the pipeline writes <run>.npz beside its metrics; use --save none to keep "
                            "only the features, the metrics and grid.png")
    if cfg.pack_only:
        raise PipelineError("--pack-only: the pipeline samples and evaluates; run sample_ddp.py --pack-only instead")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # an unknown flag exits 2 here (argparse)
    return run_command(lambda: _prepare(args), run)


if __name__ == "__main__":
    exit_process(main())
