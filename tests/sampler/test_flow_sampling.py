"""Flow-matching models (SiT, REPA) through sample_ddp.py: the family recognised and recorded, the samplers that
apply to it, presets, the uint8 conversion, and the same images whatever the number of processes."""

from __future__ import annotations

import json
import re
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NUM_CLASSES

import sample_ddp
from launch.runtime import preempt
from launch.runtime.errors import UserError
from models import sit
from models.sit import SiT
from sampling.options import config_from_args
from sampling.presets import PRESETS

N = 12
TINY = dict(depth=1, hidden_size=32, patch_size=2, num_heads=2)
TINY_NAME = "SiT-T/2"


def parse(*argv: str):
    return config_from_args(sample_ddp.build_parser().parse_args(list(argv)))


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random O(1) weights everywhere (the official init zeroes adaLN and the output: a constant model)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory) -> Path:
    """A tiny SiT as this project's train.py writes it with --objective flow (family sit, custom size)."""
    net = randomized(SiT(input_size=8, in_channels=3, num_classes=NUM_CLASSES, learn_sigma=False, **TINY), 1)
    config = {"model": "custom", "input_size": 8, "in_channels": 3, "num_classes": NUM_CLASSES, "learn_sigma": False,
              "objective": "flow", "family": "sit", **TINY}
    path = tmp_path_factory.mktemp("flow") / "tiny-flow.pt"
    torch.save({"ema": net.state_dict(), "config": config}, path)
    return path


def flow_args(ckpt: Path, sample_dir: Path, batch: int, *extra: str) -> list[str]:
    return ["--model", "custom", "--ckpt", str(ckpt), "--image-size", "8", "--vae", "none", "--num-classes",
            str(NUM_CLASSES), "--num-fid-samples", str(N), "--per-proc-batch-size", str(batch),
            "--num-sampling-steps", "6", "--cfg-scale", "2", "--guidance-interval", "0", "0.7",
            "--sample-dir", str(sample_dir), *extra]


def run_folder(sample_dir: Path) -> Path:
    (folder,) = [p for p in sample_dir.iterdir() if p.is_dir()]
    return folder


def test_a_flow_model_gets_its_protocol_and_the_same_images_on_1_and_2_processes(sampler, flow_ckpt, tmp_path):
    """Without --sampler a flow model samples euler-maruyama (SiT's and REPA's protocol); every random number
    comes from each sample's generator, so 2 processes with batch 5 and 1 process with batch 4 agree."""
    two = sampler.run(2, flow_args(flow_ckpt, tmp_path / "two", 5))
    assert two.returncode == 0, two.stderr
    one = sampler.run(1, flow_args(flow_ckpt, tmp_path / "one", 4))
    assert one.returncode == 0, one.stderr
    a, b = (np.load(f"{run_folder(tmp_path / d)}.npz") for d in ("two", "one"))
    assert run_folder(tmp_path / "two").name.endswith("euler-maruyama-6-gi-0-0.7")
    assert np.array_equal(a["arr_1"], b["arr_1"])
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())  # last-bit kernels
    assert a["arr_0"].std() > 10  # not a constant image
    manifest = json.loads((run_folder(tmp_path / "two") / "manifest.json").read_text())
    assert manifest["model"]["family"] == "sit" and "trained by this project" in manifest["model"]["family_evidence"]
    assert "1 = noise" in manifest["model"]["guidance_interval_in"]
    assert manifest["sampler"]["sampler"] == "euler-maruyama" and manifest["sampler"]["nfe"] == 6
    assert manifest["identity"]["family"] == "sit"


@pytest.mark.parametrize(("extra", "message"), [
    (["--sampler", "ddpm"], "--sampler ddpm does not apply to custom, a flow-matching model (family sit); use one "
                            "of euler, heun, euler-maruyama, dopri5, dpm++2m, unipc"),
    (["--guidance-interval", "0", "500"], "flow time t in [0, 1]"),
    (["--sampler", "euler-maruyama", "--num-sampling-steps", "1"], "euler-maruyama needs at least 2"),
])
def test_what_a_flow_model_cannot_take_is_one_line_before_any_work(flow_ckpt, tmp_path, extra, message):
    with pytest.raises(UserError, match=re.escape(message)) as info:
        parse(*flow_args(flow_ckpt, tmp_path, 4), *extra)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "custom-tiny-flow-size-8").exists() and not list(tmp_path.iterdir())


def test_a_flow_sampler_on_a_dit_is_refused(sampler, tmp_path):
    with pytest.raises(UserError, match="--sampler euler-maruyama does not apply to custom, a diffusion .DDPM. "
                                        "model .family dit.; use one of ddpm, ddim"):
        parse(*sampler.pixel_args(tmp_path, 4, 2), "--sampler", "euler-maruyama")


