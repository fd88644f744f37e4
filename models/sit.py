"""Scalable Interpolant Transformers (SiT, Ma et al. 2024) and REPA's SiT (Yu et al. 2025): DiT's body.

SiT is the DiT network (same timm blocks, adaLN-Zero, the same official state-dict keys and named sizes)
trained to predict the velocity of a linear interpolant instead of the noise. As in the official SiT,
``learn_sigma`` keeps the doubled output layer of DiT (so official files load key for key) and the forward
returns the first half, the velocity. REPA's SiT has no learned sigma, optionally normalises queries and
keys per head (``qk_norm``), and adds projector MLPs on the tokens after ``encoder_depth`` blocks
(``projectors.{k}.{0,2,4}``) that align them with a pretrained encoder's features during training; they are
not used for sampling, and its forward returns ``(x, zs)``.

Each family's network sees time in its own convention (SiT: t = 0 noise, t = 1 data; REPA: t = 1 noise):
the samplers of ``diffusion.flow`` convert, the networks here take ``t`` as their training code gave it.

Shapes: B batch, C channels, H = W = input_size, T tokens, D hidden size, Z a projector's output size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from models.dit import DIT_CONFIGS, DiT

SIT_PREFIX = "SiT-"
REPA_ENCODER_DEPTH = 8  # REPA's default: the projected tokens are the 8th block's output
REPA_PROJECTOR_DIM = 2048  # hidden width of REPA's projector MLPs
REPA_Z_DIMS = (768,)  # DINOv2-B features: REPA's default encoder
PROJECTOR_LINEARS = 3  # Linear-SiLU-Linear-SiLU-Linear

# The named sizes are DiT's (Table 1 of the DiT paper); SiT and REPA use the same numbers.
SIT_CONFIGS: dict[str, dict[str, int]] = {
    SIT_PREFIX + name[len("DiT-"):]: dict(cfg) for name, cfg in DIT_CONFIGS.items()
}


class SiT(DiT):
    """forward(x [B,C,H,W], t [B], y [B]) -> the velocity [B, C, H, W] in the network's own time convention.

    The parameters are DiT's (``learn_sigma`` default True as the official SiT: a doubled output layer whose
    second half is never used).
    """

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, C, H, W], t [B], y [B] (null = ``num_classes``) -> velocity [B, C, H, W]."""
        out = super().forward(x, t, y, force_drop_ids)
        return out[:, : self.in_channels] if self.learn_sigma else out


def projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's projector: Linear(D, P) - SiLU - Linear(P, P) - SiLU - Linear(P, Z), applied token-wise."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class REPASiT(SiT):
    """REPA's SiT: forward(x, t, y) -> (velocity [B, C, H, W], zs: one [B, T, Z_k] per projector).

    zs are the projectors applied to the tokens after ``encoder_depth`` blocks (training only).
    """

    def __init__(
        self,
        *,
        encoder_depth: int = REPA_ENCODER_DEPTH,
        z_dims: Sequence[int] = REPA_Z_DIMS,
        projector_dim: int = REPA_PROJECTOR_DIM,
        learn_sigma: bool = False,
        **dit_kwargs: object,
    ) -> None:
        super().__init__(learn_sigma=learn_sigma, **dit_kwargs)
        if not 1 <= encoder_depth <= self.depth:
            raise ValueError(f"REPA encoder_depth {encoder_depth} must be in 1..depth ({self.depth})")
        self.encoder_depth = encoder_depth
        self.projectors = nn.ModuleList(projector(self.hidden_size, projector_dim, z) for z in z_dims)
        for module in self.projectors.modules():  # REPA initialises them as every linear: xavier, zero bias
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, C, H, W], t [B], y [B] -> (velocity [B, C, H, W], [zs_k [B, T, Z_k]])."""
        tokens, c = self.embed(x, t, y, force_drop_ids)
        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c)
            if i + 1 == self.encoder_depth:
                zs = [proj(tokens) for proj in self.projectors]  # token-wise: [B, T, Z_k]
        out = self.head(tokens, c)
        return (out[:, : self.in_channels] if self.learn_sigma else out), zs


SiT_models: dict[str, Callable[..., SiT]] = {name: functools.partial(SiT, **cfg) for name, cfg in SIT_CONFIGS.items()}
