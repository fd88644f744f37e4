"""`python -m launch.prefetch --dinov2`: FD_DINOv2's weights fetched into torch hub's cache, checked to hold the
architecture the metric uses, recorded, then found offline by the evaluator."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from fake_dinov2 import make_dinov2_state

from evaluation import dinov2
from launch import prefetch


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def test_fetch_check_record_and_find_offline(tmp_path: Path, torch_home: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture):
    source = tmp_path / "mirror" / dinov2.DINOV2_WEIGHTS
    source.parent.mkdir()
    torch.save(make_dinov2_state(dim=64, depth=1), source)
    monkeypatch.setenv(prefetch.DINOV2_URL_ENV, source.as_uri())

    monkeypatch.setattr(dinov2, "METRIC_ARCH", None)  # accept the tiny architecture
    assert prefetch.main(["--dinov2"]) == 0
    out = capsys.readouterr().out
    assert "dinov2: fetched and verified" in out
    dest = torch_home / dinov2.DINOV2_WEIGHTS
    sums = json.loads((torch_home / prefetch.SUMS_NAME).read_text())
    assert sums[dinov2.DINOV2_WEIGHTS]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    found = dinov2.resolve_dinov2_weights(allow_download=False, arch=None)
    assert (found.path, found.source) == (dest, "torch hub cache")
    assert prefetch.main(["--dinov2"]) == 0 and "dinov2: present, SHA-256 matches" in capsys.readouterr().out

    monkeypatch.setattr(dinov2, "METRIC_ARCH", dinov2.VITL14)  # the real metric's check refuses the tiny file
    (torch_home / prefetch.SUMS_NAME).unlink()
    assert prefetch.main(["--dinov2"]) == prefetch.EXIT_NOT_FETCHED
    assert ("dinov2: NOT fetched: fetched but does not load: " in (out := capsys.readouterr().out)
            and "holds a ViT/14 (64-d, 1 block); FD_DINOv2 uses DINOv2 ViT-L/14" in out)
