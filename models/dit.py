"""Diffusion Transformer (DiT, Peebles & Xie 2023), key-for-key compatible with the official checkpoints.

Parameter names follow the official release (``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
``y_embedder.embedding_table``, ``blocks.{i}.attn.{qkv,proj}``, ``blocks.{i}.mlp.{fc1,fc2}``,
``blocks.{i}.adaLN_modulation.1``, ``final_layer.{linear,adaLN_modulation.1}``, ``pos_embed``), so an
official state dict loads with ``strict=True``. As in the official code, the patch embedding, attention and
MLP are timm's ``PatchEmbed``, ``Attention`` and ``Mlp``; attention always takes the fused
``F.scaled_dot_product_attention`` path so that the bytes of a sample do not depend on ``$TIMM_FUSED_ATTN``.

Shapes: B batch, C channels, H = W = input_size, p patch, T = (H/p)^2 tokens, D hidden size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import nn

from models.pos_embed import sincos_2d

LAYER_NORM_EPS = 1e-6  # all DiT LayerNorms: no affine parameters, eps 1e-6
FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features fed to the t-MLP
TIMESTEP_MAX_PERIOD = 10000.0  # lowest frequency of the timestep embedding
EMBED_INIT_STD = 0.02  # normal init of the label table and the t-MLP weights
NUM_ADALN_CHUNKS_BLOCK = 6  # shift/scale/gate for attention and for the MLP
NUM_ADALN_CHUNKS_FINAL = 2  # shift/scale before the final linear
CLASS_DROPOUT_PROB = 0.1  # default label dropout for classifier-free guidance training
MLP_RATIO = 4.0  # MLP hidden width / model width
LATENT_CHANNELS = 4  # the SD VAE's latent channels: the official in_channels
NUM_CLASSES = 1000  # ImageNet-1k: the official num_classes
QK_NORM_LAYER = nn.LayerNorm  # REPA's qk-norm: timm's former default norm (affine, eps 1e-5) over each head

_gelu_tanh = functools.partial(nn.GELU, approximate="tanh")  # the MLP activation of the official DiT


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, T, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_frequencies(dim: int, max_period: float = TIMESTEP_MAX_PERIOD) -> torch.Tensor:
    """freq_i = exp(-ln(max_period) * i / half), i = 0..half-1 -> float32 [dim // 2], computed on the CPU.

    Float32 on the CPU, as the official GLIDE/DiT code, so the bits do not depend on the device.
    """
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device="cpu") / half)


def timestep_embedding(t: torch.Tensor, dim: int, freqs: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t [B] -> [B, dim], ordered [cos | sin].

    ``freqs``: :func:`timestep_frequencies` ``(dim)`` on ``t``'s device. An odd ``dim`` gets a zero last column.
    """
    args = t[:, None].float() * freqs[None]  # [B, dim // 2]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t [B] -> sinusoidal features [B, 256] -> Linear-SiLU-Linear -> [B, D].

    The frequencies live in a non-persistent buffer (not in the state dict, so the official keys stay the
    same), built once: a forward makes no host-to-device copy. The buffer holds the float32 bit pattern as
    int32, because integer buffers follow ``.to(device)`` but not ``.to(dtype)``/``.half()``: the phases are
    computed from the same float32 frequencies whatever the parameters' dtype.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.register_buffer("freq_bits", torch.empty(0, dtype=torch.int32), persistent=False)
        self.reset_frequencies()

    def reset_frequencies(self) -> None:
        """(Re)build the frequency buffer on the t-MLP's device; call it after loading a meta-built model."""
        freqs = timestep_frequencies(self.frequency_embedding_size)
        self.freq_bits = freqs.view(torch.int32).to(self.mlp[0].weight.device)

    def frequencies(self) -> torch.Tensor:
        """The float32 frequencies [256 // 2] on the module's device (a view of the buffer, no copy)."""
        return self.freq_bits.view(torch.float32)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] (possibly fractional) -> [B, D]."""
        t_freq = timestep_embedding(t, self.frequency_embedding_size, self.frequencies())  # float32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label [B] -> [B, D]. With dropout the table has an extra null row at index ``num_classes``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        has_null_row = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null_row), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null label: at random (training) or where ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """labels [B] -> [B, D]; dropped to the null label when training (at random) or where forced."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT paper, Sec. 3.2).

    ``qk_norm``: queries and keys normalised per head before attention (REPA's option; keys
    ``attn.q_norm.{weight,bias}``, ``attn.k_norm.{weight,bias}``).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = MLP_RATIO, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=QK_NORM_LAYER if qk_norm else None)
        self.attn.fused_attn = True  # F.scaled_dot_product_attention whatever $TIMM_FUSED_ATTN says: same bytes
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=_gelu_tanh, drop=0.0)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, NUM_ADALN_CHUNKS_BLOCK * hidden_size, bias=True)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens x [B, T, D] conditioned on c [B, D] -> [B, T, D]."""
        # chunk order fixed by the official checkpoints
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            NUM_ADALN_CHUNKS_BLOCK, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN then a linear map of each token to its p*p*out_channels pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, NUM_ADALN_CHUNKS_FINAL * hidden_size, bias=True)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens x [B, T, D] conditioned on c [B, D] -> [B, T, p*p*out_channels]."""
        shift, scale = self.adaLN_modulation(c).chunk(NUM_ADALN_CHUNKS_FINAL, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, T, p*p*out]


