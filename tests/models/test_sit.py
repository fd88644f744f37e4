"""SiT and REPA's SiT: the published sizes and keys, the velocity half, qk-norm and the projectors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.dit import DiT
from models.sit import SIT_CONFIGS, REPASiT, SiT, SiT_models

PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4, num_classes=10)
QK_NORM_EPS = 1e-5  # torch LayerNorm's default, which REPA's timm used for qk-norm


def test_registry_has_the_twelve_sizes_of_the_paper():
    assert set(SiT_models) == {f"SiT-{s}/{p}" for s in PAPER_SIZES for p in (2, 4, 8)}
    for name, cfg in SIT_CONFIGS.items():
        depth, hidden, heads = PAPER_SIZES[name[4:].split("/")[0]]
        assert cfg == dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(name[-1]))
    with torch.device("meta"):
        model = SiT_models["SiT-XL/2"]()
    assert model.learn_sigma and model.out_channels == 8  # the public SiT-XL-2-256 file has learned sigma
    # SiT-XL/2: 675M parameters as DiT-XL/2 (the fixed pos_embed excluded)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == pytest.approx(675e6, rel=0.01)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_is_the_velocity_half_of_the_dit_output(randomize, learn_sigma):
    sit = randomize(SiT(**TINY, learn_sigma=learn_sigma), seed=1).eval()
    dit = DiT(**TINY, learn_sigma=learn_sigma).eval()
    dit.load_state_dict(sit.state_dict(), strict=True)  # the same keys and shapes
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.3, 1.0]), torch.tensor([1, 5, 10])
    with torch.no_grad():
        out, full = sit(x, t, y), dit(x, t, y)
    assert out.shape == (3, 4, 8, 8)
    assert torch.equal(out, full[:, :4])


def _ln(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + QK_NORM_EPS) * weight + bias


def test_qk_norm_normalises_queries_and_keys_per_head(randomize):
    """REPA's option: LayerNorm (affine, eps 1e-5) over each head's queries and keys before the softmax."""
    model = randomize(SiT(**TINY, learn_sigma=False, qk_norm=True), seed=2).eval()
    keys = set(model.state_dict())
    head_dim = TINY["hidden_size"] // TINY["num_heads"]
    for i in range(TINY["depth"]):
        for name in ("q_norm", "k_norm"):
            assert {f"blocks.{i}.attn.{name}.weight", f"blocks.{i}.attn.{name}.bias"} <= keys
            assert model.state_dict()[f"blocks.{i}.attn.{name}.weight"].shape == (head_dim,)
    attn, sd = model.blocks[0].attn, model.state_dict()
    tokens = torch.randn(2, 16, 32, dtype=torch.float64)
    w = {k: v.double() for k, v in sd.items() if k.startswith("blocks.0.attn.")}
    qkv = tokens @ w["blocks.0.attn.qkv.weight"].T + w["blocks.0.attn.qkv.bias"]
    q, k, v = (qkv[..., j * 32 : (j + 1) * 32].reshape(2, 16, 4, head_dim) for j in range(3))
    q = _ln(q, w["blocks.0.attn.q_norm.weight"], w["blocks.0.attn.q_norm.bias"])
    k = _ln(k, w["blocks.0.attn.k_norm.weight"], w["blocks.0.attn.k_norm.bias"])
    heads = [torch.softmax(q[:, :, h] @ k[:, :, h].transpose(1, 2) / math.sqrt(head_dim), -1) @ v[:, :, h]
             for h in range(4)]
    merged = torch.stack(heads, 2).reshape(2, 16, 32)
    expected = merged @ w["blocks.0.attn.proj.weight"].T + w["blocks.0.attn.proj.bias"]
    with torch.no_grad():
        got = attn.double()(tokens)
    assert (got - expected).abs().max().item() < 1e-10
    plain = SiT(**TINY, learn_sigma=False)
    assert not any("q_norm" in k for k in plain.state_dict())


def test_repa_projectors_read_the_tokens_after_encoder_depth_blocks(randomize):
    model = randomize(REPASiT(**TINY, encoder_depth=2, z_dims=(6, 5), projector_dim=12, qk_norm=True), seed=3)
    model = model.eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("projectors.")}
    assert shapes == {
        "projectors.0.0.weight": (12, 32), "projectors.0.0.bias": (12,), "projectors.0.2.weight": (12, 12),
        "projectors.0.2.bias": (12,), "projectors.0.4.weight": (6, 12), "projectors.0.4.bias": (6,),
        "projectors.1.0.weight": (12, 32), "projectors.1.0.bias": (12,), "projectors.1.2.weight": (12, 12),
        "projectors.1.2.bias": (12,), "projectors.1.4.weight": (5, 12), "projectors.1.4.bias": (5,),
    }
    assert not model.learn_sigma and model.out_channels == 4
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([3, 10])
    with torch.no_grad():
        out, zs = model(x, t, y)
        tokens, c = model.embed(x, t, y)
        for block in model.blocks[:2]:
            tokens = block(tokens, c)
        sd = model.state_dict()
        for j, z in enumerate(zs):
            h = F.silu(F.linear(tokens, sd[f"projectors.{j}.0.weight"], sd[f"projectors.{j}.0.bias"]))
            h = F.silu(F.linear(h, sd[f"projectors.{j}.2.weight"], sd[f"projectors.{j}.2.bias"]))
            expected = F.linear(h, sd[f"projectors.{j}.4.weight"], sd[f"projectors.{j}.4.bias"])
            assert z.shape == expected.shape and torch.allclose(z, expected, atol=1e-6)
    # the velocity is the plain SiT's on the same weights (the projectors do not touch it)
    sit = SiT(**TINY, learn_sigma=False, qk_norm=True).eval()
    sit.load_state_dict({k: v for k, v in sd.items() if not k.startswith("projectors.")}, strict=True)
    with torch.no_grad():
        assert torch.equal(sit(x, t, y), out)


def test_repa_encoder_depth_must_be_a_block():
    with pytest.raises(ValueError, match="encoder_depth 4"):
        REPASiT(**TINY, encoder_depth=4)
