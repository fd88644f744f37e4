"""Codecs: a tiny diffusers VAE loaded from a local folder, the pixel codec, offline failures."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

from models.vae import VAE_REPOS, VAE_SCALE_FACTOR, CodecError, PixelCodec, load_codec


def uint8_reference(x: np.ndarray) -> np.ndarray:
    """ADM/DiT mapping in numpy: NCHW float in [-1, 1] -> NHWC uint8, clamp(127.5 x + 128) then truncate."""
    return np.clip(127.5 * x.astype(np.float64) + 128.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face home, so no VAE is cached."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


def test_constants():
    assert VAE_SCALE_FACTOR == 0.18215
    assert VAE_REPOS == {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def test_tiny_vae_from_local_folder(tiny_vae_dir):
    from diffusers import AutoencoderKL

    codec = load_codec("ema", vae_path=tiny_vae_dir)
    assert codec.downsample == 8 and codec.latent_channels == 4
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 5, generator=g)
    img = codec.decode(z)
    assert img.dtype == torch.uint8 and img.device.type == "cpu" and img.shape == (2, 24, 40, 3)
    # independent path: the saved VAE loaded directly, scaled as DiT's sample.py, mapped in numpy
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():
        decoded = vae.decode(z / VAE_SCALE_FACTOR).sample.numpy()
    ref = uint8_reference(decoded)
    diff = np.abs(img.numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # float rounding may move a truncation edge

    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    mean = codec.encode(x, sample=False)
    with torch.no_grad():
        ref_mean = vae.encode(x).latent_dist.mean * VAE_SCALE_FACTOR
    torch.testing.assert_close(mean, ref_mean)
    s1 = codec.encode(x, generator=torch.Generator().manual_seed(7))
    s2 = codec.encode(x, generator=torch.Generator().manual_seed(7))
    assert s1.shape == (2, 4, 2, 2) and torch.equal(s1, s2) and not torch.equal(s1, mean)


def test_latent_size_names_the_codec_and_its_factor(tiny_vae_dir, tiny_vae4_dir):
    """A size that the VAE's factor does not divide names --image-size, the --vae-path and its factor."""
    codec = load_codec("ema", vae_path=tiny_vae4_dir)
    assert codec.downsample == 4 and codec.source == f"--vae-path {tiny_vae4_dir}"
    assert codec.latent_size(64) == 16
    for size in (250, 2):
        with pytest.raises(CodecError) as err:
            codec.latent_size(size)
        assert str(err.value) == (
            f"--image-size {size} is not a multiple of the downsampling factor 4 of --vae-path {tiny_vae4_dir}; "
            "use a multiple of 4"
        )
    assert load_codec("mse", vae_path=tiny_vae_dir).latent_size(256) == 32
    assert PixelCodec(3).latent_size(7) == 7 and PixelCodec(3).source == "--vae none"


def test_pipeline_folder_with_vae_subfolder(tiny_vae_dir, tmp_path):
    shutil.copytree(tiny_vae_dir, tmp_path / "pipe" / "vae")
    assert load_codec("mse", vae_path=tmp_path / "pipe").downsample == 8


def test_bad_vae_path(tmp_path):
    with pytest.raises(CodecError) as err:
        load_codec("ema", vae_path=tmp_path)
    assert str(err.value).startswith(f"--vae-path {tmp_path} ") and "\n" not in str(err.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CodecError, match="--vae-path"):
        load_codec("ema", vae_path=tmp_path)


def test_unknown_codec():
    with pytest.raises(CodecError, match="--vae xl is unknown"):
        load_codec("xl")


@pytest.mark.parametrize("channels", [3, 1])
def test_pixel_codec_mapping(channels):
    codec = load_codec("none", image_channels=channels)
    assert isinstance(codec, PixelCodec)
    assert codec.downsample == 1 and codec.latent_channels == channels
    x = torch.linspace(-1.3, 1.3, 2 * channels * 4 * 5).reshape(2, channels, 4, 5)
    x[0, 0, 0, :3] = torch.tensor([-1.0, 0.0, 1.0])
    img = codec.decode(x)
    assert img.dtype == torch.uint8 and img.shape == (2, 4, 5, 3)
    ref = uint8_reference(x.numpy())
    if channels == 1:
        ref = np.repeat(ref, 3, axis=-1)
    np.testing.assert_array_equal(img.numpy(), ref)
    assert img[0, 0, :3, 0].tolist() == [0, 128, 255]  # -1 -> 0, 0 -> 128, 1 -> 255 (clamped)
    assert torch.equal(codec.encode(x), x)