class DiT(nn.Module):
    """Class-conditional diffusion transformer: forward(x [B,C,H,W], t [B], y [B]) -> [B, out_channels, H, W].

    ``out_channels`` is ``2 * in_channels`` when ``learn_sigma`` (epsilon and variance interpolation v).
    ``qk_norm`` normalises queries and keys in every block (REPA's SiT option; DiT and SiT have none).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = LATENT_CHANNELS,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = MLP_RATIO,
        class_dropout_prob: float = CLASS_DROPOUT_PROB,
        num_classes: int = NUM_CLASSES,
        learn_sigma: bool = True,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        if patch_size < 1 or input_size < patch_size or input_size % patch_size:
            raise ValueError(f"DiT input_size {input_size} is not a positive multiple of patch size {patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"DiT hidden_size {hidden_size} must be divisible by 4 and by num_heads {num_heads}")
        if in_channels < 1 or num_classes < 1 or depth < 1:
            raise ValueError(
                f"DiT needs in_channels, num_classes and depth >= 1 (got {in_channels}, {num_classes}, {depth})"
            )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.qk_norm = qk_norm

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding, kept as a frozen parameter so it is saved in the state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official initialisation: xavier linears, zero adaLN and output, N(0, 0.02) embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.pos_embed.device.type != "meta":
            pos = sincos_2d(self.hidden_size, self.x_embedder.grid_size)  # [T, D]
            with torch.no_grad():
                self.pos_embed.copy_(torch.from_numpy(pos).unsqueeze(0))
        # Patch embedding initialised like a linear layer on the flattened kernel [D, C*p*p].
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (its bias keeps the Conv2d default, as official)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=EMBED_INIT_STD)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*c] -> [B, c, h*p, w*p]; each token's features are ordered (p_row, p_col, c)."""
        p, c = self.patch_size, self.out_channels
        h, w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # [B, c, h, p, w, p]
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, C, H, W], t [B] timesteps, y [B] labels (null = ``num_classes``) -> [B, out_ch, H, W]."""
        x, c = self.embed(x, t, y, force_drop_ids)
        for block in self.blocks:
            x = block(x, c)
        return self.head(x, c)

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' inputs: tokens [B, T, D] (patches + position) and the condition c [B, D] (t + label)."""
        tokens = self.x_embedder(x) + self.pos_embed  # [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # [B, D]
        return tokens, c

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The last blocks' tokens [B, T, D] -> the output image [B, out_ch, H, W]."""
        return self.unpatchify(self.final_layer(tokens, c))


# name -> (depth, hidden_size, patch_size, num_heads), Table 1 of the DiT paper.
DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    for size, depth, hidden, heads in (
        ("XL", 28, 1152, 16),
        ("L", 24, 1024, 16),
        ("B", 12, 768, 12),
        ("S", 12, 384, 6),
    )
    for patch in (2, 4, 8)
}

DiT_models: dict[str, Callable[..., DiT]] = {name: functools.partial(DiT, **cfg) for name, cfg in DIT_CONFIGS.items()}
