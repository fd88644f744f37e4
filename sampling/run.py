"""The sampling run, composed of its pieces in one order for every command (sample_ddp.py, launch.pipeline,
launch.sweep, train.py's evaluation):

    info = start_process(cfg)                          # process group, fail-fast, stop signals, numerics
    network = load_network(cfg, info.device)           # once per process (sampling.network)
    outcome = sample_folder(cfg, info, network, ...)   # every rank: plan -> stream -> consumers (-> report)
    dist.barrier(); dist.shutdown()                    # every rank's files are on disk
    finish_folder(cfg, outcome.run, outcome.report)    # rank 0 alone: grid, .npz, metrics (sampling.finish)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusion.flow import FlowSampler
from diffusion.rng import SEED_RULE, class_labels
from diffusion.samplers import Sampler
from evaluation.protocol import add_sampling_fields, hash_file
from evaluation.run_metrics import RunEvaluation, check_reference
from launch.runtime import dist, preempt, rundir
from launch.runtime.errors import EXIT_OK, EXIT_PREEMPTED
from models.vae import UINT8_RULES
from sampling.config import SampleConfig
from sampling.consumers import RunOutputs
from sampling.finish import finish_folder, pack
from sampling.network import Network, build_sampler, load_network, settle
from sampling.plan import open_folder, plan_work, run_identity
from sampling.stream import SampleStream

PREEMPTED_LINE = "preemption signal received: in-flight images and features written; rerun the same command to resume"


@dataclass
class Outcome:
    """How one run folder's sampling ended: stopped by a signal, and (with metrics in the job) the report."""

    stopped: bool
    report: dict | None
    run: str  # the run identity's id, which every block of the folder carries


def start_process(cfg: SampleConfig) -> dist.DistInfo:
    """Join the process group, install the fail-fast and stop-signal handlers, set the numerics flags."""
    info = dist.init(cfg.dist_timeout)
    dist.install_fail_fast()
    preempt.install()
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    return info


def open_evaluation(cfg: SampleConfig, device: torch.device) -> RunEvaluation:
    """The feature network and the reference statistics of --ref, once per process (a collective)."""
    reference, metrics = check_reference(cfg.ref, cfg.metrics, cfg.dinov2_resize)
    return RunEvaluation.open(reference, metrics, device, cfg.eval_batch_size, cfg.inception_weights,
                              allow_download=not cfg.no_download,
                              cache_dir=None if cfg.no_cache else Path(cfg.cache_dir),
                              bootstrap=cfg.bootstrap, bootstrap_seed=cfg.bootstrap_seed,
                              dinov2_weights=cfg.dinov2_weights, dinov2_resize=cfg.dinov2_resize)


def run_labels(cfg: SampleConfig) -> np.ndarray:
    """Every sample's class label, by the seed rule (drawn once per run)."""
    return class_labels(cfg.num_fid_samples, cfg.num_classes, cfg.global_seed, cfg.label_sampling)


def sample_folder(cfg: SampleConfig, info: dist.DistInfo, network: Network, sampler: Sampler | FlowSampler,
                  labels: np.ndarray, evaluation: RunEvaluation | None) -> Outcome:
    """One run folder, on every rank: open it (rank 0), plan what it owes, resume the stored features, stream the
    missing samples into the outputs and, with `evaluation`, reduce the features into the report."""
    lock = rundir.RunLock(cfg.run_dir)
    identity = run_identity(cfg)
    run = rundir.run_id(identity)
    try:
        dist.rank0_shares(lambda: open_folder(cfg, info, labels, lock, sampler, identity, network.meta))
        dist.report_failures_in(cfg.run_dir)  # a rank that fails leaves its line here for the others
        inputs = evaluation.inputs(cfg.run_dir, cfg.num_fid_samples, cfg.image_size) if evaluation else None
        plan = plan_work(cfg, info, identity, evaluation)
        outputs = RunOutputs(cfg, run, evaluation, inputs)
        try:
            outputs.resume(plan, info)
            stream = SampleStream(cfg, info, network, sampler, labels, plan.to_sample, between_rounds=lock.refresh)
            for batch in stream:
                outputs.add(batch)
        finally:
            outputs.close()
        report = outputs.report() if evaluation is not None and not stream.stopped else None
        if report is not None:
            add_sampling_fields(report, **sampling_protocol(cfg, info, network, sampler))
        return Outcome(stream.stopped, report, run)
    finally:
        lock.release()


def sampling_protocol(cfg: SampleConfig, info: dist.DistInfo, network: Network, sampler: Sampler | FlowSampler
                      ) -> dict:
    """What the run's numbers depend on besides the yardstick: the protocol's sampling fields of
    `<run>.metrics.json`, which `python -m evaluation.compare` reads side by side (a collective: rank 0 hashes
    the checkpoint, remembered in the reference cache folder)."""
    memo = None if cfg.no_cache else Path(cfg.cache_dir)
    return {"model": cfg.model, "checkpoint_sha256": dist.rank0_shares(lambda: hash_file(network.checkpoint, memo)),
            "family": network.family, "sampler": sampler.name, "num_steps": cfg.num_sampling_steps,
            "nfe": sampler.nfe, "guidance_scale": cfg.cfg_scale, "guidance_channels": cfg.guidance_channels,
            "guidance_interval": list(cfg.guidance_interval) if cfg.guidance_interval else None,
            "uint8_conversion": UINT8_RULES[cfg.to_uint8], "precision": cfg.precision,
            "label_sampling": cfg.label_sampling, "vae": cfg.vae, "world_size": info.world_size,
            "seed_rule": SEED_RULE, "global_seed": cfg.global_seed}


def run(cfg: SampleConfig) -> int:
    """The whole run as sample_ddp.py and the pipeline do it: sample every missing image (with --ref: and its
    features), then, on rank 0, write the grid, the `.npz` and the metrics. Returns an exit code."""
    info = start_process(cfg)
    if cfg.pack_only:
        if info.is_main:
            pack(cfg)
        return EXIT_OK
    labels = run_labels(cfg)
    network = load_network(cfg, info.device)
    cfg = settle(cfg, network)
    sampler = build_sampler(cfg, network)
    evaluation = open_evaluation(cfg, info.device) if cfg.ref else None
    outcome = sample_folder(cfg, info, network, sampler, labels, evaluation)
    dist.barrier()  # every rank's files are on disk; rank 0 finishes alone, with no collective pending
    dist.shutdown()
    if info.is_main:
        dist.clear_reports(cfg.run_dir)
    if outcome.stopped:
        dist.print0(PREEMPTED_LINE)
        return EXIT_PREEMPTED
    if info.is_main:
        finish_folder(cfg, outcome.run, outcome.report)
    return EXIT_OK
