"""Per-sample random streams: every random number of sample i comes from its own generator.

seed_i = global_seed * 2**32 + i, so sample i gets the same class label, the same initial noise
and the same noise at every step whatever the world size, the per-process batch size, or how
often the job was resumed (as in EDM's generate.py, one generator per image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SEED_STRIDE = 2**32
MAX_GLOBAL_SEED = 2**32 - 1


def sample_seed(global_seed: int, index: int) -> int:
    """The seed of sample `index`: global_seed * 2**32 + index (unique for index < 2**32)."""
    if not 0 <= global_seed <= MAX_GLOBAL_SEED:
        raise ValueError(f"global seed must be in [0, {MAX_GLOBAL_SEED}], got {global_seed}")
    if not 0 <= index < SEED_STRIDE:
        raise ValueError(f"sample index must be in [0, 2**32), got {index}")
    return global_seed * SEED_STRIDE + index


class SampleNoise:
    """One CPU torch.Generator per sample of a batch; usable as a `noise_fn` of the samplers.

    Noise is drawn on the CPU in float32 and then moved, so it is the same on every device.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample -> LongTensor [B]."""
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators])

    def randn(self, shape: Sequence[int], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise [B, *shape], sample b from generator b."""
        noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])
        return noise.to(device=device, dtype=dtype)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} samples but {len(self.generators)} generators")
        return self.randn(like.shape[1:], like.device, like.dtype)
