"""A torch-fidelity Inception with random (but informative) weights, for tests: the real weights are not
downloadable here, and torch-fidelity's default initialisation gives degenerate features (FID ~ 0, IS = 1)."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

IMAGE_SIDE = 32
# Random convolutions give pool_3 features ~0.3 +- 0.01 across images: the classifier is scaled up and made
# orthogonal to the common (mean) feature, so the unbiased logits differ between images and IS is well above 1.
FC_STD = 4.0


class _Skeleton(FeatureExtractorInceptionV3):
    """torch-fidelity's network without its weight loading (its constructor always loads a file)."""

    def load_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
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
