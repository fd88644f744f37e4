"""`python -m evaluation.compare`: the protocol object of the evaluator's report, the differing fields in order of
influence, and every verdict (the same protocol, comparable, within noise, not comparable)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from captured import run_captured
from fake_inception import StandInExtractor, make_images

from evaluation.compare import main
from evaluation.dinov2 import DinoV2Extractor
from evaluation.networks import FeatureNetworks
from evaluation.protocol import (
    FIELD_ORDER,
    GUIDANCE_SCALE,
    SAMPLER,
    add_sampling_fields,
    hash_file,
    sampling_field,
)
from evaluation.report import evaluate
from launch.runtime.files import file_sha256


@pytest.fixture(scope="module")
def base_report(tmp_path_factory: pytest.TempPathFactory, stand_in_module: StandInExtractor,
                dinov2_extractor: DinoV2Extractor) -> dict:
    """A real report (FID on the stand-in Inception, FD_DINOv2 on the tiny DINOv2, a bootstrap spread each)."""
    folder = tmp_path_factory.mktemp("compare")
    np.savez(folder / "ref.npz", arr_0=make_images(50, 10))
    np.savez(folder / "sample.npz", arr_0=make_images(51, 9, smooth=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = evaluate(folder / "ref.npz", folder / "sample.npz",
                          FeatureNetworks([stand_in_module, dinov2_extractor]), ["fid", "fd_dinov2"],
                          cache_dir=folder / "cache", bootstrap=3)
    report["_ref"] = str(folder / "ref.npz")
    return report


@pytest.fixture(scope="module")
def stand_in_module(weights: object) -> StandInExtractor:
    return StandInExtractor(weights, "cpu", batch_size=4)


def write(path: Path, report: dict) -> str:
    path.write_text(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}))
    return str(path)


def run(*argv: str) -> tuple[int, str, str]:
    return run_captured(main, argv)


def verdicts(*paths: str) -> dict[tuple[str, str], dict]:
    rc, out, err = run(*paths, "--json")
    assert rc == 0, err
    return {(v["file"], v["metric"]): v for v in json.loads(out)["verdicts"]}


def test_the_report_records_its_protocol(base_report: dict):
    protocol = base_report["protocol"]
    assert protocol["version"] == 1 and protocol["written_by"].startswith("dit-fid")
    assert protocol["reference"] == {"sha256": file_sha256(base_report["_ref"]), "images": 10}
    assert protocol["samples"] == {"count": 9}
    dino = protocol["networks"]["dinov2"]
    assert dino["sha256"] == file_sha256(base_report["dinov2_weights"]["path"])
    assert (dino["resize"], dino["input_side"], dino["output"]) == ("torch", 224, "CLS token after the final norm")
    assert dino["pos_embed"] == "bicubic from 37x37, scale (16 + 0.1) / 37, no antialias"
    assert protocol["settings"] == {"nearest_k": 3, "is_split_size": 5000, "bootstrap_resamples": 3,
                                    "bootstrap_seed": 0}
    assert {"python", "torch", "numpy", "timm"} <= set(protocol["versions"])
    assert base_report["fid_std"] > 0 and base_report["fd_dinov2_std"] > 0


def test_a_file_with_itself_has_the_same_protocol(tmp_path: Path, base_report: dict):
    a = write(tmp_path / "a.json", base_report)
    rc, out, err = run(a, a)
    assert rc == 0, err
    assert "protocol: the same in every file" in out
    assert "FID: within noise: +0.0000" in out and "FD_DINOv2: within noise" in out
    assert all(v["verdict"] == "within noise" and v["fields"] == [] for v in verdicts(a, a).values())


def test_every_verdict(tmp_path: Path, base_report: dict):
    base = copy.deepcopy(base_report)
    add_sampling_fields(base, model="DiT-XL/2", sampler="ddpm", num_steps=250, guidance_scale=1.5)
    a = write(tmp_path / "a.json", base)
    # B: another guidance scale; FID moved by 10 spreads (comparable), FD_DINOv2 by half a spread (noise).
    b_report = copy.deepcopy(base)
    b_report["protocol"]["sampling"]["guidance_scale"] = 1.25
    b_report["fid"] += 10 * np.hypot(base["fid_std"], base["fid_std"])
    b_report["fd_dinov2"] += 0.5 * base["fd_dinov2_std"]
    b = write(tmp_path / "b.json", b_report)
    # C: 10k samples and the PIL resize: FD_DINOv2 is measured with another yardstick, FID with fewer samples.
    c_report = copy.deepcopy(base)
    c_report["protocol"]["samples"]["count"] = 10_000
    c_report["protocol"]["networks"]["dinov2"]["resize"] = "pil"
    c = write(tmp_path / "c.json", c_report)
    # D: another reference batch; no spreads at all.
    d_report = copy.deepcopy(base)
    d_report["protocol"]["reference"]["sha256"] = "0" * 64
    for key in ("fid_std", "fd_dinov2_std"):
        del d_report[key]
    d = write(tmp_path / "d.json", d_report)
    got = verdicts(a, b, c, d)
    assert got[(b, "fid")]["verdict"] == "comparable" and got[(b, "fid")]["fields"] == [sampling_field(GUIDANCE_SCALE)]
    assert got[(b, "fd_dinov2")]["verdict"] == "within noise"
    assert got[(b, "fd_dinov2")]["spread"] == pytest.approx(np.hypot(base["fd_dinov2_std"], base["fd_dinov2_std"]))
    assert got[(c, "fid")]["verdict"] == "not comparable" and got[(c, "fid")]["difference"] == 0
    assert got[(c, "fid")]["fields"] == ["samples.count"]
    assert got[(c, "fd_dinov2")]["fields"] == ["networks.dinov2.resize", "samples.count"]
    assert got[(d, "fid")]["verdict"] == "not comparable" and got[(d, "fid")]["fields"] == ["reference.sha256"]
    assert got[(d, "fid")]["spread"] == pytest.approx(base["fid_std"])  # only A's spread is known
    rc, out, _ = run(a, b, c, d)
    assert rc == 0
    assert "  B FID: comparable: +" in out and "differs in sampling.guidance_scale" in out
    assert "  C FD_DINOv2: not comparable: networks.dinov2.resize, samples.count differ" in out
    assert "  D FID: not comparable: reference.sha256 differs" in out


def test_differences_are_ordered_by_influence(tmp_path: Path, base_report: dict):
    a_report, b_report = copy.deepcopy(base_report), copy.deepcopy(base_report)
    add_sampling_fields(a_report, sampler="ddpm", guidance_scale=1.5, world_size=8)
    add_sampling_fields(b_report, sampler="dpm-solver++", guidance_scale=4.0, world_size=1)
    b_report["protocol"]["samples"]["count"] = 50_000
    b_report["protocol"]["reference"]["sha256"] = "f" * 64
    b_report["protocol"]["versions"]["torch"] = "0.0"
    rc, out, err = run(write(tmp_path / "a.json", a_report), write(tmp_path / "b.json", b_report), "--json")
    assert rc == 0, err
    fields = [d["field"] for d in json.loads(out)["differences"]]
    assert fields == ["reference.sha256", "samples.count", sampling_field(SAMPLER), sampling_field(GUIDANCE_SCALE),
                      sampling_field("world_size"), "versions.torch"]
    order = [name for name, _ in FIELD_ORDER]
    assert order.index("networks.inception.sha256") < order.index("samples.count") < order.index("sampling.sampler")


def test_files_without_a_protocol_are_one_line(tmp_path: Path, base_report: dict):
    old = {k: v for k, v in base_report.items() if k not in ("protocol", "_ref")}
    newer = copy.deepcopy(base_report)
    newer["protocol"]["version"] = 99
    a = write(tmp_path / "a.json", base_report)
    (tmp_path / "old.json").write_text(json.dumps(old))
    for argv, fragment in [([a, str(tmp_path / "old.json")], "was written before protocols were recorded"),
                           ([a, write(tmp_path / "new.json", newer)], "holds protocol version 99"),
                           ([a], "give at least 2 metrics files"),
                           ([a, str(tmp_path / "none.json")], "no such file")]:
        rc, out, err = run(*argv)
        assert rc == 2 and out == "" and err.startswith("error: ") and fragment in err, (argv, err)
        assert len(err.strip().splitlines()) == 1


def test_sampling_fields_are_checked_and_hashes_remembered(tmp_path: Path, base_report: dict):
    with pytest.raises(ValueError, match="unknown protocol sampling field"):
        add_sampling_fields(copy.deepcopy(base_report), cfg=1.5)
    big = tmp_path / "ref.npz"
    big.write_bytes(b"x" * 1000)
    assert hash_file(big, tmp_path) == file_sha256(big)
    memo = json.loads((tmp_path / "sha256-memo.json").read_text())
    memo[str(big.resolve())]["sha256"] = "remembered"
    (tmp_path / "sha256-memo.json").write_text(json.dumps(memo))
    assert hash_file(big, tmp_path) == "remembered"  # same size and mtime: not read again
    big.write_bytes(b"y" * 1001)
    assert hash_file(big, tmp_path) == file_sha256(big)
