"""evaluation.dinov2: the official position-embedding resampling, EDM2's preprocessing, the whole (tiny) network
against a plain reimplementation of the official forward, and the weights' one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_dinov2 import POS_GRID, make_dinov2_state
from PIL import Image

from evaluation.dinov2 import (
    DINOV2_FEATURE,
    DINOV2_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VITL14,
    DinoV2Extractor,
    DinoV2WeightsError,
    ViTArch,
    interpolate_pos_embed,
    preprocess,
    resize_images,
    resolve_dinov2_weights,
)

SIDE = 224
GRID = SIDE // 14  # 16 patches a side
CUBIC_A = -0.75  # PyTorch's bicubic (no antialias) uses Keys' kernel with a = -0.75
HEAD_DIM = 64
LN_EPS = 1e-6


def cubic_weights(t: float, a: float = CUBIC_A) -> np.ndarray:
    """Keys' cubic convolution weights of the taps at -1, 0, 1, 2 for a fractional offset t."""
    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0
    return np.array([k(t + 1), k(t), k(1 - t), k(2 - t)])


def bicubic_numpy(image: np.ndarray, out: int, scale: float) -> np.ndarray:
    """[C, M, M] -> [C, out, out]: source coordinate (i + 0.5) / scale - 0.5 (align_corners False), four taps,
    indices clamped at the borders, separable, in float64 (the official formula with a scale factor)."""
    m = image.shape[1]
    rows = np.zeros((out, m))  # [out, M]: the interpolation matrix along one axis
    for i in range(out):
        x = (i + 0.5) / scale - 0.5
        x0 = math.floor(x)
        for tap, w in zip(range(x0 - 1, x0 + 3), cubic_weights(x - x0)):
            rows[i, min(max(tap, 0), m - 1)] += w
    return np.einsum("ij,cjk,lk->cil", rows, image.astype(np.float64), rows)


def test_pos_embed_resampling_is_the_official_formula():
    """16 x 16 from 37 x 37 with scale factor (16 + 0.1) / 37, not the output size 16: the 0.1 matters."""
    pos = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1 + POS_GRID ** 2, 8)).astype(np.float32))
    got = interpolate_pos_embed(pos, GRID).numpy()
    assert got.shape == (1, 1 + GRID * GRID, 8)
    np.testing.assert_array_equal(got[0, 0], pos[0, 0].numpy())  # the CLS embedding is not resampled
    grid = pos[0, 1:].numpy().reshape(POS_GRID, POS_GRID, 8).transpose(2, 0, 1)  # [D, M, M]
    expected = bicubic_numpy(grid, GRID, (GRID + 0.1) / POS_GRID).transpose(1, 2, 0).reshape(GRID * GRID, 8)
    np.testing.assert_allclose(got[0, 1:], expected, atol=2e-5)
    by_size = bicubic_numpy(grid, GRID, GRID / POS_GRID).transpose(1, 2, 0).reshape(GRID * GRID, 8)
    assert np.abs(got[0, 1:] - by_size).max() > 1e-2  # without the offset: another embedding
    assert interpolate_pos_embed(pos, POS_GRID) is pos  # 518 px: used as stored


@pytest.mark.parametrize("shape", [(64, 64), (300, 200), (32, 48)])
def test_torch_resize_is_antialiased_bicubic(shape: tuple[int, int]):
    """EDM2's 'torch' resize: bicubic with antialias on float, which is PIL's BICUBIC on float images."""
    images = np.random.default_rng(1).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    got = resize_images(torch.from_numpy(images), "torch").numpy()
    expected = np.stack([np.stack([np.asarray(Image.fromarray(im[..., c].astype(np.float32), "F")
                                              .resize((SIDE, SIDE), Image.Resampling.BICUBIC)) for c in range(3)])
                         for im in images])
    assert got.shape == (2, 3, SIDE, SIDE) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-2)


