"""DINOv2 ViT-L/14 features for FD_DINOv2, computed as EDM2's `calculate_metrics.py` (DINOv2Detector) does.

The network is timm's VisionTransformer loaded from the official torch hub weights `dinov2_vitl14_pretrain.pth`
(keys `cls_token`, `pos_embed` [1, 1 + 37*37, D], `mask_token`, `patch_embed.proj.*`,
`blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}.*`, `norm.*`; timm
uses the same names, the unused `mask_token` is dropped). The official model is built for 518 px (37 x 37
patches) and resamples its position embedding to the input's grid on every call: bicubic, no antialias, with
the scale factor (grid + 0.1) / 37 rather than an output size (`interpolate_offset`). Here the resampling is
done once, by the same formula, for the 224 px input (16 x 16 patches), and timm adds it as a fixed embedding:
the features are the official model's (`interpolate_pos_embed`).

Preprocessing, EDM2's: uint8 -> float32 -> resize to 224 x 224 (`torch`: bicubic with antialias, EDM2's
default; `pil`: PIL BICUBIC on the uint8 image, dgm-eval's) -> / 255 -> ImageNet mean / std. The feature is
the CLS token after the final LayerNorm, 1024-d (`extract` returns it under the key `dinov2`).

Weights, offline first (`resolve_dinov2_weights`): an explicit file, then torch hub's cache
(`<torch hub>/checkpoints/dinov2_vitl14_pretrain.pth`, where torch.hub puts it), then a download from the
official URL. A file of another architecture is refused in one line naming what it holds; tests pass
`arch=None` to take the (tiny) architecture from the file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.inception import full_precision
from evaluation.weights_file import load_weights_file
from launch.runtime.errors import UserError
from launch.runtime.files import DownloadError, FileWriteError, download, torch_hub_checkpoints

DINOV2_WEIGHTS = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
WEIGHTS_FLAG = "--dinov2-weights"
RESIZE_FLAG = "--dinov2-resize"
PREFETCH_HINT = "python -m launch.prefetch --dinov2"
DINOV2_FEATURE = "dinov2"  # the key of `extract`'s output (a feature kind beside Inception's pool/spatial/logits)
MODEL_NAME = "vitl14"  # torch hub's dinov2_vitl14

INPUT_SIDE = 224  # EDM2 resizes every image to 224 x 224
RESIZE_TORCH, RESIZE_PIL = "torch", "pil"
RESIZE_MODES = (RESIZE_TORCH, RESIZE_PIL)
DEFAULT_RESIZE = RESIZE_TORCH  # EDM2's default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXEL_MAX = 255.0

POS_OFFSET = 0.1  # official `interpolate_offset`: scale factor (grid + 0.1) / M
HEAD_DIM = 64  # every DINOv2 ViT has 64-d heads (S 6, B 12, L 16, g 24 heads)
LN_EPS = 1e-6
LAYERSCALE_INIT = 1.0  # any value: it only makes timm create ls1/ls2, which the file then fills
DEFAULT_BATCH_SIZE = 64
CPU_FORWARD_BATCH = 8  # on CPU larger forwards are no faster
RGB = 3

_BLOCK_PARAMS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma")
_TOP_PARAMS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
               "norm.bias")
_UNUSED = ("mask_token",)  # masked-image training only
# Official name -> timm name. timm's VisionTransformer spells DINOv2's parameters the same way.
OFFICIAL_TO_TIMM = {name: name for name in _TOP_PARAMS}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_SIZE_NAMES = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1536: "ViT-g"}


class DinoV2WeightsError(UserError):
    """No usable DINOv2 weights; the message is one line."""


@dataclass(frozen=True)
class ViTArch:
    """A DINOv2 ViT's shape, as read from its weights."""

    patch: int
    embed_dim: int
    depth: int
    mlp_hidden: int
    pos_grid: int  # side of the position-embedding grid the model was trained with (37 for 518 px)

    @property
    def num_heads(self) -> int:
        return self.embed_dim // HEAD_DIM

    def describe(self) -> str:
        """`ViT-L/14 (1024-d, 24 blocks)`."""
        name = _SIZE_NAMES.get(self.embed_dim, "ViT")
        return f"{name}/{self.patch} ({self.embed_dim}-d, {self.depth} block{'s' if self.depth != 1 else ''})"


