"""evaluation.reference: ADM preprocessing, the seeded arr_0 choice, streamed statistics, CLI errors; references
from an .npz of images (equal to the same images as PNGs) and with FD_DINOv2 statistics."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.batches import open_batch
from evaluation.dinov2 import DinoV2Extractor
from evaluation.inception import InceptionExtractor
from evaluation.reference import main
from evaluation.reference_batch import Decoder, NpzSource, build_reference, choose_subset
from launch.runtime.images import center_crop

SIZE = 16
# (width, height): tall, wide, exactly the target, a BOX halving twice (short side 70 -> 35 -> 17.5 ... )
IMAGE_SIZES = [(40, 70), (50, 33), (16, 16), (140, 70), (300, 65)]


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center_crop_arr, written out step by step."""
    image = image.convert("RGB")
    w, h = image.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        image = image.resize((w, h), resample=Image.BOX)
    scale = size / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), resample=Image.BICUBIC)
    arr = np.array(image)
    y0, x0 = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y0: y0 + size, x0: x0 + size]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(IMAGE_SIZES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        target = folder / "sub" if i % 2 else folder
        if i == 3:
            Image.fromarray(pixels).convert("L").save(target / f"img{i}.jpg", quality=95)  # grey -> RGB
        else:
            Image.fromarray(pixels).save(target / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_center_crop_matches_adm(image_folder: Path):
    for path in sorted(image_folder.rglob("img*")):
        with Image.open(path) as im:
            ours = center_crop(im, SIZE)
        with Image.open(path) as im:
            expected = adm_center_crop(im, SIZE)
        assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, expected)


def test_choose_subset_is_seeded_and_sorted():
    a, b = choose_subset(100, 10, seed=3), choose_subset(100, 10, seed=3)
    np.testing.assert_array_equal(a, b)
    assert np.all(np.diff(a) > 0) and len(set(a.tolist())) == 10
    assert not np.array_equal(a, choose_subset(100, 10, seed=4))
    np.testing.assert_array_equal(choose_subset(5, 10, seed=0), np.arange(5))


def test_build_reference(tmp_path: Path, image_folder: Path, extractor: InceptionExtractor):
    out = tmp_path / "ref.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_reference(image_folder, SIZE, out, extractor, num_images=3, seed=1, chunk_size=4)
    files = sorted(p for p in image_folder.rglob("*") if p.suffix in (".png", ".jpg"))
    assert len(files) == len(IMAGE_SIZES)
    expected_all = []
    for f in files:
        with Image.open(f) as im:
            expected_all.append(adm_center_crop(im, SIZE))
    expected_all = np.stack(expected_all)
    batch = open_batch(out)
    chosen = np.sort(np.random.default_rng(1).choice(len(files), 3, replace=False))
    np.testing.assert_array_equal(np.concatenate(list(batch.iter_chunks(64))), expected_all[chosen])
    feats = extractor.extract(expected_all)
    pool, spatial = feats["pool"].double().numpy(), feats["spatial"].double().numpy()
    np.testing.assert_allclose(batch.array("mu"), pool.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batch.array("sigma"), np.cov(pool, rowvar=False), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(batch.array("mu_s"), spatial.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batch.array("sigma_s"), np.cov(spatial, rowvar=False), rtol=1e-4, atol=1e-7)


def test_cli_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    for argv, fragment in [
        ([str(tmp_path / "empty"), "--image-size", "16", "--out", str(tmp_path / "r.npz")], "contains no images"),
        ([str(tmp_path / "nope"), "--image-size", "16", "--out", str(tmp_path / "r.npz")], "is not a folder"),
        ([str(tmp_path), "--image-size", "0", "--out", str(tmp_path / "r.npz")], "must be positive"),
    ]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([*argv, "--no-download"])
        assert rc == 2 and err.getvalue().startswith("error: ") and fragment in err.getvalue()
        assert len(err.getvalue().strip().splitlines()) == 1
    assert not (tmp_path / "r.npz").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path, image_folder: Path):
    out = tmp_path / "ref.npz"
    out.write_bytes(b"an earlier reference")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(image_folder), "--image-size", "16", "--out", str(out), "--no-download"])
    assert rc == 2 and "exists; pass --overwrite" in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1 and out.read_bytes() == b"an earlier reference"


