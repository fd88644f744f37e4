"""Classifier-free guidance wrapper, against the official DiT forward_with_cfg semantics."""

import pytest
import torch

from diffusion import DiffusionError, guided_model

NUM_CLASSES = 10
B, C, H = 3, 4, 2


class _FakeDiT:
    """Records every call; output depends on the label so cond and uncond halves differ."""

    def __init__(self, learn_sigma=True):
        self.calls = []
        self.learn_sigma = learn_sigma

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        per_label = (y.to(x.dtype) + 1).view(-1, 1, 1, 1)
        eps = x * per_label + torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
        out = [eps, -x / per_label] if self.learn_sigma else [eps]
        return torch.cat(out, dim=1)


def _official_forward_with_cfg(model, x, t, y, cfg_scale, guided_channels):
    """DiT's forward_with_cfg, on the doubled batch the official sampler builds (first half conditional)."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model(combined, t, y)
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, H, generator=gen)
    t = torch.tensor([999, 500, 3])
    y = torch.tensor([0, 7, 9])
    return x, t, y


@pytest.mark.parametrize("channels,guided", [("first3", 3), ("all", C)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_guidance_matches_official_cfg(channels, guided, learn_sigma):
    x, t, y = _inputs()
    model = _FakeDiT(learn_sigma)
    ours = guided_model(model, 4.0, NUM_CLASSES, channels=channels)(x, t, y)

    # the model saw the doubled batch once: [x; x], [t; t], [y; null] with null = num_classes
    ((x_in, t_in, y_in),) = model.calls
    assert torch.equal(x_in, torch.cat([x, x])) and torch.equal(t_in, torch.cat([t, t]))
    assert y_in.tolist() == y.tolist() + [NUM_CLASSES] * B

    official = _official_forward_with_cfg(
        _FakeDiT(learn_sigma), torch.cat([x, x]), torch.cat([t, t]), y_in, 4.0, guided
    )[:B]
    assert ours.shape == (B, 2 * C if learn_sigma else C, H, H)
    assert torch.allclose(ours, official, atol=1e-6)


def test_first3_leaves_the_fourth_channel_conditional():
    x, t, y = _inputs()
    model = _FakeDiT()
    first3 = guided_model(model, 4.0, NUM_CLASSES, channels="first3")(x, t, y)
    every = guided_model(model, 4.0, NUM_CLASSES, channels="all")(x, t, y)
    cond = model(x, t, y)
    assert torch.equal(first3[:, :3], every[:, :3])
    assert torch.equal(first3[:, 3], cond[:, 3]) and not torch.allclose(every[:, 3], cond[:, 3])
    assert torch.equal(first3[:, C:], cond[:, C:]) and torch.equal(every[:, C:], cond[:, C:])


def test_three_channel_models_agree_for_both_modes():
    x, t, y = _inputs()
    x = x[:, :3]
    a = guided_model(_FakeDiT(), 2.0, NUM_CLASSES, channels="first3")(x, t, y)
    b = guided_model(_FakeDiT(), 2.0, NUM_CLASSES, channels="all")(x, t, y)
    assert torch.equal(a, b)


def test_scale_one_returns_the_model_itself():
    model = _FakeDiT()
    assert guided_model(model, 1.0, NUM_CLASSES) is model
    assert guided_model(model, 1, NUM_CLASSES, interval=(0, 10)) is model


def test_interval_skips_doubling_outside():
    x, _, y = _inputs()
    model = _FakeDiT()
    fn = guided_model(model, 3.0, NUM_CLASSES, interval=(100, 800))
    outside = fn(x, torch.full((B,), 900), y)
    assert len(model.calls[-1][0]) == B  # plain conditional call, batch not doubled
    assert torch.equal(outside, model(x, torch.full((B,), 900), y))
    inside = fn(x, torch.full((B,), 800), y)  # bounds are inclusive
    assert len(model.calls[-1][0]) == 2 * B
    assert torch.equal(inside, guided_model(_FakeDiT(), 3.0, NUM_CLASSES)(x, torch.full((B,), 800), y))

    mixed_t = torch.tensor([50, 400, 999])
    mixed = fn(x, mixed_t, y)
    plain = model(x, mixed_t, y)
    full = guided_model(_FakeDiT(), 3.0, NUM_CLASSES)(x, mixed_t, y)
    assert torch.equal(mixed[[0, 2]], plain[[0, 2]]) and torch.allclose(mixed[1], full[1])


def test_bad_settings_are_one_line_errors():
    with pytest.raises(DiffusionError, match="channels"):
        guided_model(_FakeDiT(), 2.0, NUM_CLASSES, channels="last")
    with pytest.raises(DiffusionError, match="interval"):
        guided_model(_FakeDiT(), 2.0, NUM_CLASSES, interval=(500, 100))


def test_bf16_outputs_are_combined_in_float32():
    x, t, y = _inputs()
    model = _FakeDiT()

    def bf16_model(x, t, y):
        return model(x, t, y).to(torch.bfloat16)

    ours = guided_model(bf16_model, 4.0, NUM_CLASSES, channels="all")(x, t, y)
    out = bf16_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NUM_CLASSES)]))
    cond, uncond = out[:B].float(), out[B:].float()
    assert ours.dtype == torch.float32
    assert torch.equal(ours[:, :C], uncond[:, :C] + 4.0 * (cond[:, :C] - uncond[:, :C]))
    assert torch.equal(ours[:, C:], cond[:, C:])
    rounded = (uncond[:, :C].bfloat16() + 4.0 * (cond[:, :C].bfloat16() - uncond[:, :C].bfloat16())).float()
    assert not torch.equal(ours[:, :C], rounded)  # a bf16 combination would lose bits


def test_for_timestep_picks_the_step_function_on_the_host():
    x, t, y = _inputs()
    model = _FakeDiT()
    fn = guided_model(model, 3.0, NUM_CLASSES, interval=(100, 800))
    assert fn.for_timestep(900) is model and fn.for_timestep(50.5) is model
    inside = fn.for_timestep(800)
    assert torch.equal(inside(x, t, y), guided_model(_FakeDiT(), 3.0, NUM_CLASSES)(x, t, y))