VITL14 = ViTArch(patch=14, embed_dim=1024, depth=24, mlp_hidden=4096, pos_grid=37)  # dinov2_vitl14
METRIC_ARCH: ViTArch | None = VITL14  # what FD_DINOv2 insists on (the commands read it at call time)


@dataclass(frozen=True)
class DinoV2Weights:
    """A DINOv2 weights file in the official layout and the architecture it holds."""

    path: Path
    source: str  # "explicit", "torch hub cache", "downloaded"
    arch: ViTArch


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def read_arch(state: Mapping[str, torch.Tensor], label: str) -> ViTArch:
    """The architecture of an official-layout DINOv2 state dict; one line naming `label` otherwise."""
    not_official = f"{label} is not a DINOv2 backbone in torch hub's layout ({DINOV2_WEIGHTS})"
    if "register_tokens" in state:
        raise DinoV2WeightsError(f"{label} holds a DINOv2 with register tokens; FD_DINOv2 uses {DINOV2_WEIGHTS} "
                                 "(no registers)")
    if any(k.startswith("blocks.0.mlp.w12") for k in state):
        raise DinoV2WeightsError(f"{label} holds a DINOv2 with a SwiGLU MLP (ViT-g/14); FD_DINOv2 uses "
                                 f"{DINOV2_WEIGHTS}")
    missing = [k for k in _TOP_PARAMS if _shape(state, k) is None]
    if missing:
        raise DinoV2WeightsError(f"{not_official}: no {missing[0]}")
    d = _shape(state, "cls_token")[-1]
    proj = _shape(state, "patch_embed.proj.weight")  # [D, 3, p, p]
    pos = _shape(state, "pos_embed")  # [1, 1 + M*M, D]
    grid = math.isqrt(pos[1] - 1) if len(pos) == 3 and pos[1] > 1 else 0
    if len(proj) != 4 or proj[:2] != (d, RGB) or proj[2] != proj[3] or grid * grid != pos[1] - 1 or pos[2] != d:
        raise DinoV2WeightsError(f"{not_official}: patch_embed.proj.weight {proj}, pos_embed {pos}")
    blocks: dict[int, set[str]] = {}
    for key in state:
        if (m := _BLOCK_KEY.match(key)) is not None:
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
        elif key not in _TOP_PARAMS and key not in _UNUSED:
            raise DinoV2WeightsError(f"{not_official}: unexpected key {key}")
    depth = len(blocks)
    if depth == 0 or set(blocks) != set(range(depth)):
        raise DinoV2WeightsError(f"{not_official}: blocks {sorted(blocks)[:3]}... are not 0..N-1")
    hidden = (_shape(state, "blocks.0.mlp.fc1.weight") or (0,))[0]
    expected = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "ls1.gamma": (d,), "norm2.weight": (d,),
                "norm2.bias": (d,), "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,),
                "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,), "ls2.gamma": (d,)}
    for i in range(depth):
        for name in _BLOCK_PARAMS:
            got = _shape(state, f"blocks.{i}.{name}")
            if got != expected[name]:
                raise DinoV2WeightsError(f"{not_official}: blocks.{i}.{name} has shape {got}, expected "
                                         f"{expected[name]}")
    if d % HEAD_DIM:
        raise DinoV2WeightsError(f"{not_official}: width {d} is not a multiple of DINOv2's {HEAD_DIM}-d heads")
    return ViTArch(patch=proj[2], embed_dim=d, depth=depth, mlp_hidden=hidden, pos_grid=grid)


def load_state(path: Path, label: str) -> dict[str, torch.Tensor]:
    """The state dict of a DINOv2 weights file, memory-mapped (the shapes cost no read of the 1.2 GB)."""
    return load_weights_file(path, label, f"pass {DINOV2_WEIGHTS}", DinoV2WeightsError, mmap=True)


