"""Bad input to sample_ddp.py: one line on stderr, exit code 2, before any model work, nothing lost."""

from __future__ import annotations

import time

import pytest

import sample_ddp
from launch.runtime.errors import UserError
from sampling.config import SampleConfig
from sampling.options import config_from_args


def parse(*argv: str) -> SampleConfig:
    return config_from_args(sample_ddp.build_parser().parse_args(list(argv)))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cfg-scale", "0.5"], "--cfg-scale must be >= 1"),
        (["--num-fid-samples", "0"], "--num-fid-samples must be positive"),
        (["--per-proc-batch-size", "-1"], "--per-proc-batch-size must be positive"),
        (["--image-size", "100"], "--image-size 100 does not fit DiT-XL/2: it must be a multiple of 16"),
        (["--model", "DiT-S/8", "--vae", "none", "--image-size", "20", "--ckpt", __file__], "multiple of 8"),
        (["--model", "DiT-B/2"], "published weights exist only for DiT-XL/2"),
        (["--num-classes", "10"], "the published DiT-XL/2 has 1000 classes"),
        (["--ckpt", "/nonexistent/model.pt"], "--ckpt /nonexistent/model.pt does not exist"),
        (["--guidance-interval", "500", "100"], "needs LOW <= HIGH"),
        (["--global-seed", "-3"], "--global-seed must be in"),
        (["--global-seed", "2048"], "--global-seed must be in [0, 2047]"),
        (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
        (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
        (["--guidance-interval", "nan", "nan"], "--guidance-interval LOW HIGH must be finite"),
        (["--guidance-interval", "-5", "100"], "timesteps are >= 0"),
        (["--sampler", "ddim", "--ddim-eta", "nan"], "--ddim-eta must be in [0, 1]"),
        (["--sampler", "ddim", "--ddim-eta", "1.5"], "--ddim-eta must be in [0, 1]"),
        (["--dist-timeout", "nan"], "--dist-timeout nan"),
        (["--dist-timeout", "1e300"], "--dist-timeout 1e+300"),
        (["--sampler", "euler", "--num-sampling-steps", "1"], "euler needs at least 2 steps"),
        (["--sampler", "heun", "--num-sampling-steps", "3"], "heun needs at least 6 steps"),
        (["--sampler", "ddpm", "--num-sampling-steps", "1"], "ddpm needs at least 2 steps"),
        (["--num-sampling-steps", "1001"], "at most the 1000 training steps"),
        (["--ref", "x.npz", "--bootstrap", "100000000"], "--bootstrap 100000000: give 0 (none) to 1000"),
        (["--ref", "x.npz", "--bootstrap-seed", "-1"], "--bootstrap-seed -1"),
    ],
)
def test_config_errors_are_one_line(argv, message):
    with pytest.raises(UserError) as info:
        parse(*argv)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_defaults_match_the_official_script():
    cfg = parse()
    assert (cfg.model, cfg.vae, cfg.sample_dir, cfg.per_proc_batch_size, cfg.num_fid_samples) == (
        "DiT-XL/2", "ema", "samples", 32, 50_000)
    assert (cfg.image_size, cfg.num_classes, cfg.cfg_scale, cfg.num_sampling_steps, cfg.global_seed, cfg.tf32) == (
        256, 1000, 1.5, 250, 0, True)
    assert cfg.run_name == "DiT-XL-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0-ddpm-250"


def test_help_shows_defaults_and_examples():
    text = sample_ddp.build_parser().format_help()
    assert "torchrun --nproc_per_node=8 sample_ddp.py --cfg-scale 1.5" in text
    assert "(default 50,000)" in " ".join(text.split())


def _assert_one_line_exit_2(result, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "torch/distributed" not in ln
             and not ln.startswith(("W1", "E1", "***", "Setting OMP"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_wrong_num_classes_for_the_checkpoint(sampler, tmp_path):
    args = sampler.pixel_args(tmp_path, 4, 2)
    args[args.index("--num-classes") + 1] = "1000"
    _assert_one_line_exit_2(sampler.run(1, args), "11 label rows (num_classes=10)", "--num-classes is 1000")


def test_corrupt_checkpoint_and_unwritable_dir(sampler, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    args = sampler.pixel_args(tmp_path / "out", 4, 2)
    args[args.index("--ckpt") + 1] = str(bad)
    _assert_one_line_exit_2(sampler.run(1, args), str(bad))

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _assert_one_line_exit_2(sampler.run(1, sampler.pixel_args(blocker / "sub", 4, 2)), "--sample-dir")


def test_every_rank_exits_2_within_seconds_under_torchrun(sampler, tmp_path):
    args = sampler.pixel_args(tmp_path, 4, 2)
    args[args.index("--num-classes") + 1] = "7"
    start = time.time()
    result = sampler.run(2, args)
    assert time.time() - start < 60
    assert result.returncode != 0
    assert "error: " in result.stderr and "--num-classes is 7" in result.stderr
    # one message, printed once (by rank 0), not once per rank
    assert result.stderr.count("--num-classes is 7") == 1, result.stderr


def test_offline_official_weights_fail_fast_naming_ckpt_and_prefetch(sampler, tmp_path, monkeypatch):
    """No --ckpt, nothing cached, no network: one line naming --ckpt and the prefetch command."""
    start = time.time()
    result = sampler.run(1, ["--num-fid-samples", "2", "--sample-dir", str(tmp_path)],
                         env={"TORCH_HOME": str(tmp_path / "torch-home"), "DIT_OFFICIAL_URL": "http://127.0.0.1:9/"})
    assert time.time() - start < 30
    _assert_one_line_exit_2(result, "--ckpt", "python -m launch.prefetch")


def test_a_failed_start_leaves_no_folder_behind(sampler, tmp_path):
    args = sampler.pixel_args(tmp_path, 4, 2)
    args[args.index("--num-classes") + 1] = "1000"
    assert sampler.run(1, args).returncode == 2
    assert not any(tmp_path.iterdir())
