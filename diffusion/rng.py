"""Per-sample random streams and class labels: every random number of sample i comes from its own generator.

seed_i = global_seed * 2**32 + i, so sample i gets the same class label, the same initial noise
and the same noise at every step whatever the world size, the per-process batch size, or how
often the job was resumed (as in EDM's generate.py, one generator per image).

The layout of sample i's stream: draw 1 is its class label (randint(num_classes), the official
sampler's label draw; consumed also when the labels are balanced), draw 2 is x_T, then each noisy
step's noise. `class_labels` draws the labels, once per run; `SampleNoise.for_samples` hands the
sampling loop the streams positioned after that first draw.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

import numpy as np
import torch

SEED_STRIDE = 2**32
SEED_RULE = "seed_i = global_seed * 2**32 + i"  # the manifest records the rule's text
MAX_GLOBAL_SEED = 2**32 - 1
PREFETCH_DEPTH = 4  # draws kept ready ahead of a sampling loop (each [B, C, H, W] float32)
QUEUE_POLL_S = 0.1  # how often a blocked producer checks whether the loop has ended
CPU, CUDA = "cpu", "cuda"
RANDOM_LABELS, BALANCED_LABELS = "random", "balanced"
LABEL_SAMPLING = (RANDOM_LABELS, BALANCED_LABELS)
LABEL_RULES = {  # the manifest records the rule's text
    RANDOM_LABELS: "label_i is the first draw, randint(num_classes), of sample i's own generator",
    BALANCED_LABELS: "labels = numpy.random.default_rng(global_seed).permutation(arange(N) % num_classes)",
}


def sample_seed(global_seed: int, index: int) -> int:
    """The seed of sample `index`: global_seed * 2**32 + index (unique for index < 2**32)."""
    if not 0 <= global_seed <= MAX_GLOBAL_SEED:
        raise ValueError(f"global seed must be in [0, {MAX_GLOBAL_SEED}], got {global_seed}")
    if not 0 <= index < SEED_STRIDE:
        raise ValueError(f"sample index must be in [0, 2**32), got {index}")
    return global_seed * SEED_STRIDE + index


def class_labels(num_samples: int, num_classes: int, global_seed: int, mode: str) -> np.ndarray:
    """The class label of every sample 0..N-1, int64 [N] (LABEL_RULES[mode]).

    random: label_i is the first draw of sample i's generator (its draw 1).
    balanced: a permutation (numpy default_rng(global_seed)) of `arange(N) % num_classes`, so each
    class appears floor(N/C) or ceil(N/C) times (exactly N/C when C divides N).
    """
    if mode == BALANCED_LABELS:
        return np.random.default_rng(global_seed).permutation(np.arange(num_samples, dtype=np.int64) % num_classes)
    if mode != RANDOM_LABELS:
        raise ValueError(f"label sampling must be one of {LABEL_SAMPLING}, got {mode!r}")
    labels = np.empty(num_samples, dtype=np.int64)
    generator = torch.Generator()
    for i in range(num_samples):
        generator.manual_seed(sample_seed(global_seed, i))
        labels[i] = int(torch.randint(num_classes, (1,), generator=generator))
    return labels


class SampleNoise:
    """One CPU torch.Generator per sample of a batch; a noise source of the samplers.

    Noise is drawn on the CPU in float32 and then moved, so it is the same on every device. Bound for a CUDA
    device it is drawn into pinned memory and copied with non_blocking=True (no host sync); inside a sampling
    loop, stream() draws on a background thread ahead of use.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    @classmethod
    def for_samples(cls, global_seed: int, indices: Sequence[int], num_classes: int) -> SampleNoise:
        """The streams of samples `indices`, positioned at their x_T: past draw 1, the label slot that
        `class_labels` read (stepped over, not used again, so the layout is the same under either rule)."""
        noise = cls([sample_seed(global_seed, i) for i in indices])
        for generator in noise.generators:
            torch.randint(num_classes, (1,), generator=generator)
        return noise

    def __len__(self) -> int:
        return len(self.generators)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample -> LongTensor [B]."""
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators])

    def draw(self, shape: Sequence[int], pin: bool = False) -> torch.Tensor:
        """Standard normal noise [B, *shape] float32 on the CPU (pinned if asked), sample b from generator b."""
        out = torch.empty((len(self.generators), *shape), dtype=torch.float32, pin_memory=pin)
        for row, g in zip(out, self.generators):
            torch.randn(tuple(shape), generator=g, out=row)
        return out

    def randn(self, shape: Sequence[int], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise [B, *shape] on `device`, sample b from generator b."""
        device = torch.device(device)
        return self.draw(shape, pin=device.type == CUDA).to(device=device, dtype=dtype, non_blocking=True)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        self._check_batch(like)
        return self.randn(like.shape[1:], like.device, like.dtype)

    def stream(self, like: torch.Tensor, count: int) -> NoiseDraws:
        """The next `count` draws shaped like `like` [B, ...], in order, drawn ahead of use (see NoiseDraws)."""
        self._check_batch(like)
        return NoiseDraws(self, like, count)

    def _check_batch(self, like: torch.Tensor) -> None:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} samples but {len(self.generators)} generators")


class NoiseDraws:
    """`count` draws of a SampleNoise shaped like `like`, produced ahead of use.

    For a CPU target each draw is made when asked (nothing to overlap; `background` overrides the choice).
    For another device (CUDA, meta) a background thread draws up to PREFETCH_DEPTH draws ahead (into pinned
    memory for CUDA) and __next__ issues a non-blocking copy: the loop never waits on a host-to-device copy.
    Only this object's thread touches the generators until close(), and it draws exactly `count`, so every
    stream stays in step.
    """

    def __init__(self, source: SampleNoise, like: torch.Tensor, count: int, background: bool | None = None) -> None:
        self.source, self.shape = source, tuple(like.shape[1:])
        self.device, self.dtype = like.device, like.dtype
        self.remaining = count
        self._thread: threading.Thread | None = None
        if background is None:
            background = self.device.type != CPU
        if background and count > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH_DEPTH)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._produce, args=(count,), name="noise-prefetch", daemon=True)
            self._thread.start()

    def _produce(self, count: int) -> None:
        pin = self.device.type == CUDA
        for _ in range(count):
            try:
                item: torch.Tensor | BaseException = self.source.draw(self.shape, pin)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=QUEUE_POLL_S)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, BaseException):
                return

    def __iter__(self) -> NoiseDraws:
        return self

    def __next__(self) -> torch.Tensor:
        if self.remaining == 0:
            raise StopIteration
        self.remaining -= 1
        if self._thread is None:
            return self.source.draw(self.shape).to(dtype=self.dtype)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item.to(device=self.device, dtype=self.dtype, non_blocking=True)

    def close(self) -> None:
        """Stop the background thread (if any) and wait for it; draws not taken are dropped."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