def describe_weights(path: Path, source: str, label: str, arch: ViTArch | None) -> DinoV2Weights:
    """Read the architecture of `path`; with `arch`, refuse any other (one line saying what the file holds)."""
    found = read_arch(load_state(path, label), label)
    if arch is not None and found != arch:
        raise DinoV2WeightsError(f"{label} holds a {found.describe()}; FD_DINOv2 uses DINOv2 {arch.describe()} "
                                 f"({DINOV2_WEIGHTS})")
    return DinoV2Weights(path, source, found)


def resolve_dinov2_weights(path: str | os.PathLike | None = None, allow_download: bool = True,
                           url: str = DINOV2_URL, arch: ViTArch | None = VITL14) -> DinoV2Weights:
    """Find the DINOv2 weights, offline first: `path`; torch hub's cache; a download into that cache.

    `arch`: the architecture required (None: whatever the file holds, for tests). Raises DinoV2WeightsError
    with one line naming the file and `python -m launch.prefetch` when nothing works.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DinoV2WeightsError(f"{WEIGHTS_FLAG} {p}: no such file")
        return describe_weights(p, "explicit", f"{WEIGHTS_FLAG} {p}", arch)
    hub_file = torch_hub_checkpoints() / DINOV2_WEIGHTS
    if hub_file.is_file():
        return describe_weights(hub_file, "torch hub cache", str(hub_file), arch)
    reason = "downloads disabled"
    if allow_download:
        try:
            return describe_weights(download(url, hub_file), "downloaded", str(hub_file), arch)
        except (DownloadError, FileWriteError) as exc:
            reason = f"download failed: {exc}"
    raise DinoV2WeightsError(f"no DINOv2 weights for FD_DINOv2 ({reason}): put {DINOV2_WEIGHTS} in "
                             f"{torch_hub_checkpoints()} ({PREFETCH_HINT} on a machine with internet) or pass "
                             f"{WEIGHTS_FLAG} PATH")


# --------------------------------------------------------------------------------------------- the network


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int, offset: float = POS_OFFSET) -> torch.Tensor:
    """The official `interpolate_pos_encoding` for a square input of `grid` x `grid` patches.

    pos_embed [1, 1 + M*M, D] (CLS first) -> [1, 1 + grid*grid, D] float32: the M x M patch embeddings
    resampled bicubically (no antialias) with scale factor (grid + offset) / M, so source coordinates are
    (i + 0.5) * M / (grid + offset) - 0.5; the CLS embedding unchanged. grid == M returns the input.
    """
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    m = math.isqrt(n)
    if grid == m:
        return pos_embed
    pos = pos_embed.float()
    patches = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    scale = float(grid + offset) / m
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if patches.shape[-2:] != (grid, grid):
        raise ValueError(f"position embedding resampled to {tuple(patches.shape[-2:])}, expected {grid}x{grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos[:, :1], patches], dim=1)


def timm_state(state: Mapping[str, torch.Tensor], arch: ViTArch, input_side: int = INPUT_SIDE
               ) -> dict[str, torch.Tensor]:
    """The official state dict in timm's names (float32), the position embedding resampled for `input_side`."""
    out = {OFFICIAL_TO_TIMM[k]: state[k].float() for k in _TOP_PARAMS}
    out["pos_embed"] = interpolate_pos_embed(state["pos_embed"], input_side // arch.patch)
    for i in range(arch.depth):
        for name in _BLOCK_PARAMS:
            out[f"blocks.{i}.{name}"] = state[f"blocks.{i}.{name}"].float()
    return out


def build_network(state: Mapping[str, torch.Tensor], arch: ViTArch, input_side: int = INPUT_SIDE
                  ) -> torch.nn.Module:
    """timm's VisionTransformer for `input_side` px holding the official weights (eval mode, on CPU)."""
    from timm.models.vision_transformer import VisionTransformer  # seconds to import: only when DINOv2 is used

    with torch.device("meta"):  # no random initialisation of 300M parameters: the file fills every one
        net = VisionTransformer(img_size=input_side, patch_size=arch.patch, embed_dim=arch.embed_dim,
                                depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_hidden / arch.embed_dim,
                                qkv_bias=True, init_values=LAYERSCALE_INIT, class_token=True, num_classes=0,
                                global_pool="token", dynamic_img_size=False, weight_init="skip")
    net.load_state_dict(timm_state(state, arch, input_side), strict=True, assign=True)
    return net.eval().requires_grad_(False)


def resize_images(images: torch.Tensor, mode: str, side: int = INPUT_SIDE) -> torch.Tensor:
    """uint8 NHWC [B, H, W, 3] -> float32 NCHW [B, 3, side, side] on the images' device, values in 0..255.

    `torch`: bicubic with antialias on float (values may overshoot 0..255, as in EDM2); `pil`: PIL's BICUBIC
    on each uint8 image (on the CPU), then float."""
    if mode == RESIZE_PIL:
        host = images.cpu().numpy()
        resized = np.stack([np.asarray(Image.fromarray(im, "RGB").resize((side, side), Image.Resampling.BICUBIC))
                            for im in host])
        return torch.from_numpy(resized).to(images.device).permute(0, 3, 1, 2).float()
    if mode != RESIZE_TORCH:
        raise ValueError(f"unknown DINOv2 resize mode {mode!r}; choose from {', '.join(RESIZE_MODES)}")
    x = images.permute(0, 3, 1, 2).float()
    return F.interpolate(x, size=(side, side), mode="bicubic", antialias=True)


def preprocess(images: torch.Tensor, mode: str = DEFAULT_RESIZE, side: int = INPUT_SIDE) -> torch.Tensor:
    """EDM2's DINOv2 input: resize (`resize_images`), / 255, then (x - ImageNet mean) / ImageNet std."""
    x = resize_images(images, mode, side) / PIXEL_MAX
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, RGB, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, RGB, 1, 1)
    return (x - mean) / std


