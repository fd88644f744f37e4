"""No blocking host-to-device copy and no host sync inside a sampling step.

The loops run on the `meta` device with a model made of plain torch ops (it makes no copies of its own);
a TorchDispatchMode records every copy from the CPU to another device and every read of a device value
on the host (aten._local_scalar_dense: item(), bool(), int()). On a GPU a blocking copy or such a read
stalls the host until the device has caught up, so a step must make none. Per-sample noise is drawn on
the CPU (the generators live there) and must arrive with non-blocking copies only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion import create_diffusion, guided_model
from diffusion.flow import FlowSampler
from diffusion.rng import SampleNoise
from diffusion.samplers import STOCHASTIC, Sampler

aten = torch.ops.aten
META = torch.device("meta")
NUM_CLASSES, B, C, H = 10, 3, 4, 4
STEPS = 6


@dataclass
class Traffic:
    blocking: list[str] = field(default_factory=list)  # CPU -> device copies with non_blocking=False
    non_blocking: int = 0
    syncs: list[str] = field(default_factory=list)  # device values read on the host


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.traffic = Traffic()

    def _copy(self, func: object, source: torch.Tensor, target: torch.device, non_blocking: bool) -> None:
        if source.device.type == "cpu" and target.type != "cpu":
            if non_blocking:
                self.traffic.non_blocking += 1
            else:
                self.traffic.blocking.append(f"{func} {tuple(source.shape)}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.traffic.syncs.append(f"{func} {tuple(args[0].shape)}")
            return True  # a meta tensor has no value; let the caller go on so that every read is counted
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            self._copy(func, args[0], torch.device(kwargs["device"]), kwargs.get("non_blocking", False))
        elif func is aten.copy_.default:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            self._copy(func, args[1], args[0].device, non_blocking)
        return func(*args, **kwargs)


def _meta_model():
    """eps and learned-range values from x, t and y with meta-tensor ops only; [B', 2C, H, H]."""
    per_label = torch.ones(NUM_CLASSES + 1, device=META)
    scale = torch.ones(C, device=META).view(1, C, 1, 1)

    def model(x, t, y):
        mix = (t.float() / 1000).view(-1, 1, 1, 1) + per_label[y].view(-1, 1, 1, 1)
        eps = torch.tanh(x * scale + mix)
        return torch.cat([eps, -eps], dim=1)

    return model


SAMPLERS = {
    "ddpm": lambda d, fn, z, y, noise: d.p_sample_loop(fn, z.shape, noise=z, clip_denoised=False,
                                                       model_kwargs={"y": y}, device=META, noise_fn=noise),
    "ddim": lambda d, fn, z, y, noise: d.ddim_sample_loop(fn, z.shape, noise=z, clip_denoised=True,
                                                          model_kwargs={"y": y}, device=META, noise_fn=noise),
    "ddim-eta": lambda d, fn, z, y, noise: d.ddim_sample_loop(fn, z.shape, noise=z, model_kwargs={"y": y},
                                                              device=META, eta=1.0, noise_fn=noise),
}
RESPACING = {"ddpm": str(STEPS), "ddim": f"ddim{STEPS}", "ddim-eta": f"ddim{STEPS}"}
NOISY_STEPS = {"ddpm": STEPS - 1, "ddim": 0, "ddim-eta": STEPS - 1}  # the last step (t = 0) adds no noise


def _run(sampler: str, interval: tuple[float, float] | None) -> Traffic:
    d = create_diffusion(RESPACING[sampler])
    fn = guided_model(_meta_model(), 1.5, NUM_CLASSES, "first3", interval)
    y = torch.zeros(B, dtype=torch.long, device=META)
    z, noise = _start()
    with _Recorder():  # warm-up (tables are copied to a device once); recorded only so that reads do not fail
        SAMPLERS[sampler](d, fn, z, y, noise)
    z, noise = _start()
    with _Recorder() as recorder:
        SAMPLERS[sampler](d, fn, z, y, noise)
    return recorder.traffic


def _start() -> tuple[torch.Tensor, SampleNoise]:
    noise = SampleNoise(range(B))
    return noise.randn((C, H, H), META), noise


@pytest.mark.parametrize("interval", [None, (200.0, 700.0)])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_no_blocking_copy_or_host_sync_per_step(sampler, interval):
    traffic = _run(sampler, interval)
    print(f"\n{sampler} interval={interval}: {len(traffic.blocking) / STEPS:.1f} blocking copies and "
          f"{len(traffic.syncs) / STEPS:.1f} host syncs per step; {traffic.non_blocking} non-blocking copies")
    assert traffic.blocking == [], f"{len(traffic.blocking) / STEPS:.1f} blocking copies per step"
    assert traffic.syncs == [], f"{len(traffic.syncs) / STEPS:.1f} host syncs per step"
    assert traffic.non_blocking == NOISY_STEPS[sampler]  # one per fresh draw, nothing else crosses


def test_initial_noise_crosses_without_blocking():
    noise = SampleNoise(range(B))
    with _Recorder() as recorder:
        noise.randn((C, H, H), META)
    assert recorder.traffic.blocking == [] and recorder.traffic.non_blocking == 1


def _sampler_traffic(sampler, fn) -> Traffic:
    """The traffic of one call of a named sampler on fresh meta x_T, after a warm-up call (as in _run)."""
    y = torch.zeros(B, dtype=torch.long, device=META)
    z, noise = _start()
    with _Recorder():
        sampler(fn, z, noise=noise, model_kwargs={"y": y})
    z, noise = _start()
    with _Recorder() as recorder:
        sampler(fn, z, noise=noise, model_kwargs={"y": y})
    return recorder.traffic


# UniPC is left out: diffusers' UniPCMultistepScheduler.step builds its coefficients with torch.tensor(...,
# device=...) (about 5 small blocking copies per step), inside the library.
@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "euler", "heun"])
def test_named_samplers_make_no_blocking_copy_or_host_sync(name):
    sampler = Sampler(name, STEPS)
    fn = guided_model(_meta_model(), 1.5, NUM_CLASSES, "first3", (200.0, 700.0))
    traffic = _sampler_traffic(sampler, fn)
    assert traffic.blocking == [] and traffic.syncs == []
    draws = {"ddpm": STEPS - 1, "ddim": 0}.get(name, sampler.nfe if name in STOCHASTIC else 0)
    assert traffic.non_blocking == draws


def _meta_velocity_model():
    """A flow network's output (the velocity, C channels) from x, t and y with meta-tensor ops only."""
    per_label = torch.ones(NUM_CLASSES + 1, device=META)

    def model(x, t, y):
        return torch.tanh(x + t.float().view(-1, 1, 1, 1) + per_label[y].view(-1, 1, 1, 1))

    return model


# UniPC is left out as above (the same scheduler class); dopri5 is adaptive by design: torchdiffeq reads each
# step's error norm on the host to accept or shrink the step, one sync per attempted step.
@pytest.mark.parametrize("family", ["sit", "repa"])
@pytest.mark.parametrize("name", ["euler", "heun", "euler-maruyama", "dpm++2m"])
def test_flow_samplers_make_no_blocking_copy_or_host_sync(name, family):
    sampler = FlowSampler(name, STEPS, family=family)
    fn = guided_model(_meta_velocity_model(), 1.5, NUM_CLASSES, "all", (0.0, 0.7))
    traffic = _sampler_traffic(sampler, fn)
    assert traffic.blocking == [] and traffic.syncs == []
    # euler-maruyama: one fresh draw per stochastic step (all but the final mean step), nothing else crosses
    assert traffic.non_blocking == (STEPS - 1 if name == "euler-maruyama" else 0)
