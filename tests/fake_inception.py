"""A torch-fidelity Inception with random (but informative) weights, for tests: the real weights are not
downloadable here, and torch-fidelity's default initialisation gives degenerate features (FID ~ 0, IS = 1)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from evaluation.inception import InceptionWeights

IMAGE_SIDE = 32
# Random convolutions give pool_3 features ~0.3 +- 0.01 across images: the classifier is scaled up and made
# orthogonal to the common (mean) feature, so the unbiased logits differ between images and IS is well above 1.
FC_STD = 4.0


class _Skeleton(FeatureExtractorInceptionV3):
    """torch-fidelity's network without its weight loading (its constructor always loads a file)."""

    def load_state_dict(self, *args: object, **kwargs: object) -> None:
        return None


def make_random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """torch-fidelity Inception state dict with Kaiming-normal convolutions (default init is degenerate)."""
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(seed)
    net = _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=FC_STD)
    net.eval()
    with torch.no_grad():
        probe = torch.from_numpy(np.concatenate([make_images(seed + 100, 1), make_images(seed + 101, 1, smooth=True)]))
        (pool,) = net(probe.permute(0, 3, 1, 2).contiguous())  # [2, 2048]
        m = pool.mean(0) / pool.mean(0).norm()
        net.fc.weight.sub_(torch.outer(net.fc.weight @ m, m))  # W <- W (I - m m^T)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def make_images(seed: int, n: int, side: int = IMAGE_SIDE, smooth: bool = False) -> np.ndarray:
    """uint8 NHWC images: uniform noise, or blocky (upsampled) noise with a colour cast."""
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    coarse = rng.integers(0, 256, (n, side // 4, side // 4, 3)).astype(np.float64)
    up = coarse.repeat(4, axis=1).repeat(4, axis=2)
    up[..., 0] = up[..., 0] * 0.5 + 100
    return np.clip(up, 0, 255).astype(np.uint8)



def write_ref_and_sample(folder: Path, seeds: tuple[int, int, int, int], num_ref: int, num_sample: int,
                         smooth_samples: int) -> dict:
    """A reference (half noise, then half blocky) and a sample set (``smooth_samples`` blocky, then noise) as
    folder/ref.npz and folder/sample.npz: two different distributions, so every metric is informative."""
    ref = np.concatenate([make_images(seeds[0], num_ref // 2), make_images(seeds[1], num_ref - num_ref // 2,
                                                                            smooth=True)])
    sample = np.concatenate([make_images(seeds[2], smooth_samples, smooth=True),
                             make_images(seeds[3], num_sample - smooth_samples)])
    np.savez(folder / "ref.npz", arr_0=ref)
    np.savez(folder / "sample.npz", arr_0=sample)
    return {"ref": ref, "sample": sample, "ref_path": folder / "ref.npz", "sample_path": folder / "sample.npz",
            "folder": folder}

STAND_IN_DIMS = {"pool": 16, "spatial": 12, "logits": 10}
STAND_IN_GRID = 4  # images are average-pooled to 4x4 before the projections
LOGIT_SCALE = 3.0


class StandInExtractor:
    """A cheap network with `InceptionExtractor`'s interface: fixed random projections (float64, so a row does
    not depend on the batch it came in) of 4x4-average-pooled pixels. Microseconds per image instead of
    150 ms, and small feature widths, so the evaluation's bookkeeping can be tested at scale."""

    def __init__(self, weights: InceptionWeights, device: str = "cpu", batch_size: int = 8, seed: int = 0,
                 dims: dict[str, int] | None = None):
        self.weights, self.device, self.batch_size = weights, torch.device(device), batch_size
        self.has_logits = weights.has_classifier
        dims = dict(dims or STAND_IN_DIMS)
        self.feature_dims = {k: d for k, d in dims.items() if k != "logits" or self.has_logits}
        g = torch.Generator().manual_seed(seed)
        inputs = STAND_IN_GRID * STAND_IN_GRID * 3
        self.proj = {k: torch.randn(inputs, d, generator=g, dtype=torch.float64) for k, d in dims.items()}
        self.calls = 0  # images seen

    def extract(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 NHWC images, got {x.dtype} {tuple(x.shape)}")
        self.calls += x.shape[0]
        x = x.to(self.device).permute(0, 3, 1, 2).double() / 255
        x = torch.nn.functional.adaptive_avg_pool2d(x, STAND_IN_GRID).flatten(1)  # [B, 48]
        out = {"pool": torch.relu(x @ self.proj["pool"]), "spatial": torch.relu(x - 0.5) @ self.proj["spatial"]}
        if self.has_logits:
            out["logits"] = LOGIT_SCALE * (x - 0.5) @ self.proj["logits"]
        return {k: v.float() for k, v in out.items()}