def test_pixel_codec_rejects_other_channel_counts():
    with pytest.raises(CodecError):
        load_codec("none", image_channels=2)


def test_offline_cache_miss_fails_fast(offline_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(CodecError) as err:
        load_codec("ema")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "\n" not in msg and "--vae-path DIR" in msg and "python -m launch.prefetch --vae ema" in msg


def test_unreachable_hub_fails_fast(offline_hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # refused port
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(CodecError) as err:
        load_codec("mse")
    assert time.monotonic() - start < 10
    assert "--vae-path DIR" in str(err.value) and "--vae mse" in str(err.value)


def test_cached_repo_loads_offline(tiny_vae_dir, offline_hub, monkeypatch):
    """A repo present in the hub cache layout loads with HF_HUB_OFFLINE=1 (what prefetch leaves behind)."""
    snapshot = offline_hub / "hub" / "models--stabilityai--sd-vae-ft-ema" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_vae_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_codec("ema").latent_channels == 4


# ------------------------------------------------------------------------------- uint8 on the device


def uint8_reference_float32(x: np.ndarray) -> np.ndarray:
    """The mapping in float32 numpy, rounding like the float32 tensor ops: clip(127.5 x + 128) then truncate."""
    y = np.float32(127.5) * x.astype(np.float32) + np.float32(128.0)
    return np.clip(y, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def test_uint8_bytes_equal_numpy_on_random_latents():
    from models.vae import to_uint8_nhwc

    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 3, 16, 16, generator=g) * 0.7  # some values beyond [-1, 1]
    x[0, 0, 0, :6] = torch.tensor([-1.0, 1.0, 0.0, -1.5, 1.5, 1 / 255])
    # x[1]: values whose 127.5 x + 128 lands on or next to an integer (truncation edges), 3 x 256 of them
    edges = (torch.arange(256, dtype=torch.float32) - 128.0) / 127.5
    up, down = torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))
    x[1] = torch.cat([edges, up, down]).reshape(3, 16, 16)
    img = to_uint8_nhwc(x)
    assert img.dtype == torch.uint8 and img.device.type == "cpu" and img.is_contiguous()
    np.testing.assert_array_equal(img.numpy(), uint8_reference_float32(x.numpy()))
    assert img[0, 0, :3, 0].tolist() == [0, 255, 128]


class _DeviceToHost(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtype of every copy from a non-CPU tensor to the CPU; fakes its result (meta has no data)."""

    def __init__(self) -> None:
        super().__init__()
        self.copied: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type != "cpu":
            target = kwargs.get("device")
            if target is not None and torch.device(target).type == "cpu":
                self.copied.append(args[0].dtype)
                dtype = kwargs.get("dtype") or args[0].dtype
                return torch.zeros(args[0].shape, dtype=dtype).as_strided(args[0].shape, args[0].stride())
        return func(*args, **kwargs)


@pytest.mark.parametrize("channels", [3, 1])
def test_decode_converts_to_uint8_before_the_host_copy(channels):
    """On a device (meta stands in for a GPU) only uint8 crosses to the host: 1 byte per value, not 4."""
    z = torch.empty(2, channels, 8, 8, device="meta")
    with _DeviceToHost() as seen:
        img = PixelCodec(channels).decode(z)
    assert seen.copied == [torch.uint8]
    assert img.dtype == torch.uint8 and img.shape == (2, 8, 8, 3) and img.device.type == "cpu"


def test_latent_decode_bytes_match_numpy(tiny_vae_dir):
    """VAE decode through the device-side conversion: the same bytes as numpy's mapping of the VAE output."""
    codec = load_codec("ema", vae_path=tiny_vae_dir)
    z = torch.randn(3, 4, 2, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        decoded = codec.vae.decode(z / VAE_SCALE_FACTOR).sample
    np.testing.assert_array_equal(codec.decode(z).numpy(), uint8_reference_float32(decoded.numpy()))