def test_a_full_reference_seeds_the_evaluator_cache(tmp_path: Path, image_folder: Path,
                                                     extractor: InceptionExtractor, sample_images: np.ndarray):
    """arr_0 = every image: the first evaluation reads the reference's features from the cache (no Inception
    pass over it) and gets the numbers an evaluation without any cache gets."""
    from evaluation.report import evaluate

    out, cache = tmp_path / "ref.npz", tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_reference(image_folder, SIZE, out, extractor, num_images=len(IMAGE_SIZES), cache_dir=cache)
        assert len(list(cache.glob("*.npz"))) == 1
        seen = []
        counting = InceptionExtractor(extractor.weights, extractor.device, extractor.batch_size)
        real_extract = counting.extract
        counting.extract = lambda images: seen.append(len(images)) or real_extract(images)
        sample = tmp_path / "sample.npz"
        np.savez(sample, arr_0=sample_images)
        cached = evaluate(out, sample, counting, metrics=["fid", "prec", "recall"], cache_dir=cache)
        assert sum(seen) == len(sample_images)  # the reference was not run through Inception again
        fresh = evaluate(out, sample, extractor, metrics=["fid", "prec", "recall"], cache_dir=None)
    for key in ("fid", "precision", "recall"):
        assert cached[key] == pytest.approx(fresh[key], rel=1e-6, abs=1e-9), key


def test_upsampled_images_are_counted_in_one_warning(tmp_path: Path, weights_file: Path):
    """Images smaller than --image-size are upsampled (as ADM does), with one warning."""
    folder = tmp_path / "small"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i, (w, h) in enumerate([(8, 8), (12, 30), (40, 20), (30, 30)]):  # short sides 8, 12 < 16 <= 20, 30
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main([str(folder), "--image-size", "16", "--out", str(tmp_path / "ref.npz"), "--no-cache",
                   "--inception-weights", str(weights_file), "--device", "cpu"])
    assert rc == 0, err.getvalue()
    upsampled = [str(w.message) for w in caught if "upsampled" in str(w.message)]
    assert upsampled == ["2 of 4 images have a short side below --image-size 16 and were upsampled (bicubic): "
                         "their statistics describe blurred images"]


# --------------------------------------------------------------------------------------------- from an .npz

NPZ_IMAGES = 7
NPZ_SHAPE = (45, 70)  # (height, width): BOX-halved once for 16 px, then BICUBIC and a centre crop


def read_images(batch: object) -> np.ndarray:
    return np.concatenate(list(batch.iter_chunks(64)))


@pytest.fixture(scope="module")
def npz_images() -> np.ndarray:
    return np.random.default_rng(9).integers(0, 256, (NPZ_IMAGES, *NPZ_SHAPE, 3), dtype=np.uint8)


