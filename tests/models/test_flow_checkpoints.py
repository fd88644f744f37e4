"""SiT and REPA checkpoints in their official layouts (tiny random weights under the official key names):
the family read from the file (or assumed from the model name), projectors dropped, legacy names renamed,
qk-norm recognised, argparse.Namespace args admitted, and every refusal one line."""

from __future__ import annotations

import argparse

import pytest
import torch

from models.checkpoints import CheckpointError, build_model, load_checkpoint
from models.sit import SIT_CONFIGS, REPASiT, SiT

TINY_SIT = {"SiT-T/2": dict(depth=2, hidden_size=32, patch_size=2, num_heads=4)}
GEOMETRY = dict(input_size=8, num_classes=10)


@pytest.fixture
def sit_registry(monkeypatch, tiny_registry):
    for name, cfg in TINY_SIT.items():
        monkeypatch.setitem(SIT_CONFIGS, name, cfg)
    return TINY_SIT


def sit_state(randomize, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    model = SiT(**GEOMETRY, **TINY_SIT["SiT-T/2"], **kwargs)
    return {k: v.clone() for k, v in randomize(model, seed).state_dict().items()}


def repa_state(randomize, seed: int, qk_norm: bool = True) -> dict[str, torch.Tensor]:
    model = REPASiT(**GEOMETRY, **TINY_SIT["SiT-T/2"], encoder_depth=1, z_dims=(6,), projector_dim=8, qk_norm=qk_norm)
    return {k: v.clone() for k, v in randomize(model, seed).state_dict().items()}


def sit_args(**overrides) -> argparse.Namespace:
    """SiT's train.py args (the fields that matter here)."""
    values = dict(model="SiT-T/2", image_size=64, num_classes=10, path_type="Linear", prediction="velocity",
                  loss_weight=None, global_seed=0)
    values.update(overrides)
    return argparse.Namespace(**values)


def repa_args(**overrides) -> argparse.Namespace:
    """REPA's train.py args (the fields that matter here)."""
    values = dict(model="SiT-T/2", num_classes=10, encoder_depth=1, qk_norm=True, fused_attn=True,
                  path_type="linear", prediction="v", enc_type="dinov2-vit-b", proj_coeff=0.5, cfg_prob=0.1)
    values.update(overrides)
    return argparse.Namespace(**values)


def without_projectors(state):
    return {k: v for k, v in state.items() if not k.startswith("projectors.")}


def assert_weights(model, state):
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


# ------------------------------------------------------------------------------------------------- SiT


def test_public_sit_release_is_a_raw_learned_sigma_state_dict(tmp_path, sit_registry, randomize):
    """SiT-XL-2-256x256.pt's layout: a raw state dict; the name decides the family, and says it assumed it."""
    state = sit_state(randomize, 1)
    path = tmp_path / "SiT-T-2-64.pt"
    torch.save(state, path)
    model, meta = build_model("SiT-T/2", path, **GEOMETRY)
    assert type(model) is SiT and model.learn_sigma and not model.qk_norm
    assert_weights(model, state)
    assert meta["family"] == "sit" and meta["family_assumed"]
    assert "raw state dict" in meta["family_evidence"] and "SiT-T/2" in meta["family_evidence"]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert model(x, torch.rand(2), torch.tensor([1, 10])).shape == (2, 4, 8, 8)  # the velocity half
    model, meta = build_model("DiT-T/2", path, **GEOMETRY)  # the same file read as a DiT: the name decides
    assert type(model) is not SiT and meta["family"] == "dit" and meta["family_assumed"]
    _, meta = load_checkpoint(path)  # no name at all: dit, assumed
    assert meta["family"] == "dit" and meta["family_assumed"]


def test_sit_train_checkpoint_samples_from_ema_with_namespace_args(tmp_path, sit_registry, randomize):
    live, ema = sit_state(randomize, 1), sit_state(randomize, 2)
    path = tmp_path / "0050000.pt"
    torch.save({"model": live, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": sit_args()}, path)
    model, meta = build_model("SiT-T/2", path, **GEOMETRY)  # no --allow-pickle needed for the Namespace
    assert_weights(model, ema)
    assert meta["weights"] == "ema" and meta["family"] == "sit" and not meta["family_assumed"]
    assert meta["family_evidence"] == "args.model SiT-T/2 -> sit"
    msg = one_line_error(build_model, "DiT-T/2", path, **GEOMETRY)
    assert str(path) in msg and "is a sit checkpoint" in msg and "--model SiT-T/2" in msg


@pytest.mark.parametrize("args, word", [(sit_args(path_type="GVP"), "GVP path"),
                                        (sit_args(prediction="noise"), "predict the noise"),
                                        (repa_args(path_type="cosine"), "cosine path")])
def test_other_interpolants_and_targets_are_refused(tmp_path, sit_registry, randomize, args, word):
    state = repa_state(randomize, 1) if "enc_type" in vars(args) else sit_state(randomize, 1)
    path = tmp_path / "other.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "args": args}, path)
    msg = one_line_error(build_model, "SiT-T/2", path, **GEOMETRY)
    assert str(path) in msg and word in msg


# ------------------------------------------------------------------------------------------------- REPA


def test_repa_train_checkpoint(tmp_path, sit_registry, randomize):
    """{model, ema, opt, args, steps}: ema, projectors dropped, qk-norm from the keys, no learned sigma."""
    live, ema = repa_state(randomize, 1), repa_state(randomize, 2)
    path = tmp_path / "0400000.pt"
    torch.save({"model": live, "ema": ema, "opt": {}, "args": repa_args(), "steps": 400000}, path)
    model, meta = build_model("SiT-T/2", path, **GEOMETRY)
    assert type(model) is SiT and model.qk_norm and not model.learn_sigma
    assert_weights(model, without_projectors(ema))
    assert meta["family"] == "repa" and meta["family_evidence"] == "keys projectors.* -> repa"
    assert meta["ignored_keys"].startswith("projectors.* (6 tensors")
    assert meta["inferred"]["qk_norm"] and meta["weights"] == "ema"
    msg = one_line_error(build_model, "DiT-T/2", path, **GEOMETRY)
    assert "is a repa checkpoint (keys projectors.* -> repa)" in msg and "--model SiT-T/2" in msg


def test_repa_released_raw_state_dict_and_no_qk_norm(tmp_path, sit_registry, randomize):
    state = repa_state(randomize, 3, qk_norm=False)
    path = tmp_path / "last.pt"
    torch.save(state, path)
    model, meta = build_model("SiT-T/2", path, **GEOMETRY)
    assert not model.qk_norm and meta["family"] == "repa" and not meta["family_assumed"]
    assert_weights(model, without_projectors(state))


def test_repa_legacy_decoder_block_names(tmp_path, sit_registry, randomize):
    """REPA's early files: blocks 0..encoder_depth-1, then decoder_blocks.i = blocks.(i + encoder_depth)."""
    state = repa_state(randomize, 4)
    legacy = {(k.replace("blocks.1.", "decoder_blocks.0.") if k.startswith("blocks.1.") else k): v
              for k, v in state.items()}
    assert any(k.startswith("decoder_blocks.0.") for k in legacy)
    path = tmp_path / "legacy.pt"
    torch.save({"model": legacy, "ema": legacy, "opt": {}, "args": repa_args(), "steps": 1}, path)
    model, meta = build_model("SiT-T/2", path, **GEOMETRY)
    assert_weights(model, without_projectors(state))
    assert "decoder_blocks.i -> blocks.(i + 1)" in meta["renamed_keys"] and meta["family"] == "repa"
    torch.save(without_projectors(legacy), path)  # raw, no args, no projectors: the legacy names alone tell
    model, meta = build_model("SiT-T/2", path, **GEOMETRY)
    assert_weights(model, without_projectors(state))
    assert meta["family_evidence"] == "keys decoder_blocks.* (REPA's legacy names) -> repa"
    assert "(i + 1)" in meta["renamed_keys"]  # encoder_depth from the blocks present


def test_repa_file_without_ema_is_one_line(tmp_path, sit_registry, randomize):
    state = repa_state(randomize, 5)
    path = tmp_path / "no_ema.pt"
    torch.save({"model": state, "opt": {}, "args": repa_args(), "steps": 10}, path)
    msg = one_line_error(load_checkpoint, path)
    assert str(path) in msg and "no 'ema'" in msg and "model, opt, args, steps" in msg


# ------------------------------------------------------------------------------------------------- this project


def test_this_projects_flow_checkpoint_is_sit(tmp_path, randomize):
    state = sit_state(randomize, 6, learn_sigma=False)
    config = {"model": "custom", **TINY_SIT["SiT-T/2"], "objective": "flow", "family": "sit"}
    path = tmp_path / "0001000.pt"
    torch.save({"ema": state, "config": config, "step": 1000}, path)
    model, meta = build_model("custom", path, **GEOMETRY)
    assert type(model) is SiT and meta["family"] == "sit" and "trained by this project" in meta["family_evidence"]
    assert_weights(model, state)
    config = {k: v for k, v in config.items() if k != "family"}  # the objective alone says it too
    torch.save({"ema": state, "config": config, "step": 1000}, path)
    assert build_model("custom", path, **GEOMETRY)[1]["family"] == "sit"
    config["objective"] = "diffusion"
    torch.save({"ema": state, "config": config, "step": 1000}, path)
    assert build_model("custom", path, **GEOMETRY)[1]["family"] == "dit"
    del config["objective"]  # written before flow training existed: DiT
    torch.save({"ema": state, "config": config, "step": 1000}, path)
    _, meta = build_model("custom", path, **GEOMETRY)
    assert meta["family"] == "dit" and not meta["family_assumed"] and "without objective" in meta["family_evidence"]
    config["family"] = "edm"
    torch.save({"ema": state, "config": config, "step": 1000}, path)
    assert "family 'edm'" in one_line_error(build_model, "custom", path, **GEOMETRY)


def test_fresh_sit_without_checkpoint(sit_registry):
    model, meta = build_model("SiT-T/2", None, **GEOMETRY)
    assert type(model) is SiT and meta["family"] == "sit" and meta["family_assumed"]
