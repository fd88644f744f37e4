"""Fixed 2-D sine-cosine position embedding (as in MAE and DiT).

Token ``k = row * grid_w + col`` gets a ``dim``-vector whose first half encodes the
column index and whose second half encodes the row index. Each half is a 1-D embedding
``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 1 / 10000^(i / (dim/4))``.
(The official code builds the grid with ``np.meshgrid(w, h)``, so its "grid[0]" is the
column coordinate; we reproduce that order exactly because checkpoints depend on it.)
Computed in float64 and returned as float32.
"""

from __future__ import annotations

import numpy as np

POS_EMBED_MAX_PERIOD = 10000.0  # base of the frequency ladder (Vaswani et al. 2017, Sec. 3.5)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """1-D embedding of ``positions`` [M] -> float64 [M, dim], ordered [sin | cos]."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dimension, got {dim}")
    half = dim // 2
    omega = 1.0 / POS_EMBED_MAX_PERIOD ** (np.arange(half, dtype=np.float64) / half)  # [dim/2]
    angles = np.outer(np.asarray(positions, dtype=np.float64).reshape(-1), omega)  # [M, dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int | tuple[int, int]) -> np.ndarray:
    """2-D embedding for a ``grid_h x grid_w`` token grid -> float32 [grid_h * grid_w, dim].

    ``grid_size`` is an int (square grid) or ``(grid_h, grid_w)``.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")  # [gh, gw] each
    emb_cols = sincos_1d(dim // 2, cols.reshape(-1))  # [T, dim/2]  first half: column index
    emb_rows = sincos_1d(dim // 2, rows.reshape(-1))  # [T, dim/2]  second half: row index
    return np.concatenate([emb_cols, emb_rows], axis=1).astype(np.float32)
