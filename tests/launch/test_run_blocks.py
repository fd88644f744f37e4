"""Image shards and feature blocks of a run folder (launch.runtime.rundir, blocks.py): the resume plan, the
atomic block files that carry their run's id and checksums, and the `.npz` assembled from shards, checked against
plain numpy."""

from __future__ import annotations

import json
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from evaluation.batches import NpzBatch
from launch.runtime.blocks import Block
from launch.runtime.rundir import (
    IMAGES_CONTENT,
    IMAGES_DIR,
    SET_ASIDE_DIR,
    BlockWriter,
    ImageShards,
    RunDirError,
    assemble_npz,
    block_name,
    damaged_blocks,
    feature_rows,
    image_rows,
    load_features,
    plan_resume,
    scan_blocks,
)

N, SIDE = 10, 4
DIMS = {"pool": 3, "spatial": 2}
RUN, OTHER_RUN = "run-a", "run-b"


def scan_features(folder: Path, run: str = RUN) -> list[Block]:
    return scan_blocks(folder, N, feature_rows(DIMS), run, folder.name)


def scan_shards(folder: Path, run: str = RUN) -> ImageShards:
    return ImageShards.scan(folder, N, SIDE, run)


def images_of(indices) -> np.ndarray:
    """Image i is filled with the value i (so every row says where it came from)."""
    idx = np.asarray(indices)
    return np.broadcast_to(idx[:, None, None, None], (idx.size, SIDE, SIDE, 3)).astype(np.uint8).copy()


def features_of(indices) -> dict[str, np.ndarray]:
    idx = np.asarray(indices, np.float32)
    return {kind: idx[:, None] * 10 + np.arange(d, dtype=np.float32) for kind, d in DIMS.items()}


def write_run(folder: Path, batches: list[list[int]], block: int, keep_below: int | None = None,
              run: str = RUN) -> BlockWriter:
    writer = BlockWriter(N, block, run, folder / IMAGES_DIR, folder / "features-x", keep_images_below=keep_below)
    for batch in batches:
        writer.add(batch, images_of(batch), features_of(batch))
    writer.flush()
    return writer


def test_blocks_are_named_by_global_indices_and_hold_what_was_added(tmp_path: Path):
    write_run(tmp_path, [[0, 1], [2, 3], [4], [7, 8]], block=4)  # e.g. a rank resuming with gaps
    names = sorted(p.name for p in (tmp_path / IMAGES_DIR).iterdir())
    assert names == ["000000-000003-4.npz", "000004-000008-3.npz"]
    assert sorted(p.name for p in (tmp_path / "features-x").iterdir()) == names
    shards = scan_shards(tmp_path)
    np.testing.assert_array_equal(shards.kept, np.isin(np.arange(N), [0, 1, 2, 3, 4, 7, 8]))
    np.testing.assert_array_equal(shards.read([8, 0, 4]), images_of([8, 0, 4]))
    blocks = scan_features(tmp_path / "features-x")
    got = {int(i): rows["pool"][k] for idx, rows in load_features(blocks, ["pool"]) for k, i in enumerate(idx)}
    for i, row in got.items():
        np.testing.assert_array_equal(row, features_of([i])["pool"][0])
    assert not list(tmp_path.rglob(".*tmp*"))


def test_keep_images_below_keeps_only_the_grid(tmp_path: Path):
    write_run(tmp_path, [[0, 1, 2], [3, 4, 5]], block=6, keep_below=2)
    shards = scan_shards(tmp_path)
    assert np.flatnonzero(shards.kept).tolist() == [0, 1]
    (block,) = scan_features(tmp_path / "features-x")
    assert block.indices.tolist() == [0, 1, 2, 3, 4, 5]


def test_assembled_npz_equals_the_images_in_index_order(tmp_path: Path):
    order = [[5, 6], [0, 1], [9], [2, 3, 4], [7, 8]]  # two ranks' blocks, written in any order
    write_run(tmp_path, order, block=2)
    labels = np.arange(N)[::-1]
    out = assemble_npz(scan_shards(tmp_path), tmp_path / "run.npz", labels)
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_0"], images_of(range(N)))
        np.testing.assert_array_equal(z["arr_1"], labels)
    with zipfile.ZipFile(out) as z:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())


def test_assembling_an_incomplete_run_names_the_first_missing_image(tmp_path: Path):
    write_run(tmp_path, [[0, 1, 2], [4, 5, 6, 7, 8, 9]], block=3)
    with pytest.raises(RunDirError, match=r"lack 1 of 10 images \(first: 3\)"):
        assemble_npz(scan_shards(tmp_path), tmp_path / "run.npz")
    assert not (tmp_path / "run.npz").exists()


def foreign(folder: Path, indices: list[int], images: np.ndarray) -> None:
    """A block in the old format: no origin, no checksums (e.g. copied from an older run)."""
    np.savez(folder / block_name(np.array(indices), N), indices=np.array(indices), arr_0=images)


def set_aside_names(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / SET_ASIDE_DIR).iterdir())


