"""Sample, pack and evaluate in one command: `<run>.npz`, then `<run>.metrics.json` next to it.

    torchrun --nproc_per_node=8 -m launch.pipeline --ref VIRTUAL_imagenet256_labeled.npz --cfg-scale 1.5
    DIT_PROGRAM="-m launch.pipeline" sbatch launch/slurm/sample.sbatch --ref REF.npz --cfg-scale 1.5

Every flag of sample_ddp.py is accepted and means the same. Each rank runs the sampler in this process
(no nested torchrun); rank 0 packs the `.npz`, then evaluates it alone as a world of one. The sampler
ends its process group when it is done, and a second group on torchrun's store would meet the first
group's rendezvous keys, so the other ranks leave once their images are on disk (for a multi-GPU
evaluation of an existing `.npz`, use launch/slurm/evaluate.sbatch). Exit codes as the sampler's: 0 done,
1 a rank failed, 2 bad input, 3 preempted (rerun the same command: it resumes, then evaluates).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from launch.exits import EXIT_BAD_INPUT

METRICS_SUFFIX = ".metrics.json"
# torchrun's variables that make launch.dist join a process group; hidden while rank 0 evaluates alone.
SINGLE_PROCESS_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}

EXAMPLES = """examples:
  torchrun --standalone --nproc_per_node=8 -m launch.pipeline --ref VIRTUAL_imagenet256_labeled.npz \\
      --cfg-scale 1.5
  python -m launch.pipeline --ref ref.npz --model DiT-S/2 --ckpt run/0100000.pt --image-size 32 --vae none \\
      --num-classes 10 --num-fid-samples 1000 --metrics fid,sfid
every other flag goes to the sampler: see `python sample_ddp.py --help`
"""


class PipelineError(Exception):
    """An argument the pipeline cannot use; the message is one line."""


def build_parser() -> argparse.ArgumentParser:
    from evaluation.evaluator import DEFAULT_BATCH_SIZE, DEFAULT_CACHE_DIR, METRICS

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


def evaluator_argv(opts: argparse.Namespace, npz: Path, json_out: Path) -> list[str]:
    argv = [str(opts.ref), str(npz), "--json", str(json_out), "--batch-size", str(opts.eval_batch_size),
            "--metrics", opts.metrics, "--cache-dir", str(opts.eval_cache_dir)]
    if opts.inception_weights:
        argv += ["--inception-weights", opts.inception_weights]
    if opts.no_download:
        argv.append("--no-download")
    if opts.no_eval_cache:
        argv.append("--no-cache")
    return argv


@contextlib.contextmanager
def single_process_env() -> Iterator[None]:
    """Let launch.dist see a world of one (LOCAL_RANK, hence the GPU, is kept)."""
    saved = {k: os.environ.get(k) for k in SINGLE_PROCESS_ENV}
    os.environ.update(SINGLE_PROCESS_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def evaluate_run(opts: argparse.Namespace, run_dir: Path) -> int:
    """Evaluate `<run>.npz` against --ref here; write `<run>.metrics.json`. Returns an exit code."""
    from evaluation import evaluator
    from launch import dist
    from launch.files import write_json_atomic

    npz, out = Path(f"{run_dir}.npz"), metrics_path(run_dir)
    partial = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    dist.shutdown()  # the sampler's group (if still there) is not the evaluator's world of one
    with single_process_env():
        code = evaluator.main(evaluator_argv(opts, npz, partial))
    if code != 0:
        partial.unlink(missing_ok=True)
        return code
    report = json.loads(partial.read_text())
    partial.unlink()
    inputs = {"reference_batch": str(Path(opts.ref).resolve()), "sample_batch": str(npz.resolve()),
              "run_dir": str(run_dir.resolve())}
    write_json_atomic(out, {**inputs, **report})
    print(f"Saved metrics to {out}", flush=True)
    return 0


def _prepare(opts: argparse.Namespace, sampler_args: argparse.Namespace):  # noqa: ANN202
    """The sampler's config, after every check that needs no model: bad input fails before any sampling."""
    import sample_ddp
    from evaluation.evaluator import METRICS, open_checked

    cfg = sample_ddp.config_from_args(sampler_args)
    if cfg.no_npz:
        raise PipelineError("--no-npz: the pipeline evaluates the .npz; drop the flag")
    if opts.eval_batch_size < 1:
        raise PipelineError(f"--eval-batch-size must be positive, got {opts.eval_batch_size}")
    unknown = [m for m in opts.metrics.split(",") if m.strip().lower() not in METRICS]
    if unknown:
        raise PipelineError(f"--metrics: unknown {', '.join(unknown)}; choose from {','.join(METRICS)}")
    if opts.inception_weights and not Path(opts.inception_weights).is_file():
        raise PipelineError(f"--inception-weights {opts.inception_weights}: no such file")
    open_checked(opts.ref, "reference")  # a missing or unreadable --ref fails now, not after the sampling
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    import sample_ddp
    from evaluation.batches import BatchError
    from evaluation.evaluator import EvaluationError
    from launch import dist
    from launch.rundir import RunDirError
    from models.checkpoints import CheckpointError
    from models.vae import CodecError

    opts, rest = build_parser().parse_known_args(argv)
    sampler_args = sample_ddp.build_parser().parse_args(rest)  # an unknown flag exits 2 here (argparse)
    bad_input = (sample_ddp.ConfigError, CheckpointError, CodecError, RunDirError, BatchError)
    try:
        cfg = _prepare(opts, sampler_args)
    except (*bad_input, EvaluationError, PipelineError) as exc:
        if dist.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    try:
        code = sample_ddp.run(cfg)
    except bad_input as exc:
        if dist.is_main() or dist.world_size() == 1:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_BAD_INPUT)  # another rank may wait in a collective that will never come
    dist.shutdown()
    if code != 0 or not dist.is_main():
        return code
    return evaluate_run(opts, cfg.run_dir)


if __name__ == "__main__":
    sys.exit(main())
