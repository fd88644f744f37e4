"""The evaluation of a model during its training, through the sampling run (train.py --eval-every).

    evaluation = TrainingEvaluation.open(eval_config(train_cfg, num_classes), info)   # once per process
    with stop_signals_caught():
        ... write the step's checkpoint ...
        result = evaluation.evaluate(step, Network(ema, codec, checkpoint, meta), sample_dir)
    result.line()      # step, metrics, seconds, and the sample_ddp.py argv that gives the same numbers

The samples come from the model in memory (the EMA weights), through the same stream, consumers and in-job
metrics as `sample_ddp.py --ref ... --save none`; the run folder's identity names the checkpoint file just
written (its content hash), so `sample_ddp.py` with `result.sample_ddp_args` reproduces the numbers from that
file, and the folder keeps the features like any sampling run's: an evaluation stopped by a signal resumes.
Nothing here touches a global random generator: every sample draws from its own (diffusion.rng).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.metrics import JSON_KEYS, PRINT_NAMES, parse_metrics
from evaluation.run_metrics import RunEvaluation
from launch.runtime import dist, preempt
from launch.runtime.errors import UserError
from models.checkpoints import CUSTOM_MODEL
from models.training import OBJECTIVE_FAMILY, TrainConfig, eval_sampler
from sampling.config import PRECISIONS, SAVE_CHOICES, ConfigError, SampleConfig, validate
from sampling.finish import finish_folder
from sampling.network import Network, build_sampler, settle
from sampling.options import check_evaluation, command_line
from sampling.run import open_evaluation, run_labels, sample_folder

# How train.py calls the sampler's flags (an error found by the sampler's checks names the flag the user typed).
TRAIN_FLAGS = {
    "--num-fid-samples": "--eval-samples", "--per-proc-batch-size": "--eval-batch-size",
    "--sampler": "--eval-sampler", "--num-sampling-steps": "--eval-steps", "--cfg-scale": "--eval-cfg-scale",
    "--global-seed": "--eval-seed", "--guidance-channels": "--eval-guidance-channels",
    "--label-sampling": "--eval-label-sampling", "--precision": "--eval-precision", "--save": "--eval-save",
    "--ref": "--eval-ref", "--metrics": "--eval-metrics", "--inception-weights": "--eval-inception-weights",
    "--cache-dir": "--eval-cache-dir", "--dinov2-weights": "--eval-dinov2-weights",
}
# What sample_ddp.py needs to make the same images and the same numbers (everything in the run's identity, the
# batch sizes, which change the last bits of a float, and the evaluation's inputs).
SAMPLE_DDP_FIELDS = [
    "model", "ckpt", "vae", "vae_path", "image_size", "num_classes", "num_fid_samples", "per_proc_batch_size",
    "cfg_scale", "num_sampling_steps", "global_seed", "tf32", "sampler", "ddim_eta", "guidance_channels",
    "guidance_interval", "label_sampling", "to_uint8", "precision", "save", "ref", "metrics", "eval_batch_size",
    "inception_weights", "dinov2_weights",
]


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def eval_config(cfg: TrainConfig, num_classes: int) -> SampleConfig:
    """The sampling configuration of `cfg`'s evaluations (the checkpoint and the folder are set per step); the
    paths absolute, so that the reproducing command works from any directory."""
    d = SampleConfig()
    return SampleConfig(
        model=CUSTOM_MODEL, vae=cfg.vae, vae_path=_absolute(cfg.vae_path), image_size=cfg.image_size,
        num_classes=num_classes, num_fid_samples=cfg.eval_samples, per_proc_batch_size=cfg.eval_batch_size,
        cfg_scale=cfg.eval_cfg_scale, num_sampling_steps=cfg.eval_steps, global_seed=cfg.eval_seed, tf32=cfg.tf32,
        sampler=eval_sampler(cfg), guidance_channels=cfg.eval_guidance_channels,
        label_sampling=cfg.eval_label_sampling, precision=cfg.eval_precision, dist_timeout=cfg.dist_timeout,
        save=cfg.eval_save, ref=_absolute(cfg.eval_ref), metrics=cfg.eval_metrics or d.metrics,
        eval_batch_size=cfg.eval_batch_size, inception_weights=_absolute(cfg.eval_inception_weights),
        cache_dir=_absolute(cfg.eval_cache_dir) or d.cache_dir, dinov2_weights=_absolute(cfg.eval_dinov2_weights),
        family=OBJECTIVE_FAMILY[cfg.objective],
    )


def in_train_flags(exc: UserError) -> ConfigError:
    """The sampler's one-line error with the sampler's flags renamed to train.py's."""
    text = str(exc)
    for flag, train_flag in TRAIN_FLAGS.items():
        text = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", train_flag, text)
    return ConfigError(text)


