"""Checkpoint formats round trip, config inference, one-line errors, offline download behaviour."""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import checkpoints as ck
from models.checkpoints import CheckpointError, build_model, infer_config, load_checkpoint
from models.dit import DiT

REFUSED_URL = "http://127.0.0.1:9/"  # discard port: connection refused at once
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture
def no_proxy(monkeypatch):
    """Local URLs must be reached directly."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


def make_state(cfg, seed, randomize, **kwargs):
    model = DiT(**{**dict(input_size=8, num_classes=10), **cfg, **kwargs})
    return {k: v.clone() for k, v in randomize(model, seed).state_dict().items()}


def assert_same_weights(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v.float()), k


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------------- round trips


def test_raw_state_dict_round_trip(tmp_path, tiny_registry, randomize):
    state = make_state(tiny_registry["DiT-T/2"], 1, randomize)
    path = tmp_path / "raw.pt"
    torch.save(state, path)
    model, meta = build_model("DiT-T/2", path, input_size=8, num_classes=10)
    assert_same_weights(model, state)
    assert meta["kind"] == "raw" and meta["path"] == str(path)
    assert not model.training and model.learn_sigma and model.in_channels == 4


def test_train_dict_prefers_ema(tmp_path, tiny_registry, randomize):
    cfg = tiny_registry["DiT-T/2"]
    live, ema = make_state(cfg, 1, randomize), make_state(cfg, 2, randomize)
    config = {"model": "DiT-T/2", "image_size": 64, "num_classes": 10}
    path = tmp_path / "0001000.pt"
    torch.save({"model": live, "ema": ema, "opt": {"state": {}, "param_groups": []}, "config": config}, path)
    model, meta = build_model("DiT-T/2", path, input_size=8, num_classes=10)
    assert_same_weights(model, ema)
    assert meta["kind"] == "train" and meta["weights"] == "ema" and meta["config"] == config
    torch.save({"model": live, "args": config, "class_to_idx": {"cat": 0}}, path)  # no ema: use model
    model, meta = build_model("DiT-T/2", path, input_size=8, num_classes=10)
    assert_same_weights(model, live)
    assert meta["weights"] == "model" and meta["class_to_idx"] == {"cat": 0}


def test_pickled_args_need_opt_in(tmp_path, tiny_registry, randomize):
    state = make_state(tiny_registry["DiT-T/2"], 1, randomize)
    path = tmp_path / "official_train.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(model="DiT-T/2")}, path)
    msg = one_line_error(build_model, "DiT-T/2", path, 8, 10)
    assert str(path) in msg and "--allow-pickle" in msg and "argparse.Namespace" in msg
    model, meta = build_model("DiT-T/2", path, 8, 10, allow_pickle=True)
    assert_same_weights(model, state)
    assert meta["config"] == {"model": "DiT-T/2"}


def test_safetensors_round_trip(tmp_path, tiny_registry, randomize):
    state = make_state(tiny_registry["DiT-T/2"], 4, randomize)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"config": json.dumps({"a": 1})})
    model, meta = build_model("DiT-T/2", path, input_size=8, num_classes=10)
    assert_same_weights(model, state)
    assert meta["kind"] == "safetensors" and meta["config"] == {"a": 1}


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, tiny_registry, randomize, prefix):
    state = make_state(tiny_registry["DiT-T/2"], 5, randomize)
    path = tmp_path / "ddp.pt"
    torch.save({"ema": {prefix + k: v for k, v in state.items()}}, path)
    model, _ = build_model("DiT-T/2", path, input_size=8, num_classes=10)
    assert_same_weights(model, state)


def test_half_precision_weights_load_as_float32(tmp_path, tiny_registry, randomize):
    state = make_state(tiny_registry["DiT-T/2"], 6, randomize)
    path = tmp_path / "fp16.pt"
    torch.save({k: v.half() for k, v in state.items()}, path)
    model, _ = build_model("DiT-T/2", path, input_size=8, num_classes=10)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(learn_sigma=False),
        dict(in_channels=3),
        dict(in_channels=1, learn_sigma=False),
        dict(class_dropout_prob=0.0),
    ],
)
def test_infer_config_and_variants(tmp_path, tiny_registry, randomize, kwargs):
    state = make_state(tiny_registry["DiT-T/2"], 7, randomize, input_size=12, **kwargs)
    cfg = infer_config(state)
    in_ch = kwargs.get("in_channels", 4)
    assert cfg["patch_size"] == 2 and cfg["in_channels"] == in_ch and cfg["input_size"] == 12
    assert cfg["hidden_size"] == 32 and cfg["depth"] == 2 and cfg["mlp_ratio"] == 4.0
    assert cfg["learn_sigma"] == kwargs.get("learn_sigma", True)
    with_null = kwargs.get("class_dropout_prob", 0.1) > 0
    assert cfg["label_rows"] == 10 + with_null
    path = tmp_path / "variant.pt"
    torch.save(state, path)
    model, meta = build_model("DiT-T/2", path, input_size=12, num_classes=10, in_channels=in_ch)
    assert_same_weights(model, state)
    assert meta["null_label"] == with_null
    x = torch.randn(2, in_ch, 12, 12)
    assert model(x, torch.tensor([1, 2]), torch.tensor([0, 9])).shape == (2, model.out_channels, 12, 12)


def test_fresh_model_without_checkpoint(tiny_registry):
    model, meta = build_model("DiT-T/4", None, input_size=16, num_classes=5, in_channels=3)
    assert meta["kind"] == "init" and model.in_channels == 3 and model.num_classes == 5 and not model.training


# ------------------------------------------------------------------------------------- errors


def test_wrong_num_classes(tmp_path, tiny_registry, randomize):
    path = tmp_path / "x.pt"
    torch.save(make_state(tiny_registry["DiT-T/2"], 1, randomize), path)
    msg = one_line_error(build_model, "DiT-T/2", path, input_size=8, num_classes=1000)
    assert msg == f"checkpoint {path} has 11 label rows (num_classes=10) but --num-classes is 1000"


def test_wrong_patch_size(tmp_path, tiny_registry, randomize):
    path = tmp_path / "p4.pt"
    torch.save(make_state(tiny_registry["DiT-T/4"], 1, randomize), path)
    msg = one_line_error(build_model, "DiT-T/2", path, input_size=8, num_classes=10)
    assert str(path) in msg and "patch size 4" in msg and "DiT-T/2" in msg


def test_wrong_in_channels(tmp_path, tiny_registry, randomize):
    path = tmp_path / "rgb.pt"
    torch.save(make_state(tiny_registry["DiT-T/2"], 1, randomize, in_channels=3), path)
    msg = one_line_error(build_model, "DiT-T/2", path, input_size=8, num_classes=10, in_channels=4)
    assert str(path) in msg and "3 input channels" in msg and "4" in msg


def test_wrong_input_size(tmp_path, tiny_registry, randomize):
    path = tmp_path / "s8.pt"
    torch.save(make_state(tiny_registry["DiT-T/2"], 1, randomize), path)
    msg = one_line_error(build_model, "DiT-T/2", path, input_size=16, num_classes=10)
    assert str(path) in msg and "16 position tokens" in msg and "16" in msg


def test_other_architecture_names_both(tmp_path, tiny_registry, randomize):
    path = tmp_path / "u.pt"
    torch.save(make_state(tiny_registry["DiT-U/2"], 1, randomize), path)
    msg = one_line_error(build_model, "DiT-T/2", path, input_size=8, num_classes=10)
    assert str(path) in msg
    assert "DiT-U/2 (depth 3, width 48)" in msg and "DiT-T/2 has depth 2, width 32" in msg
    msg = one_line_error(build_model, "DiT-XL/2", path, input_size=8, num_classes=10)
    assert "depth 28, width 1152" in msg


def test_missing_block_is_reported(tmp_path, tiny_registry, randomize):
    state = make_state(tiny_registry["DiT-T/2"], 1, randomize)
    del state["blocks.1.mlp.fc1.weight"]
    path = tmp_path / "holes.pt"
    torch.save(state, path)
    msg = one_line_error(build_model, "DiT-T/2", path, input_size=8, num_classes=10)
    assert "1 missing keys" in msg and "blocks.1.mlp.fc1.weight" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    assert one_line_error(load_checkpoint, path) == f"checkpoint {path} does not exist"


def test_truncated_file(tmp_path, tiny_registry, randomize):
    good = tmp_path / "good.pt"
    torch.save(make_state(tiny_registry["DiT-T/2"], 1, randomize), good)
    path = tmp_path / "trunc.pt"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = one_line_error(load_checkpoint, path)
    assert msg == f"checkpoint {path} is truncated (zip archive without its end); {ck.REPLACE_HINT}"


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"hello world\n"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    msg = one_line_error(load_checkpoint, path)
    assert str(path) in msg and "not a PyTorch checkpoint" in msg


def train_checkpoint(path: Path, ema: dict, model: dict | None = None) -> Path:
    """A train.py-style checkpoint: {model, ema, opt, config, step}."""
    opt = {"state": {}, "param_groups": []}
    torch.save({"model": model or ema, "ema": ema, "opt": opt, "config": {}, "step": 1}, path)
    return path


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_resume_checkpoint_names_the_flag(tmp_path, tiny_registry, randomize, fraction):
    """torch.load says `[Errno 22] Invalid argument` (short cuts) or `PytorchStreamReader ...`."""
    good = train_checkpoint(tmp_path / "good.pt", make_state(tiny_registry["DiT-T/2"], 1, randomize))
    path = tmp_path / "0001000.pt"
    data = good.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises((OSError, RuntimeError)):  # what the user saw before
        torch.load(path, weights_only=True)
    msg = one_line_error(ck.read_torch_file, path, what="--resume")
    assert msg == f"--resume {path} is truncated (zip archive without its end); {ck.REPLACE_HINT}"


@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize("content", [b"hello world\n", b"step 1000 loss 0.1\n", b'{"ema": 1}\n'])
def test_text_file_as_checkpoint_names_the_flag(tmp_path, content, allow_pickle):
    """A text file made torch.load say `101` / `KeyError: 101` / `pop from empty list`."""
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(Exception):  # noqa: B017 - torch's own error, whatever its type, is what the user saw
        torch.load(path, weights_only=not allow_pickle)
    msg = one_line_error(ck.read_torch_file, path, allow_pickle=allow_pickle, what="--resume")
    assert msg == (
        f"--resume {path} is not a PyTorch checkpoint (not a zip archive; truncated or another file type); "
        "pass a file written by torch.save or a .safetensors file"
    )


def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.pt"
    torch.save({"a": torch.zeros(1)}, path)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        msg = one_line_error(ck.read_torch_file, path, what="--resume")
        assert msg == f"--resume {path} is not readable (permission denied); fix its permissions"
    finally:
        path.chmod(0o600)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(os.urandom(256))
    assert str(path) in one_line_error(load_checkpoint, path)


@pytest.mark.parametrize(
    "obj", [{"weight": torch.zeros(3)}, [torch.zeros(1)], {"ema": {"conv.weight": torch.zeros(1)}}]
)
def test_non_dit_contents(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    msg = one_line_error(load_checkpoint, path)
    assert str(path) in msg and ("not a DiT state dict" in msg or "not a state dict" in msg)


def test_input_size_mismatch_names_the_vae_path_and_its_factor(tmp_path, tiny_registry, randomize, tiny_vae4_dir):
    """A --vae-path VAE with another factor used to blame --image-size only."""
    from models.vae import load_codec

    path = tmp_path / "latent8.pt"  # an 8x8-latent model: 64 px through a factor-8 VAE
    torch.save(make_state(tiny_registry["DiT-T/2"], 1, randomize), path)
    codec = load_codec("ema", vae_path=tiny_vae4_dir)  # factor 4: 64 px -> 16x16 latents
    msg = one_line_error(build_model, "DiT-T/2", path, codec.latent_size(64), 10, codec=codec)
    assert msg == (
        f"checkpoint {path} takes 8x8 latents, but --image-size 64 through --vae-path {tiny_vae4_dir} "
        "(downsampling factor 4) gives 16x16; use a VAE with factor 8 or --image-size 32"
    )
    msg = one_line_error(build_model, "DiT-T/2", path, codec.latent_size(48), 10, codec=codec)
    assert msg.endswith(f"through --vae-path {tiny_vae4_dir} (downsampling factor 4) gives 12x12; use --image-size 32")


def test_bad_model_name_and_size(tiny_registry):
    assert "DiT-XL/2" in one_line_error(build_model, "DiT-Q/2", None, 32, 10)
    assert "patch size 4" in one_line_error(build_model, "DiT-T/4", None, 10, 10)


# ---------------------------------------------------------------------------- memory-mapped loading


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.fixture
def load_calls(monkeypatch):
    """Every torch.load call made by models.checkpoints, with its keyword arguments."""
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ck.torch, "load", spy)
    return calls


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_zip_checkpoint_is_memory_mapped(tmp_path, tiny_registry, randomize, load_calls):
    """The weights of a torch.save zip archive stay in the file (page cache) instead of a private copy."""
    ema = make_state(tiny_registry["DiT-T/2"], 2, randomize)
    path = train_checkpoint(tmp_path / "0000100.pt", ema, model=make_state(tiny_registry["DiT-T/2"], 3, randomize))
    model, meta = build_model("DiT-T/2", path, input_size=8, num_classes=10)
    assert [c.get("mmap") for c in load_calls] == [True]
    assert meta["weights"] == "ema"
    assert_same_weights(model, ema)
    assert str(path) in _mapped_files()  # the float32 parameters are views of the mapped file
    del model
    import gc

    gc.collect()
    assert str(path) not in _mapped_files()


def test_legacy_format_loads_without_mmap(tmp_path, tiny_registry, randomize, load_calls):
    """torch.save(_use_new_zipfile_serialization=False) files cannot be mapped: read whole, as before."""
    ema = make_state(tiny_registry["DiT-T/2"], 4, randomize)
    path = tmp_path / "legacy.pt"
    torch.save({"ema": ema}, path, _use_new_zipfile_serialization=False)
    model, _ = build_model("DiT-T/2", path, input_size=8, num_classes=10)
    assert [c.get("mmap") for c in load_calls] == [False]
    assert_same_weights(model, ema)


# ------------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_ema_weights_end_with_one_line(tmp_path, tiny_registry, randomize, bad_value):
    """A diverged checkpoint used to sample black images and exit 0."""
    ema = make_state(tiny_registry["DiT-T/2"], 1, randomize)
    ema["blocks.1.attn.qkv.weight"][3, 5] = bad_value
    path = train_checkpoint(tmp_path / "diverged.pt", ema, model=make_state(tiny_registry["DiT-T/2"], 2, randomize))
    msg = one_line_error(build_model, "DiT-T/2", path, input_size=8, num_classes=10)
    assert msg == (
        f"checkpoint {path} has NaN or Inf in 1 of {len(ema)} tensors of its ema weights "
        "(first: blocks.1.attn.qkv.weight); the run that wrote it diverged: use an earlier checkpoint"
    )
    torch.save(ema, path)  # a raw state dict
    assert "of its raw weights" in one_line_error(load_checkpoint, path)


def test_only_the_used_weights_are_checked(tmp_path, tiny_registry, randomize):
    """NaN in the live `model` weights does not matter when the `ema` weights are used."""
    ema = make_state(tiny_registry["DiT-T/2"], 1, randomize)
    live = {k: torch.full_like(v, float("nan")) for k, v in ema.items()}
    path = train_checkpoint(tmp_path / "ok.pt", ema, model=live)
    model, meta = build_model("DiT-T/2", path, input_size=8, num_classes=10)
    assert meta["weights"] == "ema"
    assert_same_weights(model, ema)


def test_nonfinite_keys_vs_numpy():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(4, 4, generator=g) for i in range(6)}
    state["t1"][0, 0] = float("-inf")
    state["t4"] = state["t4"].half()
    state["t4"][2, 1] = float("nan")
    state["ints"] = torch.arange(3)
    expected = [k for k, v in state.items() if not np.isfinite(v.double().numpy()).all()]
    assert ck.nonfinite_keys(state) == expected == ["t1", "t4"]


# ------------------------------------------------------------------------------- official download


def test_cache_path_respects_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert ck.official_cache_path(256) == tmp_path / "hub" / "checkpoints" / "DiT-XL-2-256x256.pt"
    assert ck.official_cache_path(512, cache_dir=tmp_path / "c") == tmp_path / "c" / "DiT-XL-2-512x512.pt"
    msg = one_line_error(ck.official_cache_path, 128)
    assert "--image-size 128" in msg and "--ckpt" in msg


def test_offline_download_fails_fast(tmp_path, monkeypatch, no_proxy):
    monkeypatch.setattr(ck, "OFFICIAL_URL", REFUSED_URL)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    start = time.monotonic()
    msg = one_line_error(ck.official_checkpoint, 256)
    assert time.monotonic() - start < 10
    assert "--ckpt PATH" in msg and "python -m launch.prefetch" in msg
    assert not any((tmp_path / "hub" / "checkpoints").glob("*"))  # no partial file left


def test_cached_file_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "OFFICIAL_URL", REFUSED_URL)
    cached = ck.official_cache_path(512, cache_dir=tmp_path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"x")
    assert ck.official_checkpoint(512, cache_dir=tmp_path) == cached


def test_download_from_local_server(tmp_path, monkeypatch, no_proxy):
    served = tmp_path / "served"
    served.mkdir()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (served / "DiT-XL-2-256x256.pt").write_bytes(payload)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(ck, "OFFICIAL_URL", f"http://127.0.0.1:{server.server_address[1]}/")
        path = ck.official_checkpoint(256, cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
    assert path == tmp_path / "cache" / "DiT-XL-2-256x256.pt"
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # temp file renamed away


def test_official_constants():
    assert ck.OFFICIAL_URL == "https://dl.fbaipublicfiles.com/DiT/models/"
    assert ck.OFFICIAL_CHECKPOINTS == {256: "DiT-XL-2-256x256.pt", 512: "DiT-XL-2-512x512.pt"}
    assert isinstance(ck.official_cache_path(256), Path)


def test_custom_model_takes_its_architecture_from_the_checkpoint_config(tmp_path):
    from models.checkpoints import CUSTOM_MODEL
    from models.demo import save_checkpoint, untrained_dit

    net, config = untrained_dit(CUSTOM_MODEL, input_size=8, in_channels=3, num_classes=10, depth=2, hidden_size=32,
                                num_heads=2, patch_size=2)
    path = save_checkpoint(net, config, tmp_path / "custom.pt")
    model, _ = build_model(CUSTOM_MODEL, path, input_size=8, num_classes=10)
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (2, 32, 2, 2)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 10])
    assert torch.equal(model(x, t, y), net.eval()(x, t, y))

    torch.save({"ema": net.state_dict()}, tmp_path / "noconfig.pt")
    with pytest.raises(CheckpointError, match="has no architecture config .*pass --model NAME"):
        build_model(CUSTOM_MODEL, tmp_path / "noconfig.pt", input_size=8, num_classes=10)
    with pytest.raises(CheckpointError, match="pass --ckpt"):
        build_model(CUSTOM_MODEL, None, input_size=8, num_classes=10)