def test_blocks_of_other_runs_damaged_or_overlapping_are_set_aside(tmp_path: Path):
    write_run(tmp_path, [[0, 1], [2, 3]], block=2)
    write_run(tmp_path / "other", [[4, 5]], block=2, run=OTHER_RUN)  # another run's shard, copied in
    folder = tmp_path / IMAGES_DIR
    (tmp_path / "other" / IMAGES_DIR / "000004-000005-2.npz").rename(folder / "000004-000005-2.npz")
    (folder / "000006-000006-1.npz").write_bytes(b"PK\x03\x04 not a zip")  # damaged
    write_run(tmp_path / "dup", [[1, 9]], block=2)  # repeats index 1
    (tmp_path / "dup" / IMAGES_DIR / "000001-000009-2.npz").rename(folder / "000001-000009-2.npz")
    foreign(folder, [7], images_of([7]))  # no origin record
    with pytest.warns(UserWarning) as caught:
        blocks = scan_blocks(folder, N, image_rows(SIDE), RUN, IMAGES_CONTENT)
    assert [b.indices.tolist() for b in blocks] == [[0, 1], [2, 3]]
    assert sorted(p.name for p in folder.iterdir()) == ["000000-000001-2.npz", "000002-000003-2.npz"]
    assert len(set_aside_names(tmp_path)) == 4  # kept for a look, never read again
    reasons = " ".join(str(w.message) for w in caught)
    assert "another run (run-b" in reasons and "repeats sample indices" in reasons and "no origin" in reasons
    assert isinstance(NpzBatch(blocks[0].path).images_memmap(), np.memmap)


def flip_bytes(path: Path, array: str, count: int = 40) -> None:
    """Flip bytes inside one array's data of a block (the zip structure and the headers stay intact)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{array}.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 128 + 8  # inside the array data
    for k in range(start, start + count):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_block_damaged_inside_its_array_is_found_by_its_checksum_and_never_read(tmp_path: Path):
    write_run(tmp_path, [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], block=10)
    shard = tmp_path / IMAGES_DIR / "000000-000009-10.npz"
    flip_bytes(shard, "arr_0")
    assert [p for p, _ in damaged_blocks([Block(shard, np.arange(N))], ["arr_0"])] == [shard]
    out = tmp_path / "run.npz"
    np.savez(out, arr_0=images_of(range(N)))  # a good batch from earlier
    before = out.read_bytes()
    with warnings.catch_warnings(), pytest.raises(RunDirError, match="changed on disk|lack 10 of 10"):
        warnings.simplefilter("ignore")
        assemble_npz(scan_shards(tmp_path), out)
    assert out.read_bytes() == before  # never replaced by damaged images
    assert not shard.exists() and set_aside_names(tmp_path)  # and a rerun makes them again


def test_the_checksums_are_crc32_of_each_array_as_zlib_computes_it(tmp_path: Path):
    write_run(tmp_path, [[3, 4]], block=2)
    path = tmp_path / IMAGES_DIR / "000003-000004-2.npz"
    with np.load(path) as z:
        origin = json.loads(z["origin"].tobytes())
        assert origin["run"] == RUN and origin["content"] == IMAGES_CONTENT
        assert origin["crc32"]["arr_0"] == zlib.crc32(images_of([3, 4]).tobytes())
        assert origin["crc32"]["indices"] == zlib.crc32(np.array([3, 4], np.int64).tobytes())


def numpy_plan(kept: np.ndarray, stored: np.ndarray, blocks: list[list[int]]) -> tuple[set, set, set]:
    """The rule of plan_resume written out as sets, one block at a time until nothing changes."""
    valid = [set(b) for b in blocks]
    while True:
        has = set().union(*valid) if valid else set()
        sample = {i for i in range(len(kept)) if not kept[i] and (stored[i] or i not in has)}
        keep = [b for b in valid if not b & sample]
        if len(keep) == len(valid):
            break
        valid = keep
    extract = {i for i in range(len(kept)) if kept[i] and i not in has}
    return sample, extract, {frozenset(b) for b in valid}


@pytest.mark.parametrize("seed", range(20))
def test_resume_plan_never_mixes_and_loses_nothing(seed: int, tmp_path: Path):
    rng = np.random.default_rng(seed)
    kept, stored = rng.random(N) < 0.6, rng.random(N) < 0.7
    perm = rng.permutation(N)[: rng.integers(0, N)]
    groups = np.split(perm, np.sort(rng.choice(np.arange(1, max(2, perm.size)), min(3, max(0, perm.size - 1)),
                                               replace=False))) if perm.size > 1 else [perm]
    groups = [np.sort(g) for g in groups if g.size]
    blocks = [scan_blocks_stub(tmp_path, g) for g in groups]
    plan = plan_resume(kept, stored, blocks)
    sample, extract, valid = numpy_plan(kept, stored, [g.tolist() for g in groups])
    assert set(plan.to_sample) == sample and set(plan.to_extract) == extract
    assert {frozenset(b.indices.tolist()) for b in plan.feature_blocks} == valid
    covered = set(plan.to_sample) | set(plan.to_extract) | {i for b in plan.feature_blocks for i in b.indices}
    assert covered == set(range(N))  # every image ends with exactly one source of features
    assert len(covered) == len(plan.to_sample) + len(plan.to_extract) + sum(b.indices.size for b in plan.feature_blocks)


def scan_blocks_stub(folder: Path, indices: np.ndarray):
    return Block(folder / block_name(indices, N), indices.astype(np.int64))


def test_resume_plan_without_features_samples_what_is_not_on_disk():
    kept = np.array([True, False, True, False])
    plan = plan_resume(kept, np.ones(4, bool), None)
    assert plan.to_sample == [1, 3] and plan.to_extract == [] and plan.stale == []
