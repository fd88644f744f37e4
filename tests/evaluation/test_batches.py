"""ADM batches: streamed reads equal numpy's whole reads, streamed writes are np.load-able, errors are one line."""

from __future__ import annotations

import errno
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import batches
from evaluation.batches import BatchError, PngWriter, open_batch, pack_folder
from launch.runtime.files import FileWriteError
from launch.runtime.npzfile import NpzWriter
from launch.runtime.rundir import index_filename


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (11, 6, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_streamed_chunks_equal_numpy_load(tmp_path, images, save):
    path = tmp_path / "b.npz"
    save(path, images, np.arange(11), mu=np.ones(3))
    batch = open_batch(path)
    assert (batch.num_images, batch.height, batch.width) == (11, 6, 7)
    assert np.array_equal(np.concatenate(list(batch.iter_chunks(4))), np.load(path)["arr_0"])
    assert np.array_equal(np.concatenate(list(batch.iter_chunks(3, start=2, stop=9))), images[2:9])
    assert batch.has("mu") and np.array_equal(batch.array("mu"), np.ones(3))
    assert np.array_equal(batch.array("arr_1"), np.arange(11))


def test_writer_streams_an_np_load_able_zip64_batch_and_renames_at_the_end(tmp_path, images):
    out = tmp_path / "w.npz"
    with NpzWriter(out, "arr_0", 11, (6, 7, 3)) as w:
        w.write(images[:5])
        assert not out.exists()
        w.write(images[5:])
        w.close({"arr_1": np.arange(11, dtype=np.int64)})
    data = np.load(out)
    assert np.array_equal(data["arr_0"], images) and data["arr_1"].dtype == np.int64
    with zipfile.ZipFile(out) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_writer_with_missing_images_leaves_nothing(tmp_path, images):
    out = tmp_path / "w.npz"
    w = NpzWriter(out, "arr_0", 11, (6, 7, 3))
    w.write(images[:3])
    with pytest.raises(ValueError, match="3 rows written but 11 announced"):
        w.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 3, 8, 8), np.uint8), "looks like NCHW"),
        (np.zeros((2, 8, 8, 3), np.float32), "dtype float32"),
        (np.zeros((2, 8, 8, 4), np.uint8), "4 channels"),
        (np.zeros((8, 8, 3), np.uint8), "expected [N, H, W, 3]"),
    ],
)
def test_bad_arrays_are_one_line_errors(tmp_path, array, message):
    path = tmp_path / "bad.npz"
    np.savez(path, array)
    with pytest.raises(BatchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_batch(path)


def test_missing_arr0_truncated_and_empty_folder(tmp_path, images):
    np.savez(tmp_path / "noimg.npz", mu=np.zeros(2))
    with pytest.raises(BatchError, match="has no arr_0"):
        open_batch(tmp_path / "noimg.npz")
    np.savez(tmp_path / "ok.npz", images)
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) - 100])
    with pytest.raises(BatchError, match="truncated|not a readable"):
        b = open_batch(tmp_path / "cut.npz")
        list(b.iter_chunks(4))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchError, match="contains no .png"):
        open_batch(tmp_path / "empty")


def test_png_writer_pack_folder_and_folder_reading(tmp_path, images):
    writer = PngWriter(workers=2)
    for i, img in enumerate(images):
        writer.submit(tmp_path / index_filename(i, len(images)), img)
    writer.close()
    assert not list(tmp_path.glob(".*"))
    Image.fromarray(images[0]).save(tmp_path / "grid.png")  # ignored: not an index name
    folder = open_batch(tmp_path)
    assert folder.num_images == 11 and np.array_equal(np.concatenate(list(folder.iter_chunks(64))), images)
    out = pack_folder(tmp_path, tmp_path.parent / "packed.npz", 11, labels=np.arange(11), workers=2)
    assert np.array_equal(np.load(out)["arr_0"], images)
    (tmp_path / index_filename(4, 11)).unlink()
    with pytest.raises(BatchError, match="lacks 1 of 11 PNGs .first: 000004.png"):
        pack_folder(tmp_path, tmp_path.parent / "again.npz", 11)
    assert index_filename(3, 10**6 + 1) == "0000003.png"


def test_disk_full_names_the_path_and_keeps_written_pngs(tmp_path, images, monkeypatch):
    writer = PngWriter(workers=1)
    writer.submit(tmp_path / "000000.png", images[0])
    writer.wait()

    def full(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    writer.submit(tmp_path / "000001.png", images[1])
    with pytest.raises(FileWriteError, match="cannot write .*000001.png: No space left on device"):
        writer.close()
    assert (tmp_path / "000000.png").exists()
    assert not (tmp_path / "000001.png").exists()
    assert batches.png_is_valid(tmp_path / "000000.png")
    assert not batches.png_is_valid(Path(tmp_path / "000001.png"))


def _run_folder(folder: Path, images: np.ndarray, num_fid_samples: int | None) -> Path:
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / index_filename(i, len(images)))
    Image.fromarray(images[0]).save(folder / "grid.png")
    if num_fid_samples is not None:
        identity = {"num_fid_samples": num_fid_samples}  # the sampler's also has image_size (square images)
        (folder / "manifest.json").write_text(json.dumps({"version": 1, "identity": identity}))
    return folder


def test_run_folder_reads_the_manifest_range_and_names_strays(tmp_path, images):
    """A run folder of 9 samples plus stray 000016.png/000099.png is 9 images, and says so."""
    rng = np.random.default_rng(1)
    strays = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)  # another size: never read
    folder = _run_folder(tmp_path / "run", images[:9], num_fid_samples=9)
    for name, img in zip(("000016.png", "000099.png"), strays):
        Image.fromarray(img).save(folder / name)
    with pytest.warns(UserWarning, match=r"reading the 9 images 000000.png..000008.png that its manifest.json "
                                         r"lists .*ignoring 000016.png, 000099.png"):
        batch = open_batch(folder)
    assert batch.num_images == 9 and np.array_equal(np.concatenate(list(batch.iter_chunks(64))), images[:9])

    bare = _run_folder(tmp_path / "bare", images[:9], num_fid_samples=None)  # no manifest: counts, and says why
    Image.fromarray(images[9]).save(bare / "000016.png")
    with pytest.warns(UserWarning, match=r"no manifest.json; reading its 10 index-named PNGs, which are not "
                                         r"0..9 \(first unexpected: 000016.png\)"):
        assert open_batch(bare).num_images == 10


def test_run_folder_short_of_its_manifest_or_of_another_size(tmp_path, images):
    short = _run_folder(tmp_path / "short", images[:5], num_fid_samples=6)
    with pytest.raises(BatchError, match="lacks 1 of the 6 images its manifest.json lists .first: 000005.png"):
        open_batch(short)
    sized = _run_folder(tmp_path / "sized", images[:5], num_fid_samples=5)
    assert open_batch(sized).num_images == 5
    manifest = json.loads((sized / "manifest.json").read_text())
    manifest["identity"]["image_size"] = 8
    (sized / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BatchError, match="the images are 7x6 but its manifest.json says image_size 8"):
        open_batch(sized)
    (sized / "manifest.json").write_text("{ not json")
    with pytest.raises(BatchError, match="manifest.json is damaged"):
        open_batch(sized)
