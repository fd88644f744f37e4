"""Image shards and feature blocks of a run folder (evaluation.shards): the resume plan, the atomic block files
and the `.npz` assembled from shards, checked against plain numpy."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.batches import BatchError, NpzBatch
from evaluation.shards import (
    IMAGES_DIR,
    BlockWriter,
    ImageShards,
    assemble_npz,
    block_name,
    load_features,
    plan_resume,
    scan_blocks,
    scan_features,
)

N, SIDE = 10, 4
DIMS = {"pool": 3, "spatial": 2}


def images_of(indices) -> np.ndarray:
    """Image i is filled with the value i (so every row says where it came from)."""
    idx = np.asarray(indices)
    return np.broadcast_to(idx[:, None, None, None], (idx.size, SIDE, SIDE, 3)).astype(np.uint8).copy()


def features_of(indices) -> dict[str, torch.Tensor]:
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.float32)
    return {kind: idx[:, None] * 10 + torch.arange(d) for kind, d in DIMS.items()}


def write_run(folder: Path, batches: list[list[int]], block: int, keep_below: int | None = None) -> BlockWriter:
    writer = BlockWriter(N, block, folder / IMAGES_DIR, folder / "features-x", keep_images_below=keep_below)
    for batch in batches:
        writer.add(batch, images_of(batch), features_of(batch))
    writer.flush()
    return writer


def test_blocks_are_named_by_global_indices_and_hold_what_was_added(tmp_path: Path):
    write_run(tmp_path, [[0, 1], [2, 3], [4], [7, 8]], block=4)  # e.g. a rank resuming with gaps
    names = sorted(p.name for p in (tmp_path / IMAGES_DIR).iterdir())
    assert names == ["000000-000003-4.npz", "000004-000008-3.npz"]
    assert sorted(p.name for p in (tmp_path / "features-x").iterdir()) == names
    shards = ImageShards.scan(tmp_path, N, SIDE)
    np.testing.assert_array_equal(shards.kept, np.isin(np.arange(N), [0, 1, 2, 3, 4, 7, 8]))
    np.testing.assert_array_equal(shards.read([8, 0, 4]), images_of([8, 0, 4]))
    blocks = scan_features(tmp_path / "features-x", N, DIMS)
    got = {int(i): rows["pool"][k] for idx, rows in load_features(blocks, ["pool"]) for k, i in enumerate(idx)}
    for i, row in got.items():
        np.testing.assert_array_equal(row, features_of([i])["pool"][0].numpy())
    assert not list(tmp_path.rglob(".*tmp*"))


def test_keep_images_below_keeps_only_the_grid(tmp_path: Path):
    write_run(tmp_path, [[0, 1, 2], [3, 4, 5]], block=6, keep_below=2)
    shards = ImageShards.scan(tmp_path, N, SIDE)
    assert np.flatnonzero(shards.kept).tolist() == [0, 1]
    (block,) = scan_features(tmp_path / "features-x", N, DIMS)
    assert block.indices.tolist() == [0, 1, 2, 3, 4, 5]


def test_assembled_npz_equals_the_images_in_index_order(tmp_path: Path):
    order = [[5, 6], [0, 1], [9], [2, 3, 4], [7, 8]]  # two ranks' blocks, written in any order
    write_run(tmp_path, order, block=2)
    labels = np.arange(N)[::-1]
    out = assemble_npz(ImageShards.scan(tmp_path, N, SIDE), tmp_path / "run.npz", labels)
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_0"], images_of(range(N)))
        np.testing.assert_array_equal(z["arr_1"], labels)
    with zipfile.ZipFile(out) as z:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())


def test_assembling_an_incomplete_run_names_the_first_missing_image(tmp_path: Path):
    write_run(tmp_path, [[0, 1, 2], [4, 5, 6, 7, 8, 9]], block=3)
    with pytest.raises(BatchError, match=r"lack 1 of 10 images \(first: 3\)"):
        assemble_npz(ImageShards.scan(tmp_path, N, SIDE), tmp_path / "run.npz")
    assert not (tmp_path / "run.npz").exists()


def test_damaged_or_overlapping_blocks_are_dropped(tmp_path: Path):
    write_run(tmp_path, [[0, 1], [2, 3]], block=2)
    folder = tmp_path / IMAGES_DIR
    (folder / block_name(np.array([4, 5]), N)).write_bytes(b"PK\x03\x04 not a zip")  # damaged
    np.savez(folder / "000001-000009-2.npz", indices=np.array([1, 9]), arr_0=images_of([1, 9]))  # repeats 1
    np.savez(folder / "000006-000006-1.npz", indices=np.array([6]), arr_0=images_of([6])[:, :2])  # wrong size
    blocks = scan_blocks(folder, N, {"arr_0": ((SIDE, SIDE, 3), np.dtype(np.uint8))})
    assert [b.indices.tolist() for b in blocks] == [[0, 1], [2, 3]]
    assert sorted(p.name for p in folder.iterdir()) == ["000000-000001-2.npz", "000002-000003-2.npz"]
    assert isinstance(NpzBatch(blocks[0].path).images_memmap(), np.memmap)


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
    from evaluation.shards import Block

    return Block(folder / block_name(indices, N), indices.astype(np.int64))


def test_resume_plan_without_features_samples_what_is_not_on_disk():
    kept = np.array([True, False, True, False])
    plan = plan_resume(kept, np.ones(4, bool), None)
    assert plan.to_sample == [1, 3] and plan.to_extract == [] and plan.stale == []
