"""The training objective as train.py assembles it from its flags, against closed forms (numpy float64).

A stub network records its input x_t and answers with a chosen output; from x_t and x_0 the test recovers
the noise eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar) and computes target, SNR and weight itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.training import TrainConfig, build_diffusion, diffusion_loss, label_drop_mask

T_STEPS = 1000
TIMESTEPS = [0, 3, 50, 200, 499, 800, 999]
COSINE_S = 0.008  # improved DDPM's offset
MAX_BETA = 0.999


def linear_alpha_bar(n: int = T_STEPS) -> np.ndarray:
    betas = np.linspace(1e-4 * 1000 / n, 0.02 * 1000 / n, n, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def cosine_alpha_bar(n: int = T_STEPS) -> np.ndarray:
    f = [math.cos((i / n + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2 for i in range(n + 1)]
    betas = np.array([min(1 - f[i + 1] / f[i], MAX_BETA) for i in range(n)])
    return np.cumprod(1.0 - betas)


class Stub(torch.nn.Module):
    """Records x_t; returns zeros, or what `answer(x_t)` gives."""

    def __init__(self, answer=None) -> None:
        super().__init__()
        self.answer = answer
        self.x_t = None

    def forward(self, x, t, y=None, force_drop_ids=None):
        self.x_t = x.detach().double()
        return torch.zeros_like(x) if self.answer is None else self.answer(x, t).to(x.dtype)


def run_loss(cfg: TrainConfig, model: Stub, seed: int = 0):
    torch.manual_seed(seed)
    x0 = torch.rand(len(TIMESTEPS), 3, 4, 4) * 2 - 1
    t = torch.tensor(TIMESTEPS)
    terms = diffusion_loss(
        build_diffusion(cfg), model, x0, t, {"y": torch.zeros(len(t), dtype=torch.long)}, cfg
    )
    return terms, x0.double().numpy(), t.numpy()


def recover(x_t: np.ndarray, x0: np.ndarray, abar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eps, v) from the definitions x_t = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0."""
    a = abar[:, None, None, None]
    eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)
    return eps, np.sqrt(a) * eps - np.sqrt(1 - a) * x0