def test_presets_set_the_published_recipe_and_flags_override_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no reference batch here: the preset warns and samples without metrics
    with pytest.warns(UserWarning, match="VIRTUAL_imagenet256_labeled.npz is not in the current folder"):
        cfg = parse("--preset", "repa-sit-xl-2-256")
    assert (cfg.model, cfg.image_size, cfg.sampler, cfg.num_sampling_steps, cfg.cfg_scale) == (
        "SiT-XL/2", 256, "euler-maruyama", 250, 1.8)
    assert (cfg.guidance_interval, cfg.guidance_channels, cfg.to_uint8, cfg.num_fid_samples) == (
        (0.0, 0.7), "all", "repa", 50_000)
    assert (cfg.family, cfg.published, cfg.preset_overrides, cfg.ref) == ("repa", "REPA-SiT-XL/2-256", (), None)
    (tmp_path / "VIRTUAL_imagenet256_labeled.npz").write_bytes(b"")
    with pytest.raises(UserError, match="--ref"):  # the preset's reference is there (here empty): it is used
        parse("--preset", "dit-xl-2-256")
    (tmp_path / "VIRTUAL_imagenet256_labeled.npz").unlink()
    with pytest.warns(UserWarning):
        cfg = parse("--preset", "sit-xl-2-256", "--cfg-scale", "4", "--num-sampling-steps", "50")
    assert cfg.cfg_scale == 4 and cfg.num_sampling_steps == 50 and cfg.sampler == "euler-maruyama"
    assert cfg.preset_overrides == ("cfg_scale", "num_sampling_steps") and cfg.guidance_channels == "first3"
    assert cfg.run_name == "SiT-XL-2-SiT-XL-2-256x256-size-256-vae-ema-cfg-4.0-seed-0-euler-maruyama-50"
    with pytest.warns(UserWarning):
        dit = parse("--preset", "dit-xl-2-256")
    assert dit.run_name == "DiT-XL-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0-ddpm-250"  # the official name


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "sit-xl-2-256", "--model", "DiT-XL/2"], "samples SiT-XL/2 (family sit) but --model is DiT-XL/2"),
    (["--preset", "sit-xl-2-256", "--image-size", "512"], "--image-size 512 needs --ckpt"),
    (["--preset", "dit-xl-2-256", "--sampler", "euler-maruyama"], "does not apply to DiT-XL/2"),
    (["--preset", "repa-sit-xl-2-256", "--guidance-interval", "0", "700"], "flow time t in [0, 1]"),
])
def test_a_flag_that_contradicts_the_preset_is_one_line(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(), pytest.raises(UserError, match=re.escape(message)) as info:
        warnings.simplefilter("ignore")  # the preset's reference batch is not here
        parse(*argv)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ REPA, in this process


@pytest.fixture
def repa_registry(monkeypatch):
    """A tiny SiT-T/2 registered as a named model, as SiT-XL/2 is."""
    monkeypatch.setitem(sit.SIT_CONFIGS, TINY_NAME, TINY)
    monkeypatch.setitem(sit.SiT_models, TINY_NAME, lambda **kw: SiT(**TINY, **kw))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the sampler installs its fail-fast hook
    monkeypatch.setenv("DIT_CPU_THREADS", "1")
    saved = {sig: signal.getsignal(sig) for sig in preempt.STOP_SIGNALS}
    yield TINY_NAME
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_repa_file_is_recognised_and_gets_repas_guidance_and_uint8(repa_registry, tmp_path):
    from models.sit import REPASiT
    from sampling.run import run

    repa = randomized(REPASiT(input_size=8, in_channels=3, num_classes=NUM_CLASSES, encoder_depth=1, z_dims=(6,),
                              projector_dim=8, **TINY), 2)
    path = tmp_path / "repa-last.pt"
    torch.save(repa.state_dict(), path)  # REPA's released file: a raw EMA state dict with its projectors
    argv = ["--model", TINY_NAME, "--ckpt", str(path), "--image-size", "8", "--vae", "none", "--num-classes",
            str(NUM_CLASSES), "--num-fid-samples", "4", "--per-proc-batch-size", "4", "--num-sampling-steps", "4",
            "--sample-dir", str(tmp_path / "s"), "--cfg-scale", "1.8"]
    assert run(parse(*argv)) == 0
    folder = run_folder(tmp_path / "s")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["family"] == "repa" and manifest["model"]["family_evidence"].startswith("keys projectors")
    assert manifest["identity"]["guidance_channels"] == "all" and manifest["identity"]["to_uint8"] == "repa"
    repa_images = np.load(f"{folder}.npz")["arr_0"].astype(int)
    assert run(parse(*argv, "--to-uint8", "dit", "--sample-dir", str(tmp_path / "d"))) == 0
    dit_images = np.load(f"{run_folder(tmp_path / 'd')}.npz")["arr_0"].astype(int)
    # the same x0 converted by the two rules: REPA's is half a level darker, so equal or one level lower, and
    # one level lower for about half of the pixels that neither rule clamps
    diff = dit_images - repa_images
    assert set(np.unique(diff)) <= {0, 1}
    inside = (repa_images > 0) & (dit_images < 255)
    assert 0.3 < diff[inside].mean() < 0.7, diff[inside].mean()


def test_presets_are_listed_in_help_with_the_papers_numbers():
    text = sample_ddp.build_parser().format_help()
    for name, preset in PRESETS.items():
        assert name in text and f"FID {preset.fid}" in text
