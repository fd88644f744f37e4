"""SampleNoise's draws made ahead of use keep every generator's stream exactly as plain sequential draws."""

import threading

import pytest
import torch

from diffusion.rng import NoiseDraws, SampleNoise

SEEDS = [5, 6, 7]
SHAPE = (2, 3, 3)


def _sequential(seed: int, draws: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(draws)]


@pytest.mark.parametrize("background", [False, True])
def test_draws_follow_each_generator_in_order(background):
    noise = SampleNoise(SEEDS)
    x_T = noise.randn(SHAPE)
    stream = NoiseDraws(noise, x_T, 4, background=background)
    steps = list(stream)
    stream.close()
    after = noise.randn(SHAPE)  # exactly 1 + 4 draws were taken: the next one is the 6th of each stream
    for b, seed in enumerate(SEEDS):
        expected = _sequential(seed, 6)
        assert torch.equal(x_T[b], expected[0])
        assert all(torch.equal(step[b], expected[1 + i]) for i, step in enumerate(steps))
        assert torch.equal(after[b], expected[5])
    assert len(steps) == 4 and all(s.dtype == torch.float32 and s.shape == (3, *SHAPE) for s in steps)


def test_early_close_stops_the_thread_and_errors_reach_the_loop():
    noise = SampleNoise(SEEDS)
    stream = NoiseDraws(noise, torch.empty(3, *SHAPE), 100, background=True)
    next(stream)
    stream.close()  # the loop ended early (an error in a step): the producer must not hang or keep drawing
    assert not any(t.name == "noise-prefetch" for t in threading.enumerate())

    class Broken(SampleNoise):
        def draw(self, shape, pin=False):
            raise OSError("no memory to pin")

    broken = NoiseDraws(Broken(SEEDS), torch.empty(3, *SHAPE), 2, background=True)
    with pytest.raises(OSError, match="pin"):
        next(broken)
    broken.close()