@pytest.mark.parametrize("compressed", [False, True])
def test_reference_from_npz_equals_the_same_images_as_pngs(tmp_path: Path, npz_images: np.ndarray,
                                                             stand_in: object, compressed: bool):
    """arr_0 of any size, streamed (memory-mapped, or read forward when compressed): the same file as from the
    PNGs of those images; arr_0 is ADM's preprocessing of the seeded choice."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(npz_images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    source = tmp_path / "images.npz"
    (np.savez_compressed if compressed else np.savez)(source, arr_0=npz_images)
    from_pngs, from_npz = tmp_path / "a.npz", tmp_path / "b.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_reference(folder, SIZE, from_pngs, stand_in, num_images=4, seed=2, chunk_size=3, cache_dir=None)
        build_reference(source, SIZE, from_npz, stand_in, num_images=4, seed=2, chunk_size=3, cache_dir=None)
    a, b = open_batch(from_pngs), open_batch(from_npz)
    chosen = choose_subset(NPZ_IMAGES, 4, seed=2)
    expected = np.stack([adm_center_crop(Image.fromarray(npz_images[i]), SIZE) for i in chosen])
    np.testing.assert_array_equal(read_images(b), expected)
    np.testing.assert_array_equal(read_images(a), read_images(b))
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(a.array(key), b.array(key))
    every = np.stack([adm_center_crop(Image.fromarray(image), SIZE) for image in npz_images])
    picked = np.concatenate(list(NpzSource(source).take(Decoder(SIZE), [1, 4, 5, 6], chunk=3)))  # other ranks'
    np.testing.assert_array_equal(picked, every[[1, 4, 5, 6]])
    pool = stand_in.extract(every)["pool"].double().numpy()
    np.testing.assert_allclose(b.array("mu"), pool.mean(0), rtol=1e-6)
    np.testing.assert_allclose(b.array("sigma"), np.cov(pool, rowvar=False), rtol=1e-5, atol=1e-9)


def test_npz_that_is_not_uint8_nhwc_is_one_line(tmp_path: Path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    cases = {"float": (images.astype(np.float32), "dtype float32"), "nchw": (images.transpose(0, 3, 1, 2), "NCHW")}
    for name, (array, _) in cases.items():
        np.savez(tmp_path / f"{name}.npz", arr_0=array)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    cases["statistics only"] = (None, "holds no images (arr_0)")
    (tmp_path / "notes.txt").write_text("x")
    cases["notes"] = (None, "is not a folder of images or an .npz")
    files = {"float": "float.npz", "nchw": "nchw.npz", "statistics only": "stats.npz", "notes": "notes.txt"}
    for name, (_, fragment) in cases.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([str(tmp_path / files[name]), "--image-size", "8", "--out", str(tmp_path / "r.npz"),
                       "--no-download"])
        assert rc == 2 and fragment in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1, name
    assert not (tmp_path / "r.npz").exists()


def test_dinov2_statistics_in_the_reference(tmp_path: Path, npz_images: np.ndarray, stand_in: object,
                                            dinov2_extractor: object, dinov2_file: Path, any_dinov2: None,
                                            weights_file: Path, monkeypatch: pytest.MonkeyPatch):
    """--dinov2: mu_dinov2/sigma_dinov2 of every (preprocessed) image beside ADM's four; the evaluator then uses
    them as given; with --dinov2-resize pil they are stored as mu_dinov2_pil/sigma_dinov2_pil."""
    from evaluation import networks
    from evaluation.networks import FeatureNetworks

    source = tmp_path / "images.npz"
    np.savez(source, arr_0=npz_images)
    out = tmp_path / "ref.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_reference(source, SIZE, out, FeatureNetworks([stand_in, dinov2_extractor]), num_images=3,
                        cache_dir=None)
    every = np.stack([adm_center_crop(Image.fromarray(image), SIZE) for image in npz_images])
    feats = dinov2_extractor.extract(every)["dinov2"].double().numpy()
    batch = open_batch(out)
    np.testing.assert_allclose(batch.array("mu_dinov2"), feats.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batch.array("sigma_dinov2"), np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-7)
    assert batch.has("mu") and not batch.has("mu_dinov2_pil") and batch.num_images == 3
    # The CLI with --dinov2 --dinov2-resize pil (Inception replaced by the stand-in: it is not what is tested).
    monkeypatch.setattr(networks, "InceptionExtractor", lambda weights, device, batch_size: stand_in)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main([str(source), "--image-size", str(SIZE), "--out", str(tmp_path / "pil.npz"), "--no-cache",
                   "--dinov2", "--dinov2-weights", str(dinov2_file), "--dinov2-resize", "pil",
                   "--inception-weights", str(weights_file), "--device", "cpu"])
    assert rc == 0, err.getvalue()
    pil = open_batch(tmp_path / "pil.npz")
    assert pil.has("mu_dinov2_pil") and not pil.has("mu_dinov2")
    pil_feats = DinoV2Extractor(dinov2_extractor.weights, "cpu", 8, "pil").extract(every)["dinov2"].double().numpy()
    np.testing.assert_allclose(pil.array("mu_dinov2_pil"), pil_feats.mean(0), rtol=1e-5, atol=1e-7)
