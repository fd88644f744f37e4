"""`python -m launch.prefetch` against a local fake source (file:// URLs, a fake hub), and offline."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from launch import prefetch
from launch.runtime.errors import EXIT_BAD_INPUT

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
DIT_FILE = "DiT-XL-2-256x256.pt"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
VAE_REPO = "stabilityai/sd-vae-ft-ema"
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connection refused at once
OFFLINE_LIMIT_S = 30.0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    """A folder with a (tiny) official-format DiT state dict and a torch-fidelity-layout Inception file."""
    from models.demo import untrained_dit

    folder = tmp_path / "mirror"
    folder.mkdir()
    net, _ = untrained_dit("custom", input_size=4, in_channels=4, num_classes=10, depth=1, hidden_size=16,
                           num_heads=2, patch_size=2)
    torch.save(net.state_dict(), folder / DIT_FILE)  # raw state dict, as the official files
    torch.save({"fc.weight": torch.randn(4, 8), "Mixed_6d.branch1x1.conv.weight": torch.randn(2, 2, 1, 1)},
               folder / INCEPTION_FILE)
    return folder


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: a tiny AutoencoderKL in the hub cache layout."""

    def __init__(self):
        self.downloads: list[str] = []

    def __call__(self, repo: str, cache_dir: Path, allow_patterns: list[str], endpoint: str | None,
                 local_only: bool = False, force: bool = False) -> Path:
        repo_dir = Path(cache_dir) / f"models--{repo.replace('/', '--')}"
        snapshot = repo_dir / "snapshots" / FAKE_COMMIT
        if local_only:
            if not (repo_dir / "refs" / "main").is_file():
                raise FileNotFoundError(f"{repo} is not cached")
            return snapshot
        from diffusers import AutoencoderKL

        self.downloads.append(repo)
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, layers_per_block=1)
        vae.save_pretrained(snapshot)
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(FAKE_COMMIT)
        return snapshot


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    torch_home, hf_home = tmp_path / "torch-home", tmp_path / "hf-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return {"torch": torch_home / "hub" / "checkpoints", "hf": hf_home / "hub", "torch_home": torch_home,
            "hf_home": hf_home}


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[str]]:
    code = prefetch.main(list(argv))
    return code, capsys.readouterr().out.splitlines()


def test_fetch_verify_record_then_skip_then_repair(mirror, caches, monkeypatch, capsys):
    hub = FakeHub()
    monkeypatch.setattr(prefetch, "hub_snapshot", hub)
    monkeypatch.setenv("DIT_OFFICIAL_URL", mirror.as_uri() + "/")
    monkeypatch.setenv("DIT_INCEPTION_URL", (mirror / INCEPTION_FILE).as_uri())
    selection = ("--models", "DiT-XL/2-256", "--vae", "ema", "--inception")

    code, out = run_cli(capsys, *selection)
    assert code == 0, out
    assert sum("fetched and verified" in line for line in out) == 3
    dit, inception = caches["torch"] / DIT_FILE, caches["torch"] / INCEPTION_FILE
    assert dit.read_bytes() == (mirror / DIT_FILE).read_bytes()
    assert inception.read_bytes() == (mirror / INCEPTION_FILE).read_bytes()
    sums = json.loads((caches["torch"] / prefetch.SUMS_NAME).read_text())
    assert sums[DIT_FILE]["sha256"] == sha256(mirror / DIT_FILE)
    assert sums[INCEPTION_FILE]["sha256"] == sha256(mirror / INCEPTION_FILE)
    hf_sums = json.loads((caches["hf"] / prefetch.SUMS_NAME).read_text())
    snapshot = caches["hf"] / f"models--{VAE_REPO.replace('/', '--')}" / "snapshots" / FAKE_COMMIT
    assert {caches["hf"] / k for k in hf_sums} == {snapshot / "config.json",
                                                   snapshot / "diffusion_pytorch_model.safetensors"}
    assert all(v["sha256"] == sha256(caches["hf"] / k) for k, v in hf_sums.items())
    assert out[-3:] == [f"export TORCH_HOME={caches['torch_home']}", f"export HF_HOME={caches['hf_home']}",
                        "export HF_HUB_OFFLINE=1"]

    # The sampler and the evaluator now find everything with no network at all.
    from evaluation.inception import resolve_weights
    from models.checkpoints import official_checkpoint
    from models.vae import load_codec

    monkeypatch.setenv("DIT_OFFICIAL_URL", UNREACHABLE)
    monkeypatch.setenv("DIT_INCEPTION_URL", UNREACHABLE + INCEPTION_FILE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert official_checkpoint(256) == dit
    assert resolve_weights(allow_download=False).path == inception
    assert load_codec("ema").latent_channels == 4

    # A second run fetches nothing (the sources are unreachable now) and says so.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    code, out = run_cli(capsys, *selection)
    assert code == 0, out
    assert sum("present, SHA-256 matches" in line for line in out) == 3
    assert hub.downloads == [VAE_REPO]

    # A changed file no longer matches its recorded sum: it is fetched again.
    dit.write_bytes(dit.read_bytes()[:-10])
    monkeypatch.setenv("DIT_OFFICIAL_URL", mirror.as_uri() + "/")
    code, out = run_cli(capsys, "--models", "DiT-XL/2-256")
    assert code == 0 and "fetched and verified" in out[0], out
    assert sha256(dit) == sha256(mirror / DIT_FILE)


def test_dry_run_lists_every_item_and_writes_nothing(caches, capsys):
    code, out = run_cli(capsys, "--dry-run")
    assert code == 0
    would = [line for line in out if ": would fetch " in line]
    assert [line.split(":")[0] for line in would] == ["DiT-XL/2-256", "DiT-XL/2-512", "SiT-XL/2-256",
                                                      "REPA-SiT-XL/2-256", "vae ema", "vae mse", "inception",
                                                      "dinov2"]
    assert str(caches["torch"] / DIT_FILE) in would[0]
    assert not caches["torch_home"].exists() and not caches["hf_home"].exists()


def test_offline_says_so_once_per_item_within_seconds(caches, monkeypatch, capsys):
    monkeypatch.setenv("DIT_OFFICIAL_URL", UNREACHABLE)
    monkeypatch.setenv("DIT_INCEPTION_URL", UNREACHABLE + INCEPTION_FILE)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE.rstrip("/"))  # the real hub client, refused
    start = time.monotonic()
    code, out = run_cli(capsys, "--vae", "ema,mse", "--models", "DiT-XL/2-256,DiT-XL/2-512", "--inception")
    assert time.monotonic() - start < OFFLINE_LIMIT_S
    assert code == prefetch.EXIT_NOT_FETCHED
    failed = [line for line in out if "NOT fetched" in line]
    assert [line.split(":")[0] for line in failed] == ["DiT-XL/2-256", "DiT-XL/2-512", "vae ema", "vae mse",
                                                       "inception"]
    assert all("refused" in line.lower() for line in failed), failed
    assert out[-1] == "export HF_HUB_OFFLINE=1"
    assert not list(caches["torch_home"].rglob("*.part"))


