"""The work plan: global sample indices -> ranks -> batches, with per-index seeds and labels.

Nothing here depends on the world size except which rank draws which index, so sample i is
the same image whatever the cluster looks like (see diffusion/rng.py for the seed formula).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

LABEL_SAMPLING = ("random", "balanced")
LABEL_RULES = {  # recorded in the manifest
    "random": "label_i is the first draw, randint(num_classes), of sample i's own generator",
    "balanced": "labels = numpy.random.default_rng(global_seed).permutation(arange(N) % num_classes)",
}


def share_bounds(n: int, part: int, parts: int) -> tuple[int, int]:
    """[start, stop) of contiguous share `part` of `parts` over n items: floor(n/parts) or ceil(n/parts) each."""
    return n * part // parts, n * (part + 1) // parts


def split_evenly(items: Sequence[int], parts: int, part: int) -> Sequence[int]:
    """Contiguous share `part` of `parts` of `items` (the one even-split rule, `share_bounds`)."""
    start, stop = share_bounds(len(items), part, parts)
    return items[start:stop]


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Cut `indices` into batches of `batch_size` (the last one may be smaller)."""
    return [list(indices[a: a + batch_size]) for a in range(0, len(indices), batch_size)]


def num_rounds(num_missing: int, world_size: int, batch_size: int) -> int:
    """Loop iterations every rank runs: the batch count of the largest share (equal on all ranks)."""
    return math.ceil(math.ceil(num_missing / world_size) / batch_size) if num_missing else 0


def plan_labels(num_samples: int, num_classes: int, global_seed: int, mode: str,
                seed_fn: Callable[[int, int], int]) -> np.ndarray:
    """Class label of every global index, int64 [N].

    random: label_i is the first draw, randint(num_classes), of sample i's own generator.
    balanced: a permutation (numpy default_rng(global_seed)) of `arange(N) % num_classes`, so each
    class appears floor(N/C) or ceil(N/C) times (exactly N/C when C divides N).
    """
    if mode == "balanced":
        rng = np.random.default_rng(global_seed)
        return rng.permutation(np.arange(num_samples, dtype=np.int64) % num_classes)
    if mode != "random":
        raise ValueError(f"label sampling must be one of {LABEL_SAMPLING}, got {mode!r}")
    labels = np.empty(num_samples, dtype=np.int64)
    gen = torch.Generator()
    for i in range(num_samples):
        gen.manual_seed(seed_fn(global_seed, i))
        labels[i] = int(torch.randint(num_classes, (1,), generator=gen))
    return labels


def rank_batches(missing: Sequence[int], world_size: int, rank: int, batch_size: int) -> Iterator[list[int]]:
    """This rank's batches of the still-missing indices, padded with empty batches to `num_rounds`."""
    mine = batches(split_evenly(missing, world_size, rank), batch_size)
    rounds = num_rounds(len(missing), world_size, batch_size)
    yield from mine
    for _ in range(rounds - len(mine)):
        yield []
