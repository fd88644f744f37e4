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
    assert msg == f"checkpoint {path} is truncated (zip archive without its end)"


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"hello world\n"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    msg = one_line_error(load_checkpoint, path)
    assert str(path) in msg and "not a PyTorch checkpoint" in msg


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


def test_bad_model_name_and_size(tiny_registry):
    assert "DiT-XL/2" in one_line_error(build_model, "DiT-Q/2", None, 32, 10)
    assert "patch size 4" in one_line_error(build_model, "DiT-T/4", None, 10, 10)


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
