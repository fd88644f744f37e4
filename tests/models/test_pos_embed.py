"""2-D sin-cos position embedding against a straightforward loop over tokens and dimensions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.dit import DiT
from models.pos_embed import sincos_1d, sincos_2d


def loop_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Token k = row*grid_w + col: [sin(col*w_i), cos(col*w_i), sin(row*w_i), cos(row*w_i)], w_i = 1e4^(-i/(dim/4))."""
    quarter = dim // 4
    out = np.zeros((grid_h * grid_w, dim))
    for row in range(grid_h):
        for col in range(grid_w):
            k = row * grid_w + col
            for i in range(quarter):
                omega = 10000.0 ** (-i / quarter)
                out[k, i] = math.sin(col * omega)
                out[k, quarter + i] = math.cos(col * omega)
                out[k, 2 * quarter + i] = math.sin(row * omega)
                out[k, 3 * quarter + i] = math.cos(row * omega)
    return out


@pytest.mark.parametrize("dim,grid", [(16, 4), (32, 7), (8, (3, 5)), (64, 1), (1152, 2)])
def test_sincos_2d_matches_loop(dim, grid):
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    got = sincos_2d(dim, grid)
    assert got.dtype == np.float32
    assert got.shape == (gh * gw, dim)
    np.testing.assert_allclose(got, loop_pos_embed(dim, gh, gw), rtol=0, atol=1e-6)


def test_sincos_1d_order_is_sin_then_cos():
    emb = sincos_1d(4, np.array([0.0, 1.0]))
    np.testing.assert_allclose(emb[0], [0, 0, 1, 1])  # sin(0)=0 first, cos(0)=1 second
    np.testing.assert_allclose(emb[1], [math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2)])


def test_bad_dimension_raises():
    with pytest.raises(ValueError):
        sincos_2d(6, 2)


def test_dit_pos_embed_is_fixed_and_saved():
    model = DiT(input_size=12, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=3)
    assert "pos_embed" in model.state_dict()
    assert not model.pos_embed.requires_grad
    assert tuple(model.pos_embed.shape) == (1, 36, 32)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), loop_pos_embed(32, 6, 6), atol=1e-6)