def test_unknown_names_are_bad_input(caches, capsys):
    assert prefetch.main(["--models", "DiT-XL/2-1024"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --models") and "\n" not in err and "DiT-XL/2-256" in err


def test_a_presets_weights_are_fetched_and_checked_as_their_family(caches, monkeypatch, tmp_path, capsys):
    """--preset repa-sit-xl-2-256 fetches REPA's file, its VAE and Inception; a file that loads as another
    family (here a DiT served under REPA's URL) is refused in one line naming it."""
    from models.sit import REPASiT

    mirror = tmp_path / "flow-mirror"
    mirror.mkdir()
    repa = REPASiT(input_size=4, in_channels=4, num_classes=10, depth=2, hidden_size=16, num_heads=2, patch_size=2,
                   encoder_depth=1, z_dims=(6,), projector_dim=8)
    torch.save(repa.state_dict(), mirror / "last.pt")  # REPA's release: a raw EMA state dict with projectors
    from models.demo import untrained_dit

    dit, _ = untrained_dit("custom", input_size=4, in_channels=4, num_classes=10, depth=1, hidden_size=16,
                           num_heads=2, patch_size=2)
    torch.save(dit.state_dict(), mirror / "dit.pt")
    monkeypatch.setattr(prefetch, "build_items", _without_hub_and_inception(prefetch.build_items))
    monkeypatch.setenv("DIT_REPA_URL", (mirror / "last.pt").as_uri())
    code, out = run_cli(capsys, "--preset", "repa-sit-xl-2-256")
    assert code == 0, out
    assert (caches["torch"] / "REPA-SiT-XL-2-256x256-last.pt").is_file()
    (caches["torch"] / "REPA-SiT-XL-2-256x256-last.pt").unlink()
    monkeypatch.setenv("DIT_REPA_URL", (mirror / "dit.pt").as_uri())
    code, out = run_cli(capsys, "--preset", "repa-sit-xl-2-256")
    # a DiT's keys are a SiT's (no projectors): read under SiT-XL/2 it is a sit checkpoint, not REPA's
    assert code != 0 and any(line.startswith("REPA-SiT-XL/2-256: NOT fetched: fetched but does not load")
                             for line in out), out


def _without_hub_and_inception(build):  # noqa: ANN001, ANN202 - only the checkpoint item of a preset
    def items(models, vaes, inception, with_dinov2=False):  # noqa: ANN001, ANN202
        return build(models, [], False, False)

    return items