def closed_form_weight(kind: str, snr: np.ndarray, prediction: str, gamma: float, k: float) -> np.ndarray:
    if kind == "min_snr":  # Hang et al. 2023
        return np.minimum(snr, gamma) / (snr if prediction == "epsilon" else snr + 1)
    if kind == "p2":  # Choi et al. 2022
        return 1.0 / (k + snr) ** gamma
    return np.ones_like(snr)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize(
    "kind,gamma,k",
    [("none", 0, 0), ("min_snr", 5.0, 0), ("min_snr", 1.0, 0), ("p2", 1.0, 1.0), ("p2", 0.5, 2.0)],
)
def test_weighted_loss_matches_closed_form(schedule, prediction, kind, gamma, k):
    cfg = TrainConfig(
        learn_sigma=False,
        prediction=prediction,
        noise_schedule=schedule,
        loss_weighting=kind,
        snr_gamma=gamma,
        p2_gamma=gamma,
        p2_k=k,
    )
    model = Stub()
    terms, x0, t = run_loss(cfg, model)
    abar = (linear_alpha_bar() if schedule == "linear" else cosine_alpha_bar())[t]
    eps, v = recover(model.x_t.numpy(), x0, abar)
    target = eps if prediction == "epsilon" else v
    mse = (target**2).mean(axis=(1, 2, 3))  # the stub predicts 0
    weight = closed_form_weight(kind, abar / (1 - abar), prediction, gamma, k)
    np.testing.assert_allclose(terms["mse"].double().numpy(), mse, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(terms["loss"].double().numpy(), weight * mse, rtol=2e-4, atol=1e-6)


def test_v_target_against_its_definition():
    """A network answering v = sqrt(abar) eps - sqrt(1 - abar) x_0 exactly has zero v-loss."""
    abar_all = linear_alpha_bar()
    holder = {}

    def exact_v(x_t, t):
        a = torch.from_numpy(abar_all[t.numpy()])[:, None, None, None]
        x0 = holder["x0"]
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    cfg = TrainConfig(learn_sigma=False, prediction="v")
    torch.manual_seed(0)
    holder["x0"] = (torch.rand(len(TIMESTEPS), 3, 4, 4) * 2 - 1).double()
    terms, _, _ = run_loss(cfg, Stub(exact_v), seed=0)
    assert terms["mse"].abs().max() < 1e-6
    # and an epsilon network's answer is wrong for the v objective
    terms_eps, x0, t = run_loss(cfg, Stub(lambda x_t, t: torch.zeros_like(x_t)), seed=0)
    assert terms_eps["mse"].min() > 1e-3


def test_hybrid_loss_adds_the_vlb_when_learning_sigma():
    cfg = TrainConfig(learn_sigma=True)
    model = Stub(lambda x_t, t: torch.zeros(x_t.shape[0], 6, *x_t.shape[2:]))
    terms, _, _ = run_loss(cfg, model)
    assert set(terms) >= {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_importance_weights_multiply_the_loss():
    cfg = TrainConfig(learn_sigma=False)
    torch.manual_seed(0)
    x0 = torch.randn(4, 3, 4, 4)
    t = torch.tensor([1, 10, 100, 900])
    w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    kwargs = {"y": torch.zeros(4, dtype=torch.long)}
    torch.manual_seed(1)
    plain = diffusion_loss(build_diffusion(cfg), Stub(), x0, t, kwargs, cfg)
    torch.manual_seed(1)
    weighted = diffusion_loss(build_diffusion(cfg), Stub(), x0, t, kwargs, cfg, importance=w)
    torch.testing.assert_close(weighted["loss"], plain["loss"] * w)
    torch.testing.assert_close(weighted["raw_loss"], plain["loss"])


@pytest.mark.parametrize("prob", [0.0, 0.1, 0.5])
def test_label_dropout_rate(prob):
    n = 200_000
    torch.manual_seed(0)
    mask = label_drop_mask(n, prob)
    assert set(mask.unique().tolist()) <= {0, 1}
    rate = mask.double().mean().item()
    assert abs(rate - prob) <= 4 * math.sqrt(prob * (1 - prob) / n) + 1e-12


def test_dropped_labels_become_the_null_label():
    """Through DiT: masked samples get exactly the null row (index num_classes), the others their own row."""
    from models.dit import DiT

    num_classes = 7
    net = DiT(
        input_size=4,
        patch_size=2,
        in_channels=3,
        hidden_size=16,
        depth=1,
        num_heads=2,
        num_classes=num_classes,
        class_dropout_prob=0.1,
    )
    y = torch.arange(num_classes)
    mask = (torch.arange(num_classes) % 2 == 0).long()
    emb = net.y_embedder(y, True, force_drop_ids=mask)
    table = net.y_embedder.embedding_table.weight
    expected = torch.where(mask[:, None] == 1, table[num_classes].expand(num_classes, -1), table[y])
    torch.testing.assert_close(emb, expected)


def test_label_lr_multiplier_groups():
    from models.dit import DiT
    from models.training import param_groups

    net = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    groups = param_groups(net, 20.0)
    table = net.y_embedder.embedding_table.weight
    assert [g["lr_mult"] for g in groups] == [1.0, 20.0] and groups[1]["params"] == [table]
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # every trainable tensor exactly once
    assert not any(p is net.pos_embed for g in groups for p in g["params"])  # the fixed embedding stays fixed


def test_learning_rate_warmup_and_step_decay():
    from models.training import learning_rate

    base = 1e-3
    got = [learning_rate(s, base, warmup_steps=4, decay_every=3, decay_factor=0.5) for s in range(12)]
    warm = [base * (s + 1) / 4 for s in range(4)]  # linear warm-up reaching base at step 3
    decay = [base * 0.5 ** ((s - 4) // 3) for s in range(4, 12)]  # halved every 3 steps after it
    np.testing.assert_allclose(got, warm + decay)
    assert decay == [base] * 3 + [base / 2] * 3 + [base / 4] * 2
    assert learning_rate(10**6, base) == base


def test_ema_update_and_warmup():
    from models.training import ema_decay_at, update_ema

    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    update_ema(ema, model, 0.9)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * model.state_dict()[k])
    assert ema_decay_at(0, 0.9999) == 0.9999
    assert ema_decay_at(0, 0.9999, warmup=True) == pytest.approx(1 / 10)
    assert ema_decay_at(10**6, 0.9999, warmup=True) == 0.9999
