"""DiT: official key names/shapes, and forward against an independent functional implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.dit import DIT_CONFIGS, DiT, DiT_models, timestep_embedding, timestep_frequencies

# The 12 configurations of the DiT paper: (depth, hidden, heads) per size, patch 2/4/8.
PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
FREQ_DIM = 256


def official_shapes(depth, hidden, patch, in_ch=4, learn_sigma=True, num_classes=1000, tokens=256):
    """Key -> shape of an official DiT state dict (from the published key list)."""
    out_ch = 2 * in_ch if learn_sigma else in_ch
    shapes = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, FREQ_DIM),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "attn.qkv.weight": (3 * hidden, hidden),
                b + "attn.qkv.bias": (3 * hidden,),
                b + "attn.proj.weight": (hidden, hidden),
                b + "attn.proj.bias": (hidden,),
                b + "mlp.fc1.weight": (4 * hidden, hidden),
                b + "mlp.fc1.bias": (4 * hidden,),
                b + "mlp.fc2.weight": (hidden, 4 * hidden),
                b + "mlp.fc2.bias": (hidden,),
                b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
                b + "adaLN_modulation.1.bias": (6 * hidden,),
            }
        )
    return shapes


def test_registry_has_the_twelve_paper_configs():
    expected = {f"DiT-{s}/{p}" for s in PAPER_SIZES for p in (2, 4, 8)}
    assert set(DiT_models) == expected
    for name in expected:
        size, patch = name[4:].split("/")
        depth, hidden, heads = PAPER_SIZES[size]
        assert DIT_CONFIGS[name] == dict(depth=depth, hidden_size=hidden, patch_size=int(patch), num_heads=heads)


@pytest.mark.parametrize("name", sorted(f"DiT-{s}/{p}" for s in PAPER_SIZES for p in (2, 4, 8)))
def test_official_keys_and_shapes_on_meta(name):
    depth, hidden, _ = PAPER_SIZES[name[4:].split("/")[0]]
    patch = int(name.split("/")[1])
    with torch.device("meta"):
        model = DiT_models[name](input_size=32)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes(depth, hidden, patch, tokens=(32 // patch) ** 2)
    assert (model.in_channels, model.out_channels, model.num_classes, model.learn_sigma) == (4, 8, 1000, True)


def test_xl2_parameter_count_matches_paper():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(trainable / 1e6) == 675  # DiT paper: DiT-XL/2 has 675M parameters


def test_strict_load_of_official_key_dict():
    shapes = official_shapes(depth=2, hidden=32, patch=2, num_classes=10, tokens=16)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    model.load_state_dict(state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=1, learn_sigma=False, num_classes=3),
        dict(in_channels=3, learn_sigma=True, num_classes=1),
        dict(in_channels=4, learn_sigma=False, num_classes=7, class_dropout_prob=0.0),
    ],
)
def test_shapes_for_channels_classes_and_sigma(kwargs):
    model = DiT(input_size=12, patch_size=4, hidden_size=32, depth=1, num_heads=2, **kwargs).eval()
    b = 3
    x = torch.randn(b, kwargs["in_channels"], 12, 12)
    out = model(x, torch.tensor([0, 5, 999]), torch.zeros(b, dtype=torch.long))
    out_ch = kwargs["in_channels"] * (2 if kwargs["learn_sigma"] else 1)
    assert out.shape == (b, out_ch, 12, 12)
    rows = kwargs["num_classes"] + (1 if kwargs.get("class_dropout_prob", 0.1) > 0 else 0)
    assert model.y_embedder.embedding_table.weight.shape[0] == rows


@pytest.mark.parametrize("input_size,patch", [(10, 4), (2, 4), (33, 2)])
def test_input_size_not_divisible_raises_one_line(input_size, patch):
    with pytest.raises(ValueError) as err:
        DiT(input_size=input_size, patch_size=patch, hidden_size=32, depth=1, num_heads=4)
    assert "\n" not in str(err.value) and str(input_size) in str(err.value)


def test_official_initialisation():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=50)
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0
        w = block.attn.qkv.weight
        bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))  # xavier-uniform bound
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.final_layer.adaLN_modulation[1].weight) == 0
    table = model.y_embedder.embedding_table.weight
    assert 0.015 < table.std().item() < 0.025
    w = model.x_embedder.proj.weight  # xavier on the flattened [D, C*p*p] kernel
    assert w.abs().max() <= math.sqrt(6 / (w.shape[0] + w[0].numel()))
    # zero-initialised output: a fresh DiT predicts exactly zero
    out = model.eval()(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert torch.count_nonzero(out) == 0


def test_timestep_embedding_vs_numpy():
    t = np.array([0.0, 1.0, 7.5, 250.0, 999.0])
    half = FREQ_DIM // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)  # [cos | sin]
    got = timestep_embedding(torch.tensor(t), FREQ_DIM, timestep_frequencies(FREQ_DIM)).numpy()
    assert got.shape == (5, FREQ_DIM) and got.dtype == np.float32
    # float32 arguments (as the official code): error <= |t| * eps32 in the phase
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)
    np.testing.assert_allclose(got[:3], expected[:3], rtol=0, atol=2e-6)
    odd = timestep_embedding(torch.tensor([3.0]), 7, timestep_frequencies(7))
    assert odd.shape == (1, 7) and odd[0, -1] == 0


# --------------------------------------------------------------------------- functional reference


def _layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _silu(x):
    return x * torch.sigmoid(x)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _linear(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def reference_forward(sd, x, t, y, patch, heads, out_ch):
    """DiT forward written from the paper with plain tensor ops on a state dict (float64)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    b, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    hidden = sd["pos_embed"].shape[-1]
    # patchify: token (i, j) = pixels [c, i*p:(i+1)*p, j*p:(j+1)*p] flattened in (c, row, col) order
    patches = x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
    kernel = sd["x_embedder.proj.weight"].reshape(hidden, -1)
    tok = patches @ kernel.T + sd["x_embedder.proj.bias"] + sd["pos_embed"]
    # timestep features: float32 phases as in the official code, [cos | sin]
    half = FREQ_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    phase = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(phase), torch.sin(phase)], dim=1).double()
    temb = _linear(sd, "t_embedder.mlp.2", _silu(_linear(sd, "t_embedder.mlp.0", t_freq)))
    cond = temb + sd["y_embedder.embedding_table.weight"][y]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    head_dim = hidden // heads
    for i in range(depth):
        pre = f"blocks.{i}."
        mod = _linear(sd, pre + "adaLN_modulation.1", _silu(cond))
        # chunk order: shift/scale/gate for attention, then for the MLP; each [B, 1, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, None, k * hidden : (k + 1) * hidden] for k in range(6))
        a = _layer_norm(tok) * (1 + scale1) + shift1
        qkv = _linear(sd, pre + "attn.qkv", a)
        q, k, v = (qkv[..., j * hidden : (j + 1) * hidden].reshape(b, -1, heads, head_dim) for j in range(3))
        att_out = torch.empty_like(a).reshape(b, -1, heads, head_dim)
        for hd in range(heads):
            scores = q[:, :, hd] @ k[:, :, hd].transpose(1, 2) / math.sqrt(head_dim)
            att_out[:, :, hd] = torch.softmax(scores, dim=-1) @ v[:, :, hd]
        tok = tok + gate1 * _linear(sd, pre + "attn.proj", att_out.reshape(b, -1, hidden))
        m = _layer_norm(tok) * (1 + scale2) + shift2
        tok = tok + gate2 * _linear(sd, pre + "mlp.fc2", _gelu_tanh(_linear(sd, pre + "mlp.fc1", m)))
    mod = _linear(sd, "final_layer.adaLN_modulation.1", _silu(cond))
    shift, scale = mod[:, None, :hidden], mod[:, None, hidden:]
    tok = _linear(sd, "final_layer.linear", _layer_norm(tok) * (1 + scale) + shift)  # [B, T, p*p*out]
    out = torch.zeros(b, out_ch, h, w, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            vals = tok[:, i * gw + j].reshape(b, patch, patch, out_ch)  # (row, col, channel)
            out[:, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch] = vals.permute(0, 3, 1, 2)
    return out


@pytest.mark.parametrize("learn_sigma,in_ch,patch", [(True, 4, 2), (False, 3, 4)])
def test_forward_matches_functional_reference(randomize, learn_sigma, in_ch, patch):
    torch.manual_seed(0)
    model = DiT(
        input_size=16,
        patch_size=patch,
        in_channels=in_ch,
        hidden_size=48,
        depth=3,
        num_heads=4,
        num_classes=10,
        learn_sigma=learn_sigma,
    )
    model = randomize(model, seed=3).eval()
    x = torch.randn(4, in_ch, 16, 16)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([0, 3, 9, 10])  # 10 = null label
    with torch.no_grad():
        got = model(x, t, y)
    ref = reference_forward(model.state_dict(), x, t, y, patch, 4, model.out_channels)
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0.5  # the adaLN and output layers are really active
    diff = (got.double() - ref).abs().max().item()
    print(f"max |DiT - reference| = {diff:.3e} (output max {scale:.2f})")
    assert diff < 1e-5
    with torch.no_grad():  # float64 model: agreement down to rounding
        got64 = model.double()(x.double(), t, y)
    assert (got64 - ref).abs().max().item() < 1e-10


def test_label_dropout_training_and_forced(tiny_model):
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 20, 30])
    y = torch.tensor([1, 2, 3])
    null = torch.full_like(y, tiny_model.num_classes)
    with torch.no_grad():
        cond = tiny_model(x, t, y)
        uncond = tiny_model(x, t, null)
        forced = tiny_model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
        tiny_model.train()
        tiny_model.y_embedder.dropout_prob = 1.0  # every label dropped in training mode
        dropped = tiny_model(x, t, y)
    torch.testing.assert_close(forced[[0, 2]], uncond[[0, 2]])
    torch.testing.assert_close(forced[1], cond[1])
    torch.testing.assert_close(dropped, uncond)
    assert not torch.allclose(cond, uncond)