def check_eval_config(cfg: TrainConfig) -> None:
    """Every check of the --eval-* flags that needs no model (the sampler's, and --eval-ref's header against
    --eval-metrics and --eval-samples): one line naming train.py's flag, before the first step."""
    if not cfg.eval_every:
        return
    sample = eval_config(cfg, cfg.num_classes or 1)
    try:
        chosen = {"--save": (sample.save, SAVE_CHOICES), "--precision": (sample.precision, PRECISIONS)}
        for flag, (value, choices) in chosen.items():
            if value not in choices:
                raise ConfigError(f"{flag} {value} is not one of {', '.join(choices)}")
        validate(dataclasses.replace(sample, pack_only=True))  # the checkpoint is written later: its checks wait
        check_evaluation(sample)
    except UserError as exc:
        raise in_train_flags(exc) from None


@contextlib.contextmanager
def stop_signals_caught() -> Iterator[None]:
    """launch.runtime.preempt's handlers for the duration (a stop signal sets the flag that the sampling stream
    reads between batches); the previous handlers afterwards, so that the training outside behaves as before."""
    saved = {sig: signal.getsignal(sig) for sig in preempt.STOP_SIGNALS}
    preempt.install()
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def sample_ddp_args(cfg: SampleConfig) -> list[str]:
    """The argv of `sample_ddp.py` that samples and scores `cfg`'s run again (add --sample-dir: in the step's own
    folder it re-scores the stored features; elsewhere it samples afresh)."""
    cache = ["cache_dir"] if cfg.cache_dir != SampleConfig().cache_dir else []  # the reference statistics are there
    return command_line(cfg, SAMPLE_DDP_FIELDS + cache)


@dataclass
class StepEvaluation:
    """One evaluation: its step, configuration, the evaluator's report (None when stopped before the end), wall
    seconds, and whether a stop signal arrived (then the training stops after recording what it has)."""

    step: int
    cfg: SampleConfig
    report: dict[str, Any] | None
    seconds: float
    stopped: bool

    @property
    def metrics(self) -> dict[str, float]:
        """The chosen metrics under the report's keys (fid, precision, ...), those that could be computed."""
        if self.report is None:
            return {}
        keys = [JSON_KEYS[m] for m in parse_metrics(self.cfg.metrics)]
        return {key: self.report[key] for key in keys if self.report.get(key) is not None}

    def summary(self) -> str:
        """`FID 23.85, sFID 60.45, ...` in the evaluator's order and names."""
        names = {JSON_KEYS[m]: PRINT_NAMES[m] for m in parse_metrics(self.cfg.metrics)}
        return ", ".join(f"{names[key]} {value:.4g}" for key, value in self.metrics.items())

    def line(self) -> dict[str, Any]:
        """The metrics.jsonl record of this evaluation."""
        return {"step": self.step, "metrics": self.metrics, "eval_seconds": round(self.seconds, 3),
                "num_samples": self.cfg.num_fid_samples, "checkpoint": self.cfg.ckpt, "run_dir": str(self.cfg.run_dir),
                "sample_ddp_args": sample_ddp_args(self.cfg)}


class TrainingEvaluation:
    """What every evaluation of a training process shares, opened once: the feature network and the reference
    statistics (`RunEvaluation`), every sample's label, and the sampler (built at the first evaluation, from the
    first network: the same family and schedule at every step)."""

    def __init__(self, cfg: SampleConfig, info: dist.DistInfo, evaluation: RunEvaluation, labels: np.ndarray,
                 seconds: float):
        self.cfg, self.info, self.evaluation, self.labels = cfg, info, evaluation, labels
        self.open_seconds = seconds
        self.sampler: Any = None

    @classmethod
    def open(cls, cfg: SampleConfig, info: dist.DistInfo) -> TrainingEvaluation:
        """Load the feature network and the reference statistics on the training device (a collective)."""
        start = time.perf_counter()
        evaluation = open_evaluation(cfg, info.device)
        return cls(cfg, info, evaluation, run_labels(cfg), time.perf_counter() - start)

    def evaluate(self, step: int, network: Network, sample_dir: Path) -> StepEvaluation:
        """Every rank samples its share of the run folder under `sample_dir` from `network` (whose `checkpoint`
        names the file of these weights), features into the in-job metrics, the ranks reduce; rank 0 then writes
        the folder's grid and metrics.json. The model's train/eval mode is restored; a collective."""
        cfg = settle(self.cfg.replace(ckpt=str(Path(network.checkpoint).resolve()), sample_dir=str(sample_dir)),
                     network)  # as sample_ddp.py settles it from the file: the same identity
        if self.sampler is None:
            self.sampler = build_sampler(cfg, network)
        start = time.perf_counter()
        was_training = network.model.training
        network.model.eval()
        try:
            outcome = sample_folder(cfg, self.info, network, self.sampler, self.labels, self.evaluation)
        finally:
            network.model.train(was_training)
        dist.barrier()  # every rank's blocks are on disk before rank 0 reads the grid's images
        if self.info.is_main:
            dist.clear_reports(cfg.run_dir)
            if not outcome.stopped:
                finish_folder(cfg, outcome.run, outcome.report)
        _, late_stop = dist.all_reduce_progress(0, preempt.requested())  # a signal after the last batch counts too
        report = None if outcome.stopped else outcome.report
        return StepEvaluation(step, cfg, report, time.perf_counter() - start, outcome.stopped or late_stop)
