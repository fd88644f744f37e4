"""Data: the digits transform, the image folder, data order and flips, the latent cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FOLDER_CLASSES, IMAGES_PER_CLASS, TINY_SIZE

from models import data


def bilinear_upsample_reference(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centred bilinear interpolation with edge clamping, written out (float64)."""
    n = img.shape[0]
    scale = n / size
    src = np.maximum((np.arange(size) + 0.5) * scale - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = src - i0
    rows = img[i0] * (1 - w)[:, None] + img[i1] * w[:, None]  # [size, n]
    return rows[:, i0] * (1 - w)[None] + rows[:, i1] * w[None]


def test_digits_transform_is_the_documented_one():
    from sklearn.datasets import load_digits

    images, labels = data.digits_uint8()
    raw = load_digits()
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, raw.target)
    for i in (0, 5, 1000, 1796):
        expected = np.round(255 * bilinear_upsample_reference(raw.images[i] / 16.0, 32))
        assert np.abs(images[i, :, :, 0].astype(int) - expected).max() <= 1  # float32 vs float64 rounding
        assert (images[i] == images[i, :, :, :1]).all()  # grey replicated to RGB
    assert data.digits_class_to_idx() == {str(d): d for d in range(10)}


def test_digits_classifier_recognises_held_out_real_digits():
    from sklearn.svm import SVC

    images, labels = data.digits_uint8()
    feats = data.digits_features(images)
    # the features are 4x4 block means of the grey image
    np.testing.assert_allclose(feats[3, 9], images[3, 4:8, 4:8, 0].mean() / 255.0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    train, test = order[:1400], order[1400:]
    accuracy = (SVC().fit(feats[train], labels[train]).predict(feats[test]) == labels[test]).mean()
    assert accuracy > 0.95


def test_image_folder_sorted_classes_and_range(image_folder):
    ds = data.ImageFolderDataset(image_folder, TINY_SIZE)
    assert ds.class_to_idx == {name: i for i, name in enumerate(sorted(FOLDER_CLASSES))}
    assert len(ds) == len(FOLDER_CLASSES) * IMAGES_PER_CLASS
    from PIL import Image

    path, label = ds.samples[0]
    x, y = ds[(0, False)]
    expected = (
        np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 127.5 - 1
    )  # same size: no resize
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert y == label == 0
    flipped, _ = ds[(0, True)]
    torch.testing.assert_close(flipped, x.flip(-1))


def test_image_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match="not a folder"):
        data.ImageFolderDataset(tmp_path / "missing", 8)
    with pytest.raises(data.DataError, match="no class subfolders"):
        data.ImageFolderDataset(tmp_path, 8)
    (tmp_path / "a").mkdir()
    with pytest.raises(data.DataError, match="no images"):
        data.ImageFolderDataset(tmp_path, 8)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_plan_resumes_mid_stream_and_splits_ranks(world):
    n, batch = 23, 3
    plans = [data.EpochPlan(n, batch, r, world, seed=5, hflip=True) for r in range(world)]
    per_epoch = plans[0].batches_per_epoch
    assert per_epoch == (n // world) // batch
    for plan in plans:
        stream = plan.batches(0)
        first = [next(stream) for _ in range(3 * per_epoch + 2)]
        for done in (1, per_epoch, per_epoch + 1, 2 * per_epoch + 1):
            resumed = plan.batches(done)
            assert [next(resumed) for _ in range(len(first) - done)] == first[done:]
    # within an epoch the ranks read disjoint images, each at most once; the flip of an image is shared
    epoch = [plan.epoch_keys(1) for plan in plans]
    indices = [i for keys in epoch for i, _ in keys]
    assert len(indices) == len(set(indices)) == world * (n // world)
    flips = {i: f for keys in epoch for i, f in keys}
    assert set(flips.values()) == {True, False}
    assert plans[0].epoch_keys(2) != plans[0].epoch_keys(1)  # reshuffled every epoch
    no_flip = data.EpochPlan(n, batch, 0, world, seed=5, hflip=False)
    assert not any(f for _, f in no_flip.epoch_keys(0))


def test_epoch_plan_needs_a_full_batch():
    with pytest.raises(data.DataError, match="global-batch-size"):
        data.EpochPlan(5, 4, 0, 2, seed=0, hflip=False)


class HalvingCodec:
    """A stand-in encoder: 2x2 average pooling plus a fixed channel mix and the generator's noise."""

    downsample, latent_channels = 2, 4

    def encode(self, x, generator=None):
        pooled = torch.nn.functional.avg_pool2d(x, 2)
        mixed = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        return mixed + 0.01 * torch.randn(mixed.shape, generator=generator)


def test_latent_cache_holds_original_and_mirror(image_folder, tmp_path):
    ds = data.ImageFolderDataset(image_folder, TINY_SIZE)
    shard = data.encode_latent_shard(ds, HalvingCodec(), tmp_path / "lat.pt", chunk=5)
    extra = {"image_size": TINY_SIZE, "vae": "ema"}
    out = data.write_latent_index(tmp_path / "lat.pt", [shard], ds.class_to_idx, extra)
    cache = data.LatentDataset(out)
    assert len(cache) == len(ds) and cache.class_to_idx == ds.class_to_idx
    assert cache.meta == {"class_to_idx": ds.class_to_idx, "image_size": TINY_SIZE, "vae": "ema"}
    for i in (0, 7, len(ds) - 1):
        x, label = ds[(i, False)]
        pooled = torch.nn.functional.avg_pool2d(x[None], 2)[0]
        for flip in (False, True):
            z, lbl = cache[(i, flip)]
            assert lbl == label
            ref = pooled.flip(-1) if flip else pooled
            torch.testing.assert_close(z[:3], ref, atol=0.06, rtol=0)  # fp16 storage + 0.01 noise
    with pytest.raises(data.DataError, match="cannot be read"):
        (tmp_path / "bad.pt").write_text("nope")
        data.LatentDataset(tmp_path / "bad.pt")


def test_grey_channel_option_keeps_the_grey_value():
    images, labels = data.digits_uint8()
    rgb = data.ArrayDataset(images[:4], labels[:4], data.digits_class_to_idx())
    grey = data.ArrayDataset(images[:4], labels[:4], data.digits_class_to_idx(), channels=1)
    x3, _ = rgb[(2, False)]
    x1, _ = grey[(2, False)]
    assert x3.shape == (3, 32, 32) and x1.shape == (1, 32, 32)
    np.testing.assert_allclose(x1[0].numpy(), images[2, :, :, 0] / 127.5 - 1, atol=1e-5)


class CountingCodec(HalvingCodec):
    def __init__(self) -> None:
        self.calls = 0

    def encode(self, x, generator=None):
        self.calls += 1
        return super().encode(x, generator)


def test_latent_cache_shards_do_not_depend_on_the_number_of_processes(image_folder, tmp_path):
    """Three processes' shards read back exactly as one process's cache: chunk k's noise comes from (seed, k)."""
    ds = data.ImageFolderDataset(image_folder, TINY_SIZE)
    chunk, extra = 5, {"image_size": TINY_SIZE, "vae": "ema"}
    one = tmp_path / "one.pt"
    alone = data.encode_latent_shard(ds, HalvingCodec(), one, seed=3, chunk=chunk)
    whole = data.LatentDataset(data.write_latent_index(one, [alone], ds.class_to_idx, extra))
    index = tmp_path / "three.pt"
    bounds = [data.latent_shard_bounds(len(ds), part, 3, chunk) for part in range(3)]
    assert bounds == [(0, 5), (5, 10), (10, 16)]  # whole chunks (4 of them), split evenly
    shards = [data.encode_latent_shard(ds, HalvingCodec(), index, part, 3, seed=3, chunk=chunk) for part in range(3)]
    assert shards == data.latent_shards(index, len(ds), 3, chunk)
    assert [p.name for p in shards] == ["000000000-000000005.pt", "000000005-000000010.pt", "000000010-000000016.pt"]
    assert data.encode_latent_shard(ds, HalvingCodec(), index, 0, 5, seed=3, chunk=chunk) is None  # 4 chunks, 5 parts
    split = data.LatentDataset(data.write_latent_index(index, shards, ds.class_to_idx, extra))
    assert len(split) == len(whole) == len(ds) and split.meta == whole.meta
    assert torch.equal(split.latents, whole.latents) and torch.equal(split.labels, whole.labels)
    for i in (0, 4, 5, 9, 10, 15):
        for flip in (False, True):
            z, label = split[(i, flip)]
            assert torch.equal(z, whole.latents[i, int(flip)].float()) and label == ds[(i, False)][1]
    # a finished shard is kept when the encoding is rerun (an interrupted build resumes); another seed redoes it
    codec = CountingCodec()
    data.encode_latent_shard(ds, codec, index, 1, 3, seed=3, chunk=chunk)
    assert codec.calls == 0
    data.encode_latent_shard(ds, codec, index, 1, 3, seed=4, chunk=chunk)
    assert codec.calls == 1
    shards[2].unlink()
    with pytest.raises(data.DataError, match="missing"):
        data.LatentDataset(index)


def test_epoch_order_of_one_seed_is_never_another_seeds_next_epoch():
    """DistributedSampler seeded seed + epoch: seed 1's epoch 0 was seed 0's epoch 1. Keyed streams never meet."""
    orders = {(s, e): data.EpochPlan(64, 4, 0, 1, seed=s, hflip=True).epoch_keys(e) for s in (0, 1) for e in (0, 1)}
    assert len({tuple(o) for o in orders.values()}) == 4
    again = data.EpochPlan(64, 4, 0, 1, seed=1, hflip=True).epoch_keys(1)
    assert again == orders[(1, 1)]
