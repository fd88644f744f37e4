"""The training step on the host side: no host sync per step, the EMA update, the worker count.

Host syncs are caught without a GPU by running the step on the `meta` device: a meta tensor has no data, so
any read of a device value on the host (`.item()`, `float(t)`, `.cpu()`, `.tolist()`, `.numpy()`) raises
there, exactly where it would stall a GPU. A dispatch mode also counts `_local_scalar_dense` calls on
device tensors, the op behind every scalar read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from launch.runtime.dist import DistInfo

META = torch.device("meta")


class HostReads(TorchDispatchMode):
    """Records every scalar read or copy to the host of a tensor that lives on a device."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        on_device = any(a.device.type != "cpu" for a in tensors)
        to_host = kwargs.get("device") == torch.device("cpu") or (
            func is torch.ops.aten.copy_.default and args[0].device.type == "cpu"
        )
        if on_device and (func is torch.ops.aten._local_scalar_dense.default or to_host):
            self.reads.append(str(func))
        return func(*args, **kwargs)


def meta_trainer(cfg):
    import train

    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=META)
    train_data = train.prepare_data(cfg, info)
    state = train.build_state(cfg, train_data, META, None)
    return train.Trainer(cfg, info, train_data, state, Path(cfg.results_dir))


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(grad_accum=2, global_batch_size=8, max_grad_norm=1.0, ema_warmup=True, warmup_steps=2)],
)
def test_training_steps_make_no_host_sync(tiny_config, extra):
    cfg = tiny_config(max_steps=10, log_every=100, **extra)
    trainer = meta_trainer(cfg)
    with HostReads() as mode:
        for _ in range(3):
            trainer.train_step()  # raises on meta at the first host read of a device value
    assert mode.reads == []
    assert trainer.state.step == 3 and trainer.micro_batches == 3 * cfg.grad_accum
    assert trainer.loss_sum.device == META  # the loss stays on the device until a log step
    if cfg.max_grad_norm:
        assert trainer.grad_norm.device == META


def test_the_log_step_reads_the_loss_once(tiny_config, capsys):
    """On CPU: three steps without a scalar read, then the log line reads loss and grad norm (one each)."""
    cfg = tiny_config(max_steps=3, log_every=3, max_grad_norm=1.0)
    import train

    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    train_data = train.prepare_data(cfg, info)
    state = train.build_state(cfg, train_data, info.device, None)
    trainer = train.Trainer(cfg, info, train_data, state, Path(cfg.results_dir))
    trainer.results.mkdir(parents=True, exist_ok=True)
    sums = []
    for _ in range(3):
        trainer.train_step()
        sums.append(float(trainer.loss_sum))
    trainer.log()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("step       3 loss ")
    assert float(line.split()[3]) == pytest.approx(sums[-1] / 3, rel=1e-5)  # mean of the 3 micro-batch losses
    assert float(line.split()[line.split().index("grad") + 1]) == pytest.approx(float(trainer.grad_norm), abs=1e-3)
    assert float(trainer.loss_sum) == 0.0 and trainer.micro_batches == 0  # reset for the next period


def test_ema_update_equals_the_formula_on_random_tensors():
    from models.training import update_ema

    torch.manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 2), (1,)]
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s)) for s in shapes])
    model.append(torch.nn.Parameter(torch.randn(6), requires_grad=False))  # frozen ones are averaged too
    ema = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(p.shape)) for p in model])
    per_tensor = [e.detach().clone() for e in ema]
    before = [e.detach().double().numpy().copy() for e in ema]
    for decay in (0.9999, 0.9, 0.5):
        update_ema(ema, model, decay)
        for i, (e, p) in enumerate(zip(ema, model)):
            per_tensor[i].mul_(decay).add_(p.detach(), alpha=1.0 - decay)  # the update before _foreach_
            before[i] = decay * before[i] + (1 - decay) * p.detach().double().numpy()
            assert torch.equal(e.detach(), per_tensor[i])  # bit for bit the old update
            np.testing.assert_allclose(e.detach().double().numpy(), before[i], rtol=1e-6, atol=1e-7)


def test_optimizer_is_fused_only_on_cuda(tiny_config):
    from models.training import make_optimizer

    model = torch.nn.Module()
    model.y_embedder = torch.nn.Module()
    model.y_embedder.embedding_table = torch.nn.Embedding(3, 4)
    model.proj = torch.nn.Linear(4, 4)
    assert not make_optimizer(model, tiny_config(), torch.device("cpu")).defaults["fused"]
    # the device only decides the flag (fused AdamW also runs on CPU parameters, so this builds here)
    assert make_optimizer(model, tiny_config(), torch.device("cuda")).defaults["fused"] is True


def test_image_workers_come_from_the_cpus_of_the_job(tiny_config, monkeypatch):
    from models import training

    monkeypatch.setattr(training, "available_cpus", lambda: 32)  # e.g. 32 CPUs allocated on a 192-core node
    cfg = tiny_config(num_workers=None)
    assert training.image_workers(cfg, local_world_size=8) == 3  # 32 / 8 processes, one left to each
    assert training.image_workers(cfg, local_world_size=1) == training.AUTO_WORKERS_MAX
    monkeypatch.setattr(training, "available_cpus", lambda: 4)
    assert training.image_workers(cfg, local_world_size=8) == 0
    assert training.image_workers(tiny_config(num_workers=5), local_world_size=8) == 5  # the flag wins


def test_global_seeds_draw_different_weights_and_micro_batches_never_share_a_stream():
    """torch keeps 32 bits of a seed: global_seed * 2**32 + n made every --global-seed train alike."""
    from models.training import init_key, micro_batch_key, seed_everything

    def draw(key: list[int]) -> torch.Tensor:
        seed_everything(key)
        return torch.randn(8)

    assert not torch.equal(draw(init_key(0)), draw(init_key(1)))
    assert torch.equal(draw(init_key(3)), draw(init_key(3)))
    assert init_key(0) not in [micro_batch_key(0, m, 0, 1) for m in range(4)]  # its own purpose word
    # the key is (global seed, micro_index * world + rank): a cut run reuses its keys, and every pair differs
    assert micro_batch_key(0, 3, 1, 2) == micro_batch_key(0, 7, 0, 1)
    distinct = {tuple(micro_batch_key(g, m, 0, 1)) for g in range(3) for m in range(50)}
    assert len(distinct) == 150
    assert len({tuple(draw(k).tolist()) for k in map(list, distinct)}) == 150
