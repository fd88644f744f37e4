"""Sampling as a stream: for the indices a rank still owes, batches of (indices, labels, uint8 images).

    stream = SampleStream(cfg, info, network, sampler, labels, plan.to_sample)
    for batch in stream:          # batch.indices [B], batch.labels [B], batch.images uint8 [B, H, W, 3] (CPU)
        outputs.add(batch)        # PNGs or image shards, in-job features, ...
    stream.stopped                # True when a stop signal ended it early (every rank agrees)

Sample i's class label, x_T and every step's noise come from its own generator (diffusion.rng), so the images do
not depend on the number of processes or the batch size. Every rank runs the same number of rounds (empty
batches pad the shorter shares) and, after its consumer took a batch, joins one small collective per round that
sums the progress and carries a stop request, so a signal to any rank stops all of them between batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from diffusion.flow import FlowSampler
from diffusion.guidance import guided_model
from diffusion.rng import SampleNoise
from diffusion.samplers import Sampler
from launch.runtime import dist, partition, preempt
from launch.runtime.errors import RankError
from models.vae import CODEC_NONE
from sampling.config import SampleConfig
from sampling.network import Network, autocast


class DivergedError(RankError):
    """The model produced NaN or Inf for a sample (a diverged checkpoint, or a bf16 overflow)."""


@dataclass
class SampleBatch:
    """One batch of the stream: global sample indices [B], their labels int64 [B], uint8 images [B, H, W, 3]."""

    indices: list[int]
    labels: np.ndarray
    images: torch.Tensor


def padded(batch: list[int], size: int) -> list[int]:
    """`batch` padded to `size` with copies of its first index (their images are discarded): one shape."""
    return batch + [batch[0]] * (size - len(batch))


class SampleStream:
    """This rank's batches of `missing` (all ranks' missing indices, sorted), sampled with `sampler` from
    `network`; `between_rounds` runs on every rank after each round's batch was consumed (e.g. refreshing the
    run folder's lock)."""

    def __init__(self, cfg: SampleConfig, info: dist.DistInfo, network: Network, sampler: Sampler | FlowSampler,
                 labels: np.ndarray, missing: Sequence[int], between_rounds: Callable[[], None] | None = None):
        self.cfg, self.info, self.network, self.sampler = cfg, info, network, sampler
        self.labels, self.missing = labels, list(missing)
        self.between_rounds = between_rounds
        self.stopped = False
        model = network.model
        self.model_fn = guided_model(model, cfg.cfg_scale, cfg.num_classes, cfg.guidance_channels,
                                     cfg.guidance_interval)
        self.latent_shape = (model.in_channels, model.input_size, model.input_size)
        self.clip = cfg.vae == CODEC_NONE  # pixel-space x0 lives in [-1, 1]; latents are not clipped (as DiT)

    def __iter__(self) -> Iterator[SampleBatch]:
        cfg, info = self.cfg, self.info
        N = cfg.num_fid_samples
        bar = tqdm(total=N, initial=N - len(self.missing), unit="img", disable=not info.is_main,
                   dynamic_ncols=True, desc="sampling")
        try:
            for batch in partition.rank_batches(self.missing, info.world_size, info.rank, cfg.per_proc_batch_size):
                if batch:
                    yield self.sample(batch)
                if self.between_rounds is not None:
                    self.between_rounds()
                dist.heartbeat()
                done, stop = dist.all_reduce_progress(len(batch), preempt.requested())
                bar.update(done)
                if stop:
                    self.stopped = True
                    return
        finally:
            bar.close()

    @torch.no_grad()
    def sample(self, batch: list[int]) -> SampleBatch:
        """The images of the global indices `batch`, padded to the full batch inside (one compiled shape)."""
        cfg, device = self.cfg, self.info.device
        rows = padded(batch, cfg.per_proc_batch_size)
        noise = SampleNoise.for_samples(cfg.global_seed, rows, cfg.num_classes)
        z = noise.randn(self.latent_shape, device)
        y = torch.as_tensor(self.labels[rows], device=device)
        with autocast(cfg, device):
            x0 = self.sampler(self.model_fn, z, noise=noise, model_kwargs={"y": y}, clip_denoised=self.clip)
        finite = torch.isfinite(x0).flatten(1).all(dim=1)  # [B], read with the decoded batch (no extra sync)
        images = self.network.codec.decode(x0.float(), self.cfg.to_uint8)[: len(batch)]
        self._check_finite(batch, finite.cpu())
        return SampleBatch(batch, self.labels[batch], images)

    def _check_finite(self, batch: list[int], finite: torch.Tensor) -> None:
        """End the run at the first sample whose latents or outputs went NaN/Inf (its image is never written)."""
        if not bool(finite[: len(batch)].all()):
            first = batch[int((~finite[: len(batch)]).nonzero()[0])]
            cfg = self.cfg
            raise DivergedError(f"checkpoint {self.network.checkpoint} produced NaN or Inf for sample {first} "
                                f"(--precision {cfg.precision}); it has diverged: use an earlier checkpoint"
                                + (" or --precision fp32" if cfg.precision == "bf16" else ""))
