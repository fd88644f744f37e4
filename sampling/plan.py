"""What a run still owes, on every rank: the run folder opened (rank 0: lock, identity, manifest), what it holds
checked (PNGs decoded, image shards and feature blocks read back against their checksums, the work split over
the ranks), and the plan that follows: the images to sample and the stored images whose features are missing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion.flow import FLOW_FAMILIES, TIME_CONVENTION, FlowSampler
from diffusion.rng import LABEL_RULES, SEED_RULE
from diffusion.samplers import Sampler
from evaluation.batches import png_is_valid
from evaluation.run_metrics import RunEvaluation
from launch.runtime import dist, partition, rundir
from launch.runtime.blocks import Block
from launch.runtime.files import file_sha256
from launch.runtime.versions import package_versions
from models.vae import UINT8_RULES
from sampling.config import SAVE_NONE, SAVE_PNG, SampleConfig
from sampling.presets import PRESETS


def run_identity(cfg: SampleConfig) -> dict:
    """The identity of the run (what changes its images), with the checkpoint's content hash."""
    return cfg.identity(file_sha256(cfg.ckpt) if cfg.ckpt else None)


def model_record(cfg: SampleConfig, meta: dict) -> dict:
    """What the manifest says about the model: its family, how it was recognised, the time convention the
    user's numbers are in, the uint8 conversion, and the preset with the settings the command line changed."""
    record = {"family": cfg.family, "family_evidence": meta.get("family_evidence", "DiT keys"),
              "family_assumed": bool(meta.get("family_assumed", False)), "uint8": UINT8_RULES[cfg.to_uint8],
              "published_weights": cfg.published if cfg.ckpt is None else None}
    if cfg.family in FLOW_FAMILIES:
        record["time_convention"] = TIME_CONVENTION
        record["guidance_interval_in"] = "flow time t in [0, 1], 1 = noise (REPA's --guidance-low/high)"
    else:
        record["guidance_interval_in"] = "training timesteps 0..T-1"
    if cfg.preset is not None:
        record["preset"] = {"name": cfg.preset, "settings": PRESETS[cfg.preset].settings,
                            "overridden": {k: getattr(cfg, k) for k in cfg.preset_overrides}}
    return record


def open_folder(cfg: SampleConfig, info: dist.DistInfo, labels: np.ndarray, lock: rundir.RunLock,
                sampler: Sampler | FlowSampler, identity: dict, meta: dict | None = None) -> None:
    """Rank 0: lock the run folder, check or create it, remove what killed writers left, start this session in
    its manifest."""
    manifest = rundir.prepare(cfg.run_dir, identity, cfg.overwrite, lock)
    cfg.folder.remove_temporaries()
    dist.clear_reports(cfg.run_dir)
    if manifest is None:
        manifest = rundir.Manifest(cfg.run_dir, {
            "version": rundir.MANIFEST_VERSION, "identity": identity, "config": dataclasses.asdict(cfg),
            "sampler": sampler.describe(), "model": model_record(cfg, meta or {}), "seed_formula": SEED_RULE,
            "label_rule": LABEL_RULES[cfg.label_sampling], "labels": labels.tolist(), "sessions": []})
    manifest.data["versions"] = package_versions()
    manifest.start_session(world_size=info.world_size, per_proc_batch_size=cfg.per_proc_batch_size,
                           device=info.device.type)


def png_checker(image_size: int):  # noqa: ANN201 - a predicate over paths
    """A resume-scan predicate: the PNG decodes completely and is an RGB image of `image_size`."""
    size = (image_size, image_size)

    def valid(path: Path) -> bool:
        try:
            with Image.open(path) as im:
                if im.size != size or im.mode != "RGB":
                    return False
        except (OSError, SyntaxError, ValueError):
            return False
        return png_is_valid(path)

    return valid


