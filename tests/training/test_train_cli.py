"""train.py as users run it: 2-process torchrun (gloo on CPU), sample_ddp.py loading the result, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_ckpt, run_script

TINY_FLAGS = [
    "--model",
    "custom",
    "--depth",
    "1",
    "--hidden-size",
    "32",
    "--num-heads",
    "2",
    "--patch-size",
    "2",
    "--vae",
    "none",
    "--no-progress",
]


def test_two_process_training_then_sampling(tmp_path):
    results = tmp_path / "run"
    args = [
        "--dataset",
        "digits",
        "--image-size",
        "8",
        *TINY_FLAGS,
        "--global-batch-size",
        "8",
        "--max-steps",
        "4",
        "--ckpt-every",
        "2",
        "--checkpoints-total-limit",
        "1",
        "--log-every",
        "2",
        "--results-dir",
        str(results),
    ]
    proc = run_script(2, "train.py", args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 process(es)" in proc.stdout and "per-process batch 4" in proc.stdout
    assert sorted(p.name for p in (results / "checkpoints").iterdir()) == ["0000004.pt"]
    ckpt = results / "checkpoints" / "0000004.pt"
    obj = load_ckpt(ckpt)
    assert obj["step"] == 4 and obj["config"]["num_classes"] == 10 and len(obj["class_to_idx"]) == 10

    sample = run_script(
        1,
        "sample_ddp.py",
        [
            "--model",
            "custom",
            "--ckpt",
            str(ckpt),
            "--vae",
            "none",
            "--image-size",
            "8",
            "--num-classes",
            "10",
            "--num-fid-samples",
            "2",
            "--per-proc-batch-size",
            "2",
            "--num-sampling-steps",
            "2",
            "--sampler",
            "ddim",
            "--sample-dir",
            str(tmp_path / "samples"),
        ],
    )
    assert sample.returncode == 0, sample.stdout[-2000:] + sample.stderr[-2000:]
    (npz,) = Path(tmp_path / "samples").glob("*.npz")
    assert np.load(npz)["arr_0"].shape == (2, 8, 8, 3)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "folder"], "--dataset folder needs --data-path"),
        (["--dataset", "digits", "--model", "custom", "--depth", "2"], "--model custom needs --hidden-size"),
        (["--dataset", "digits", "--class-dropout", "1.5"], "--class-dropout must be in [0, 1)"),
        (["--dataset", "digits", "--use-kl", "--loss-weighting", "p2"], "cannot be combined with --use-kl"),
        (["--dataset", "folder", "--data-path", "/nonexistent/folder", "--vae", "none"], "is not a folder"),
        (["--dataset", "digits", "--diffusion-steps", "16"], "--noise-schedule linear with --diffusion-steps 16"),
        (["--dataset", "digits", "--num-workers", "-1"], "--num-workers must be >= 0"),
        (
            [
                "--dataset",
                "digits",
                "--vae",
                "none",
                "--image-size",
                "8",
                *TINY_FLAGS[:10],
                "--global-batch-size",
                "6",
                "--grad-accum",
                "4",
            ],
            "not divisible",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    import train

    assert train.main([*argv, "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_two_processes_encode_the_latent_cache_and_share_the_timestep_history(tmp_path, tiny_vae_dir):
    """Each rank encodes its own shard of --latent-cache; the loss-aware sampler records every rank's losses."""
    import torch
    from PIL import Image

    from models import data
    from models.vae import load_codec

    images = tmp_path / "images"
    rng = np.random.default_rng(1)
    for c in range(2):
        (images / f"c{c}").mkdir(parents=True)
        for i in range(40):  # 80 images: 3 chunks of 32, split 1 + 2 over the two ranks
            Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(images / f"c{c}" / f"{i}.png")
    cache, results = tmp_path / "latents.pt", tmp_path / "run"
    args = [
        *["--dataset", "folder", "--data-path", str(images), "--image-size", "8", *TINY_FLAGS[:10]],
        *["--vae", "ema", "--vae-path", str(tiny_vae_dir), "--latent-cache", str(cache), "--num-workers", "1"],
        *["--timestep-sampler", "loss-second-moment", "--diffusion-steps", "16", "--noise-schedule", "cosine"],
        *["--global-batch-size", "8", "--max-steps", "2", "--ckpt-every", "2", "--results-dir", str(results)],
        "--no-progress",
    ]
    proc = run_script(2, "train.py", args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    shards = sorted(p.name for p in (tmp_path / "latents.pt.shards").iterdir())
    assert shards == ["000000000-000000032.pt", "000000032-000000080.pt"]  # rank 0's and rank 1's
    cached = data.LatentDataset(cache)
    folder = data.ImageFolderDataset(images, 8)
    assert len(cached) == 80 and cached.class_to_idx == folder.class_to_idx
    assert cached.labels.tolist() == [label for _, label in folder.samples]
    # the same latents as one process encoding everything (chunk k's noise from (seed, k) on either rank)
    one = data.encode_latent_shard(folder, load_codec("ema", tiny_vae_dir), tmp_path / "alone.pt")
    alone = data.LatentDataset(data.write_latent_index(tmp_path / "alone.pt", [one], folder.class_to_idx))
    torch.testing.assert_close(cached.latents.float(), alone.latents.float(), atol=2e-3, rtol=0)
    # 2 steps x global batch 8: the history holds the losses of both ranks, not only rank 0's 4 per step
    history = load_ckpt(results / "checkpoints" / "0000002.pt")["timestep_sampler"]
    assert sum(history["loss_counts"]) == 2 * 8
