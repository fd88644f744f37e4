"""Tiny DINOv2 backbones in the official torch hub layout (dinov2_vitl14_pretrain.pth's keys), for tests: the real
ViT-L/14 is 1.2 GB and ~1 s per image on a CPU core."""

from __future__ import annotations

import torch

PATCH = 14
POS_GRID = 37  # the official models are built for 518 px: 37 x 37 patches
TINY_DIM = 128  # two 64-d heads
TINY_DEPTH = 2
MLP_RATIO = 4
WEIGHT_STD = 0.05


def make_dinov2_state(dim: int = TINY_DIM, depth: int = TINY_DEPTH, seed: int = 0, patch: int = PATCH,
                      grid: int = POS_GRID) -> dict[str, torch.Tensor]:
    """Random weights under the official key names and shapes (cls_token, pos_embed [1, 1 + grid^2, dim],
    mask_token, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2,
    ls2.gamma}, norm). Layer scales and norms are randomised too, so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = WEIGHT_STD, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    hidden = MLP_RATIO * dim
    state = {"cls_token": randn(1, 1, dim, std=0.5), "pos_embed": randn(1, 1 + grid * grid, dim, std=0.5),
             "mask_token": randn(1, dim), "patch_embed.proj.weight": randn(dim, 3, patch, patch),
             "patch_embed.proj.bias": randn(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": randn(dim, std=0.1, mean=1.0), b + "norm1.bias": randn(dim),
            b + "attn.qkv.weight": randn(3 * dim, dim, std=0.15), b + "attn.qkv.bias": randn(3 * dim),
            b + "attn.proj.weight": randn(dim, dim), b + "attn.proj.bias": randn(dim),
            b + "ls1.gamma": randn(dim, std=0.1, mean=0.5),
            b + "norm2.weight": randn(dim, std=0.1, mean=1.0), b + "norm2.bias": randn(dim),
            b + "mlp.fc1.weight": randn(hidden, dim), b + "mlp.fc1.bias": randn(hidden),
            b + "mlp.fc2.weight": randn(dim, hidden), b + "mlp.fc2.bias": randn(dim),
            b + "ls2.gamma": randn(dim, std=0.1, mean=0.5),
        })
    state["norm.weight"], state["norm.bias"] = randn(dim, std=0.1, mean=1.0), randn(dim)
    return state