def find_missing_pngs(cfg: SampleConfig, info: dist.DistInfo) -> list[int]:
    """Every index whose PNG is absent, truncated or of the wrong size, over all ranks (sorted; a collective)."""
    N = cfg.num_fid_samples
    local = rundir.scan_missing(cfg.run_dir, N, info.world_size, info.rank, lambda i: rundir.index_filename(i, N),
                                png_checker(cfg.image_size))
    return sorted(i for part in dist.all_gather_object(local) for i in part)


def stored_images(cfg: SampleConfig) -> np.ndarray:
    """bool [N]: the images this run keeps on disk (--save none: only the grid's, in a shard)."""
    stored = np.ones(cfg.num_fid_samples, bool)
    if cfg.save == SAVE_NONE:
        stored[rundir.GRID_SIZE:] = False
    return stored


def _scan(cfg: SampleConfig, run: str, evaluation: RunEvaluation | None) -> tuple[list[Block], list[Block] | None]:
    """Rank 0: the image shards and feature blocks that claim to be this run's (headers and origins)."""
    N = cfg.num_fid_samples
    shards = [] if cfg.save == SAVE_PNG else rundir.scan_blocks(
        cfg.folder.images, N, rundir.image_rows(cfg.image_size), run, rundir.IMAGES_CONTENT)
    features = None
    if evaluation is not None:
        folder = cfg.folder.features(evaluation.weights_id)
        features = rundir.scan_blocks(folder, N, rundir.feature_rows(evaluation.extractor.feature_dims), run,
                                      folder.name)
    return shards, features


def _verify(blocks: list[Block], names: list[str], info: dist.DistInfo) -> set[Path]:
    """Every rank reads its share of `blocks` against their checksums; the damaged ones, known to all ranks."""
    mine = partition.split_evenly(blocks, info.world_size, info.rank)
    bad = [(str(path), why) for path, why in rundir.damaged_blocks(mine, names)]
    everyone = [item for part in dist.all_gather_object(bad) for item in part]
    if info.is_main:
        for path, why in everyone:
            rundir.set_aside(Path(path), why)
    return {Path(path) for path, _ in everyone}


def plan_work(cfg: SampleConfig, info: dist.DistInfo, identity: dict,
              evaluation: RunEvaluation | None) -> rundir.ResumePlan:
    """What the run folder still owes (a collective; every rank gets the same plan): images to sample, stored
    images lacking features. PNGs are decoded by all ranks (each its share), blocks read back by all ranks (each
    its share); blocks of another run or damaged are set aside, feature blocks superseded by images sampled
    again deleted."""
    N = cfg.num_fid_samples
    run = rundir.run_id(identity)
    missing = find_missing_pngs(cfg, info) if cfg.save == SAVE_PNG else []
    shards, features = dist.rank0_shares(lambda: _scan(cfg, run, evaluation))
    kinds = list(evaluation.extractor.feature_dims) if evaluation is not None else []
    damaged = _verify(shards, [rundir.IMAGES_KEY], info) | _verify(features or [], kinds, info)

    def decide() -> rundir.ResumePlan:
        if cfg.save == SAVE_PNG:
            kept = np.ones(N, bool)
            kept[missing] = False
        else:
            kept = rundir.ImageShards([b for b in shards if b.path not in damaged], N, cfg.image_size).kept
        blocks = None if features is None else [b for b in features if b.path not in damaged]
        plan = rundir.plan_resume(kept, stored_images(cfg), blocks)
        for path in plan.stale:
            path.unlink(missing_ok=True)
        return plan

    plan = dist.rank0_shares(decide)
    dist.print0(f"{cfg.run_dir}: {N - len(plan.to_sample)} of {N} images present, {len(plan.to_sample)} to sample "
                f"on {info.world_size} process(es)")
    if evaluation is not None:
        have = sum(block.indices.shape[0] for block in plan.feature_blocks)
        dist.print0(f"features ({evaluation.weights_id}): {have} of {N} stored, {len(plan.to_extract)} to extract "
                    f"from stored images, {len(plan.to_sample)} with the new samples")
    return plan