def test_pil_resize_and_normalisation():
    """'pil': PIL BICUBIC on the uint8 image; then / 255 and ImageNet's mean and std per channel."""
    images = np.random.default_rng(2).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    resized = np.stack([np.asarray(Image.fromarray(im).resize((SIDE, SIDE), Image.Resampling.BICUBIC))
                        for im in images]).astype(np.float64)  # [B, 224, 224, 3] uint8 values
    expected = ((resized / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(0, 3, 1, 2)
    got = preprocess(torch.from_numpy(images), "pil").numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    torch_mode = preprocess(torch.from_numpy(images), "torch").numpy()
    assert 0 < np.abs(torch_mode - got).mean() < 0.05  # another, close resize (PIL rounds and clips to uint8)


def official_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The official DinoVisionTransformer.forward (CLS after the final norm), written out in float64 from the
    official state dict: patch embedding, CLS, the position embedding resampled by its own formula (bicubic,
    scale factor (grid + 0.1) / M), pre-norm blocks with layer scale, exact GELU."""
    s = {k: v.double() for k, v in state.items()}
    x = x.double()
    d = s["cls_token"].shape[-1]
    heads = d // HEAD_DIM
    patch = s["patch_embed.proj.weight"].shape[-1]
    tokens = torch.nn.functional.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch)
    b, _, gh, gw = tokens.shape
    tokens = torch.cat([s["cls_token"].expand(b, 1, d), tokens.flatten(2).transpose(1, 2)], dim=1)
    m = math.isqrt(s["pos_embed"].shape[1] - 1)
    grid = s["pos_embed"][0, 1:].reshape(m, m, d).permute(2, 0, 1).numpy()
    patches = bicubic_numpy(grid, gh, (gh + 0.1) / m).transpose(1, 2, 0).reshape(gh * gw, d)
    tokens = tokens + torch.cat([s["pos_embed"][0, :1], torch.from_numpy(patches)])[None]
    depth = len({k.split(".")[1] for k in s if k.startswith("blocks.")})

    def norm(t: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(t, (d,), s[name + ".weight"], s[name + ".bias"], LN_EPS)

    for i in range(depth):
        p = f"blocks.{i}."
        h = norm(tokens, p + "norm1")
        qkv = (h @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]).reshape(b, -1, 3, heads, HEAD_DIM)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, T, 64]
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, -1, d) @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        tokens = tokens + s[p + "ls1.gamma"] * out
        h = norm(tokens, p + "norm2")
        h = torch.nn.functional.gelu(h @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"])
        tokens = tokens + s[p + "ls2.gamma"] * (h @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"])
    return norm(tokens, "norm")[:, 0]


@pytest.fixture(scope="module")
def two_block_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128-d (two heads), two blocks: every part of the forward is exercised."""
    path = tmp_path_factory.mktemp("dinov2-2") / "dinov2-128d.pth"
    torch.save(make_dinov2_state(dim=128, depth=2, seed=5), path)
    return path


@pytest.mark.parametrize("resize", ["torch", "pil"])
def test_tiny_network_equals_the_official_forward(resize: str, two_block_file: Path):
    rng = np.random.default_rng(3)
    images = np.concatenate([rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8),
                             np.repeat(np.repeat(rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8), 8, 1), 8, 2)])
    weights = resolve_dinov2_weights(two_block_file, allow_download=False, arch=None)
    extractor = DinoV2Extractor(weights, "cpu", 2, resize)
    got = extractor.extract(images)[DINOV2_FEATURE]
    assert got.shape == (5, 128) and got.dtype == torch.float32
    expected = official_forward(torch.load(two_block_file), preprocess(torch.from_numpy(images), resize))
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), atol=2e-4, rtol=1e-4)
    assert float(expected.std(0).mean()) > 0.05  # images give different features
    one_by_one = torch.cat([extractor.extract(images[i: i + 1])[DINOV2_FEATURE] for i in range(5)])
    np.testing.assert_allclose(one_by_one.numpy(), got.numpy(), atol=1e-5)


def test_architecture_names():
    assert VITL14.describe() == "ViT-L/14 (1024-d, 24 blocks)" and VITL14.num_heads == 16
    assert ViTArch(14, 768, 12, 3072, 37).describe() == "ViT-B/14 (768-d, 12 blocks)"


def test_weights_errors_are_one_line(tmp_path: Path, dinov2_file: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cases = {}
    with pytest.raises(DinoV2WeightsError) as err:  # the real metric insists on ViT-L/14
        resolve_dinov2_weights(dinov2_file, allow_download=False)
    cases["architecture"] = (err, "holds a ViT/14 (64-d, 1 block); FD_DINOv2 uses DINOv2 ViT-L/14")
    with pytest.raises(DinoV2WeightsError) as err:
        resolve_dinov2_weights(allow_download=False)
    cases["offline"] = (err, f"put {DINOV2_WEIGHTS} in {tmp_path / 'torch-home' / 'hub' / 'checkpoints'} "
                             "(python -m launch.prefetch --dinov2")
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(DinoV2WeightsError) as err:
        resolve_dinov2_weights(tmp_path / "text.pth", arch=None)
    cases["not torch"] = (err, "is not a PyTorch weights file")
    with pytest.raises(DinoV2WeightsError) as err:
        resolve_dinov2_weights(tmp_path / "absent.pth", arch=None)
    cases["missing"] = (err, "--dinov2-weights")
    registers = {**make_dinov2_state(dim=64, depth=1), "register_tokens": torch.zeros(1, 4, 64)}
    torch.save(registers, tmp_path / "reg.pth")
    with pytest.raises(DinoV2WeightsError) as err:
        resolve_dinov2_weights(tmp_path / "reg.pth", arch=None)
    cases["registers"] = (err, "register tokens")
    broken = make_dinov2_state(dim=64, depth=2)
    del broken["blocks.1.ls2.gamma"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(DinoV2WeightsError) as err:
        resolve_dinov2_weights(tmp_path / "broken.pth", arch=None)
    cases["incomplete"] = (err, "blocks.1.ls2.gamma")
    for name, (err, fragment) in cases.items():
        assert fragment in str(err.value) and "\n" not in str(err.value), name


def test_hub_cache_then_download(tmp_path: Path, dinov2_file: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    hub_file = tmp_path / "torch-home" / "hub" / "checkpoints" / DINOV2_WEIGHTS
    got = resolve_dinov2_weights(url=dinov2_file.as_uri(), arch=None)
    assert (got.source, got.path) == ("downloaded", hub_file) and hub_file.read_bytes() == dinov2_file.read_bytes()
    got = resolve_dinov2_weights(allow_download=False, arch=None)
    assert (got.source, got.arch.embed_dim, got.arch.depth, got.arch.pos_grid) == ("torch hub cache", 64, 1, 37)