class DinoV2Extractor:
    """The CLS feature (after the final norm) of uint8 NHWC images, batched, on one device.

    Same interface as `InceptionExtractor`: `extract` returns {`dinov2`: [B, D] float32}. `cache_tag` joins
    the weights' identity in the reference cache key, since the resize mode changes the features.
    """

    def __init__(self, weights: DinoV2Weights, device: str | torch.device = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE, resize: str = DEFAULT_RESIZE):
        if resize not in RESIZE_MODES:
            raise DinoV2WeightsError(f"{RESIZE_FLAG} {resize!r}: choose from {', '.join(RESIZE_MODES)}")
        self.weights, self.resize = weights, resize
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.forward_batch = batch_size if self.device.type == "cuda" else min(batch_size, CPU_FORWARD_BATCH)
        self.has_logits = False
        self.feature_dims = {DINOV2_FEATURE: weights.arch.embed_dim}
        self.cache_tag = f"{DINOV2_FEATURE}-{resize}"
        label = f"{WEIGHTS_FLAG} {weights.path}"
        self.net = build_network(load_state(weights.path, label), weights.arch).to(self.device)

    @torch.inference_mode()
    def extract(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of uint8 NHWC images [B, H, W, 3] -> {`dinov2`: [B, D] float32 on `self.device`}."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != RGB:
            raise ValueError(f"expected uint8 NHWC images, got {x.dtype} {tuple(x.shape)}")
        parts = []
        with full_precision(self.device):
            for a in range(0, x.shape[0], self.forward_batch):
                batch = preprocess(x[a: a + self.forward_batch].to(self.device, non_blocking=True), self.resize)
                parts.append(self.net.forward_features(batch)[:, 0].float())  # CLS token after the final norm
        if not parts:
            return {DINOV2_FEATURE: torch.zeros(0, self.weights.arch.embed_dim, device=self.device)}
        return {DINOV2_FEATURE: torch.cat(parts) if len(parts) > 1 else parts[0]}
