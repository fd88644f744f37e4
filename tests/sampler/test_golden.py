"""The sampler's PNGs are byte-identical to those of main at 2aecaba (before the restructuring and the
GPU-path changes) for fixed small configurations: the same seeds give the same bytes.

golden/tiny-pixel.pt is a tiny pixel-space DiT (untrained_dit, seed 7); golden/expected.json holds the
SHA-256 of every PNG that 2aecaba's sample_ddp.py wrote for each configuration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
BASE_ARGS = ["--model", "custom", "--ckpt", str(GOLDEN / "tiny-pixel.pt"), "--image-size", "8", "--vae", "none",
             "--num-classes", "10", "--no-npz"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pngs_match_main(name: str, sampler, tmp_path: Path):
    case = EXPECTED[name]
    result = sampler.run(1, [*BASE_ARGS, *case["args"], "--sample-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.glob("[0-9]*.png"))}
    assert got == case["png_sha256"]


def test_pngs_match_main_two_processes(sampler, tmp_path: Path):
    """World size 2 and another batch size give the same bytes as main's single process."""
    case = EXPECTED["ddpm-cfg2-all"]
    args = [a if a != "4" else "3" for a in case["args"]]  # --per-proc-batch-size 3 instead of 4
    result = sampler.run(2, [*BASE_ARGS, *args, "--sample-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.glob("[0-9]*.png"))}
    assert got == case["png_sha256"]