def test_building_blocks_are_timms_with_fused_attention(monkeypatch, randomize):
    """timm's PatchEmbed / Attention / Mlp (as the official code); attention fused even if timm's default is off."""
    import timm.layers
    import timm.layers.config

    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)  # what TIMM_FUSED_ATTN=0 sets
    model = randomize(DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4), seed=5).eval()
    block = model.blocks[0]
    assert isinstance(model.x_embedder, timm.layers.PatchEmbed)
    assert isinstance(block.attn, timm.layers.Attention) and isinstance(block.mlp, timm.layers.Mlp)
    assert block.attn.fused_attn
    tokens = torch.randn(2, 16, 32)
    q, k, v = block.attn.qkv(tokens).reshape(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    heads_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [B, heads, T, head_dim]
    expected = block.attn.proj(heads_out.transpose(1, 2).reshape(2, 16, 32))
    with torch.no_grad():
        assert torch.equal(block.attn(tokens), expected)


def test_wrong_input_size_names_both_sizes(tiny_model):
    with pytest.raises(AssertionError, match=r"\(16\).*\(8\)"):
        tiny_model(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.tensor([0]))


def test_pos_embed_gets_no_gradient(tiny_model):
    tiny_model.train()
    out = tiny_model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    out.square().mean().backward()
    assert tiny_model.pos_embed.grad is None
    assert tiny_model.blocks[0].adaLN_modulation[1].weight.grad is not None


# --------------------------------------------------------------------------- no host round trips


class _HostTraffic(TorchDispatchMode):
    """Records every host-to-device copy and every host sync (``.item()``-style) dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append(f"host sync: {func}")
        elif func is torch.ops.aten._to_copy.default:
            target = kwargs.get("device")
            if args[0].device.type == "cpu" and target is not None and torch.device(target).type != "cpu":
                self.events.append(f"host-to-device: {func} -> {target}")
        elif func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if src.device.type == "cpu" and dst.device.type != "cpu":
                self.events.append(f"host-to-device: {func} -> {dst.device}")
        return func(*args, **kwargs)


def _small_network(kind: str) -> DiT:
    """DiT, SiT (velocity = first half of a learned-sigma output) or REPA's SiT (qk-norm, projectors)."""
    from models.sit import REPASiT, SiT

    shape = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    if kind == "sit":
        return SiT(**shape)
    if kind == "repa":
        return REPASiT(encoder_depth=1, z_dims=(16,), projector_dim=32, qk_norm=True, **shape)
    return DiT(**shape)


@pytest.mark.parametrize("kind", ["dit", "sit", "repa"])
@pytest.mark.parametrize("training", [False, True])
def test_forward_makes_no_host_copy_and_no_host_sync(training, kind):
    """On a non-CPU device (meta stands in for a GPU) a forward never copies from the host nor reads a scalar back."""
    model = _small_network(kind).to("meta")
    model.train(training)
    x = torch.empty(3, 4, 8, 8, device="meta")
    t = torch.empty(3, device="meta")
    y = torch.empty(3, dtype=torch.long, device="meta")
    with _HostTraffic() as traffic:
        out = model(x, t, y)
        model(x, t, y, force_drop_ids=torch.ones(3, dtype=torch.long, device="meta"))
    out = out[0] if kind == "repa" else out  # REPA's SiT also returns the projected tokens
    assert out.shape == ((3, 8, 8, 8) if kind == "dit" else (3, 4, 8, 8)) and out.device.type == "meta"
    assert traffic.events == []


def test_timestep_frequencies_are_a_non_persistent_float32_buffer():
    """Not in the state dict (official keys unchanged); float32 through dtype casts; rebuilt after a meta load."""
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    assert not any("freq" in k for k in model.state_dict())
    expected = np.exp(-math.log(10000.0) * np.arange(FREQ_DIM // 2, dtype=np.float32) / (FREQ_DIM // 2))
    for cast in (torch.float64, torch.bfloat16, torch.float32):
        np.testing.assert_allclose(model.to(cast).t_embedder.frequencies().numpy(), expected, rtol=1e-6)
    state = model.state_dict()
    with torch.device("meta"):
        fresh = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    fresh.load_state_dict(state, strict=True, assign=True)
    fresh.t_embedder.reset_frequencies()
    assert torch.equal(fresh.t_embedder.frequencies(), model.t_embedder.frequencies())
