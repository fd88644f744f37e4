"""Where each sampled batch goes: the images (one PNG each, or image shards) and, with metrics in the job, the
feature network's features (added to this rank's accumulator and stored in feature blocks after their images,
so a resumed run extracts only what is new)."""

from __future__ import annotations

import time

import numpy as np
import torch

from evaluation.batches import PngWriter, read_pngs
from evaluation.features import FeatureAccumulator
from evaluation.inputs import EvaluationInputs
from evaluation.run_metrics import RunEvaluation
from launch.runtime import dist, partition, rundir
from sampling.config import SAVE_NONE, SAVE_PNG, SampleConfig
from sampling.stream import SampleBatch


class RunOutputs:
    """The consumers of one run's stream: PNGs (--save png), image shards (npz; none: the grid's images) and,
    with `evaluation`, the features: stored in blocks after their images and added to this rank's accumulator."""

    def __init__(self, cfg: SampleConfig, run: str, evaluation: RunEvaluation | None,
                 inputs: EvaluationInputs | None):
        self.cfg, self.run, self.evaluation, self.inputs = cfg, run, evaluation, inputs
        self.accumulator: FeatureAccumulator | None = evaluation.accumulator(inputs) if evaluation else None
        self.seconds = 0.0  # spent on features
        self.png = PngWriter(workers=cfg.png_workers) if cfg.save == SAVE_PNG else None
        image_dir = None if cfg.save == SAVE_PNG else cfg.folder.images
        feature_dir = cfg.folder.features(evaluation.weights_id) if evaluation else None
        self.blocks = None
        if image_dir is not None or feature_dir is not None:
            self.blocks = rundir.BlockWriter(cfg.num_fid_samples, cfg.shard_size, run, image_dir, feature_dir,
                                             keep_images_below=rundir.GRID_SIZE if cfg.save == SAVE_NONE else None,
                                             before_features=self.png.wait if self.png else None)

    def add(self, batch: SampleBatch) -> None:
        """One batch of the stream: written, and its features extracted."""
        array = batch.images.numpy()
        if self.png is not None:
            for i, image in zip(batch.indices, array):
                self.png.submit(self.cfg.folder.png(i, self.cfg.num_fid_samples), image)
        features = self._features(batch.images, batch.indices) if self.evaluation is not None else None
        if self.blocks is not None:
            self.blocks.add(batch.indices, array, features)

    def _features(self, images: torch.Tensor, indices: list[int]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        features = self.evaluation.extractor.extract(images)
        self.accumulator.add_features(features, indices)
        self.seconds += time.perf_counter() - start
        return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in features.items()}

    def resume(self, plan: rundir.ResumePlan, info: dist.DistInfo) -> None:
        """Add this rank's share of the stored features, and extract its share of the stored images without."""
        if self.evaluation is None:
            return
        start = time.perf_counter()
        kinds = self.evaluation.extractor.feature_dims
        mine = partition.split_evenly(plan.feature_blocks, info.world_size, info.rank)
        for indices, rows in rundir.load_features(mine, kinds):
            self.accumulator.add_features({k: torch.from_numpy(v) for k, v in rows.items()}, indices)
        self.seconds += time.perf_counter() - start
        todo = partition.split_evenly(plan.to_extract, info.world_size, info.rank)
        shards = None
        if todo and self.cfg.save != SAVE_PNG:
            shards = rundir.ImageShards.scan(self.cfg.run_dir, self.cfg.num_fid_samples, self.cfg.image_size,
                                             self.run)
        for batch in partition.batches(todo, self.cfg.per_proc_batch_size):
            features = self._features(torch.from_numpy(self._read(batch, shards)), batch)
            self.blocks.add(batch, None, features)
        self.blocks.flush()

    def _read(self, batch: list[int], shards: rundir.ImageShards | None) -> np.ndarray:
        if shards is not None:
            return shards.read(batch)
        n, size = self.cfg.num_fid_samples, self.cfg.image_size
        return read_pngs([self.cfg.folder.png(i, n) for i in batch], size, size)

    def close(self) -> None:
        """Write the last block and every PNG in flight."""
        try:
            if self.blocks is not None:
                self.blocks.flush()
        finally:
            if self.png is not None:
                self.png.close()

    def report(self) -> dict:
        """The evaluator's report of the run: ranks reduced (a collective)."""
        return self.evaluation.report(self.inputs, self.accumulator, self.seconds)
