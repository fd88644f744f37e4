"""train.run in this process (world size 1) on tiny configurations: format, resume, limit, convergence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FOLDER_CLASSES, TINY_SIZE, load_ckpt

from models.training import CHECKPOINT_KEYS, checkpoint_path


def ckpts(results: str) -> list[str]:
    return sorted(p.name for p in (Path(results) / "checkpoints").iterdir())


def test_checkpoint_format_and_sampler_loading(tiny_config, train_run):
    from models.checkpoints import build_model

    cfg = tiny_config(max_steps=2, ckpt_every=2)
    assert train_run(cfg) == 0
    path = checkpoint_path(cfg.results_dir, 2)
    obj = load_ckpt(path)  # weights_only=True: plain types only
    assert set(CHECKPOINT_KEYS) <= set(obj)
    assert obj["step"] == 2
    assert obj["class_to_idx"] == {name: i for i, name in enumerate(sorted(FOLDER_CLASSES))}
    json.dumps(obj["config"])  # JSON-able
    assert obj["config"]["model"] == "custom" and obj["config"]["input_size"] == TINY_SIZE
    model, meta = build_model("custom", path, TINY_SIZE, len(FOLDER_CLASSES))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, obj["ema"][k], rtol=0, atol=0)
    assert meta["class_to_idx"] == obj["class_to_idx"]
    assert not list((Path(cfg.results_dir) / "checkpoints").glob("*.tmp"))


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), f"opt {i}.{name}"
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert a["timestep_sampler"] == b["timestep_sampler"]


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        # accumulation, flips, clipping, LR and EMA warm-up, and importance sampling of t whose loss history
        # (2 timesteps x 10 losses) fills during the run, so both the history and the sampling are resumed
        dict(
            grad_accum=2,
            global_batch_size=8,
            hflip=True,
            timestep_sampler="loss-second-moment",
            diffusion_steps=2,
            noise_schedule="cosine",
            use_kl=True,
            warmup_steps=2,
            lr_decay_every=2,
            max_grad_norm=0.5,
            ema_warmup=True,
        ),
    ],
)
def test_resume_equals_an_uninterrupted_run(tiny_config, train_run, tmp_path, capsys, extra):
    whole = tiny_config(max_steps=8, ckpt_every=4, results_dir=str(tmp_path / "whole"), **extra)
    assert train_run(whole) == 0
    first = tiny_config(max_steps=4, ckpt_every=4, results_dir=str(tmp_path / "cut"), **extra)
    assert train_run(first) == 0
    capsys.readouterr()
    second = tiny_config(max_steps=8, ckpt_every=4, results_dir=str(tmp_path / "cut"), resume="auto", **extra)
    assert train_run(second) == 0
    assert "resumed from" in capsys.readouterr().out
    a = load_ckpt(checkpoint_path(whole.results_dir, 8))
    b = load_ckpt(checkpoint_path(second.results_dir, 8))
    _assert_same_state(a, b)
    if extra.get("timestep_sampler"):
        counts = a["timestep_sampler"]["loss_counts"]
        assert all(c == 10 for c in counts), counts  # warmed up: importance sampling ran
    # a run with another seed ends elsewhere: the equality above is not a coincidence of tiny updates
    fresh = tiny_config(
        max_steps=8, ckpt_every=8, results_dir=str(tmp_path / "fresh"), global_seed=1, **extra
    )
    assert train_run(fresh) == 0
    c = load_ckpt(checkpoint_path(fresh.results_dir, 8))
    assert not torch.equal(a["model"]["final_layer.linear.weight"], c["model"]["final_layer.linear.weight"])


def test_checkpoints_total_limit_keeps_the_newest(tiny_config, train_run):
    cfg = tiny_config(max_steps=5, ckpt_every=1, checkpoints_total_limit=2)
    assert train_run(cfg) == 0
    assert ckpts(cfg.results_dir) == ["0000004.pt", "0000005.pt"]


def test_resume_refuses_another_architecture(tiny_config, train_run):
    from models.training import TrainError

    assert train_run(tiny_config(max_steps=1, ckpt_every=1)) == 0
    with pytest.raises(TrainError, match="hidden_size"):
        train_run(tiny_config(max_steps=2, hidden_size=16, resume="auto"))


def test_a_tiny_run_lowers_the_loss(tiny_config, train_run):
    """The loss on a fixed batch (fixed t and noise) drops well below its value at initialisation."""
    from models.checkpoints import build_model
    from models.data import ImageFolderDataset
    from models.training import build_diffusion

    cfg = tiny_config(
        max_steps=150,
        ckpt_every=150,
        log_every=50,
        lr=2e-3,
        learn_sigma=False,
        global_batch_size=8,
        class_dropout=0.0,
    )
    assert train_run(cfg) == 0
    data = ImageFolderDataset(cfg.data_path, TINY_SIZE)
    x = torch.stack([data[(i, False)][0] for i in range(len(data))])
    y = torch.tensor([data[(i, False)][1] for i in range(len(data))])
    gen = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (len(x),), generator=gen).repeat(4)
    noise = torch.randn((4 * len(x), *x.shape[1:]), generator=gen)
    x, y = x.repeat(4, 1, 1, 1), y.repeat(4)
    diffusion = build_diffusion(cfg)
    trained, _ = build_model("custom", checkpoint_path(cfg.results_dir, 150), TINY_SIZE, len(FOLDER_CLASSES))
    with torch.no_grad():
        after = diffusion.training_losses(trained, x, t, {"y": y}, noise=noise)["mse"].mean().item()
        # at initialisation DiT predicts 0 (adaLN-Zero), so the MSE is that of the noise itself
        before = (noise**2).mean().item()
    assert after < 0.6 * before, (before, after)
    losses = [
        float(line.split()[3])
        for line in (Path(cfg.results_dir) / "log.txt").read_text().splitlines()
        if line.startswith("step")
    ]
    assert losses[-1] < losses[0]


def test_sample_grid_is_written(tiny_config, train_run):
    from PIL import Image

    cfg = tiny_config(max_steps=2, ckpt_every=2, sample_every=2, sample_steps=2)
    assert train_run(cfg) == 0
    grid = Image.open(Path(cfg.results_dir) / "samples" / "0000002.png")
    assert grid.size == (len(FOLDER_CLASSES) * TINY_SIZE, 4 * TINY_SIZE)


def test_latent_cache_with_a_local_vae(tiny_config, train_run, tmp_path, tiny_vae_dir):
    """--vae with --latent-cache: images encoded once (original + mirror), training on 4-channel latents."""
    from models.data import LatentDataset

    vae_dir = tiny_vae_dir
    cache = tmp_path / "latents.pt"
    cfg = tiny_config(
        vae="ema",
        vae_path=str(vae_dir),
        latent_cache=str(cache),
        max_steps=2,
        ckpt_every=2,
        hflip=True,
        sample_every=2,
        sample_steps=2,
    )
    assert train_run(cfg) == 0
    ds = LatentDataset(cache)
    assert len(ds) == 2 * 8 and tuple(ds.latents.shape) == (16, 2, 4, TINY_SIZE // 2, TINY_SIZE // 2)
    assert ds.meta["vae"] == "ema" and ds.meta["image_size"] == TINY_SIZE
    obj = load_ckpt(checkpoint_path(cfg.results_dir, 2))
    assert (obj["config"]["in_channels"], obj["config"]["input_size"]) == (4, TINY_SIZE // 2)
    # a cache made for another image size is refused
    from models.training import TrainError

    with pytest.raises(TrainError, match="image_size"):
        train_run(
            tiny_config(
                dataset="latents",
                data_path=str(cache),
                image_size=16,
                vae="ema",
                vae_path=str(vae_dir),
                results_dir=str(tmp_path / "other"),
            )
        )


def test_a_checkpoint_half_written_by_a_killed_run_is_removed_when_training_starts_again(tiny_config, train_run,
                                                                                       capsys):
    cfg = tiny_config(max_steps=1, ckpt_every=1)
    assert train_run(cfg) == 0
    folder = Path(cfg.results_dir) / "checkpoints"
    stale = folder / ".0000002.pt.tmp-4242-1"  # what atomic_write leaves when SIGKILLed mid-save
    stale.write_bytes(b"x" * 1000)
    assert train_run(tiny_config(max_steps=2, ckpt_every=1, resume="auto")) == 0
    assert not stale.exists() and "removed the temporary files a killed run left" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["0000001.pt", "0000002.pt"]
