"""train.py on an image folder that cannot be trained on as it is: one line naming the folder or file, exit 2, no
traceback, whether the file is found while listing the folder or by a DataLoader worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import data

ROOT = Path(__file__).resolve().parents[2]
TINY_ARCH = dict(model="custom", depth=1, hidden_size=32, num_heads=2, patch_size=2)
TINY_SIZE = 8
CLASSES = ("cat", "dog")
IMAGES_PER_CLASS = 4


def train_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DIT_CPU_THREADS="1")
    return env


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png")
    return root


def train_argv(folder: Path, results: Path, workers: int = 0) -> list[str]:
    argv = ["--dataset", "folder", "--data-path", str(folder), "--image-size", str(TINY_SIZE), "--vae", "none"]
    for name, value in TINY_ARCH.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return [*argv, "--no-progress", "--num-workers", str(workers), "--global-batch-size", "4", "--max-steps", "2",
            "--results-dir", str(results)]


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_an_empty_class_folder_is_one_line_before_any_step(tmp_path, capsys):
    """Refused rather than skipped. The class index of a folder is its place in the sorted folder names (as in
    torchvision's ImageFolder, which also refuses a class without images); leaving the empty class out would
    shift the index of every class after it, so the labels would no longer be those of a reference batch or of
    another run on the full folder, and keeping it gives a label that is never trained but is sampled like the
    others. Either way FID is silently wrong; the user fixes the folder in a moment."""
    import train

    folder = image_folder(tmp_path / "data")
    (folder / "bird").mkdir()
    (folder / "bird" / "notes.txt").write_text("not an image\n")
    code = train.main(train_argv(folder, tmp_path / "run"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert line == (f"error: --data-path class folder {folder / 'bird'} holds no images (.jpg, .jpeg, .png, .gif, "
                    ".bmp, .webp); add its images or move the folder out (class indices follow the sorted folder "
                    "names)")
    assert not (tmp_path / "run").exists()  # found before the model, the config or any step


def test_an_empty_image_file_is_named_while_listing(tmp_path, capsys):
    import train

    folder = image_folder(tmp_path / "data")
    (folder / "dog" / "9.png").write_bytes(b"")  # a copy that never finished
    code = train.main(train_argv(folder, tmp_path / "run"))
    assert code == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: --data-path image {folder / 'dog' / '9.png'} is empty (0 bytes); copy it again or move it out of "
        "the folder")
    assert not (tmp_path / "run").exists()


def test_a_text_file_named_png_read_by_a_dataloader_worker_is_one_line(tmp_path):
    """The worker's exception comes back to the main process re-made from the worker's traceback: the line is
    the error's own, and no traceback reaches stderr."""
    folder = image_folder(tmp_path / "data")
    bad = folder / "cat" / "9.png"
    bad.write_text("these are not pixels\n")
    proc = subprocess.run([sys.executable, "train.py", *train_argv(folder, tmp_path / "run", workers=1)], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Caught" not in proc.stderr
    assert one_error_line(proc.stderr) == (f"error: --data-path image {bad} does not decode (cannot identify image "
                                           "file); replace it or move it out of the folder")


class Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        raise data.UnreadableImageError(f"--data-path image /x/{index}.png does not decode (truncated)")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_user_error_from_a_dataloader_worker_keeps_its_class_and_its_line(workers):
    with pytest.raises(data.UnreadableImageError) as info:
        next(iter(torch.utils.data.DataLoader(Unreadable(), batch_size=1, num_workers=workers)))
    assert str(info.value) == "--data-path image /x/0.png does not decode (truncated)"
