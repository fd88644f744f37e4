"""The work plan: global sample indices -> ranks -> batches.

Nothing here depends on the world size except which rank draws which index, so sample i is
the same image whatever the cluster looks like (diffusion/rng.py owns the seeds and the labels).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence


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


def rank_batches(missing: Sequence[int], world_size: int, rank: int, batch_size: int) -> Iterator[list[int]]:
    """This rank's batches of the still-missing indices, padded with empty batches to `num_rounds`."""
    mine = batches(split_evenly(missing, world_size, rank), batch_size)
    rounds = num_rounds(len(missing), world_size, batch_size)
    yield from mine
    for _ in range(rounds - len(mine)):
        yield []
