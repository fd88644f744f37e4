"""Per-sample random streams and class labels: every random number of sample i comes from its own generator.

seed_i = global_seed * 2**21 + i, so sample i gets the same class label, the same initial noise
and the same noise at every step whatever the world size, the per-process batch size, or how
often the job was resumed (as in EDM's generate.py, one generator per image). torch's CPU generator
(MT19937) keeps only the low 32 bits of a seed, so the rule fits in 32 bits: 2**21 indices for each of
2**11 global seeds, and no two (global seed, index) pairs share a stream. Global seed 0 gives seed_i = i,
as every earlier version of the rule did, so published seed-0 runs keep their images.

Other streams of the project (training micro-batches, latent encoding, data flips) need more than 32 bits
of key: `keyed_generator` seeds MT19937 from a key of several 32-bit words (the reference generator's
init_by_array, as numpy's RandomState does for an array seed), so those keys never collide either.

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

SEED_BITS = 32  # torch's CPU generator (MT19937) is seeded with the low 32 bits of a seed
INDEX_BITS = 21  # sample indices per global seed: 2**21 = 2,097,152 (more than ImageNet's 1.28 M)
SEED_STRIDE = 2**INDEX_BITS
MAX_SAMPLES_PER_SEED = SEED_STRIDE
MAX_GLOBAL_SEED = 2 ** (SEED_BITS - INDEX_BITS) - 1  # 2047
SEED_RULE = (f"seed_i = global_seed * 2**{INDEX_BITS} + i (global_seed in [0, {MAX_GLOBAL_SEED}], "
             f"i < 2**{INDEX_BITS}: a distinct 32-bit torch CPU generator seed per pair)")  # recorded in manifests
# The purposes of keyed streams: the first key word, so streams of two purposes never share a key.
STREAM_TRAIN_INIT, STREAM_TRAIN_MICRO_BATCH, STREAM_LATENT_CHUNK, STREAM_DATA_FLIP, STREAM_DATA_ORDER = 1, 2, 3, 4, 5
KEY_WORD = 2**32  # keyed_generator: each key word is a 32-bit unsigned integer
MT_STATE_WORDS = 624  # MT19937's state, as torch's CPU generator stores it (uint64 slots)
PHILOX_SEED_BOUND = 2**63 - 1  # a CUDA generator's seed is drawn in [0, this)
MT_STATE_OFFSET = 24  # bytes before the state words: initial seed (u64), left (i32), seeded (i32), next (u64)
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
    """The seed of sample `index`: global_seed * 2**21 + index, a distinct 32-bit seed for every pair in range."""
    if not 0 <= global_seed <= MAX_GLOBAL_SEED:
        raise ValueError(f"global seed must be in [0, {MAX_GLOBAL_SEED}], got {global_seed}")
    if not 0 <= index < SEED_STRIDE:
        raise ValueError(f"sample index must be in [0, 2**{INDEX_BITS}), got {index}")
    return global_seed * SEED_STRIDE + index


def key_words(*parts: int) -> list[int]:
    """Non-negative integers as 32-bit words, each part as two words (low, high): a fixed-length key."""
    words = []
    for part in parts:
        if not 0 <= part < KEY_WORD**2:
            raise ValueError(f"key part must be in [0, 2**64), got {part}")
        words += [part % KEY_WORD, part // KEY_WORD]
    return words


def stream_key(purpose: int, *parts: int) -> list[int]:
    """The key of one keyed stream: its purpose, then each part as two 32-bit words."""
    return [purpose, *key_words(*parts)]


def keyed_state(key: Sequence[int]) -> torch.Tensor:
    """torch's CPU generator state for MT19937 seeded by init_by_array(key) (32-bit words).

    The state words come from numpy's RandomState, which seeds from an array with the reference init_by_array;
    they are written into the layout torch's generator uses (checked against manual_seed in the tests)."""
    words = np.random.RandomState(np.asarray(key, dtype=np.uint32)).get_state()[1]
    state = torch.Generator().manual_seed(0).get_state().numpy().copy()
    state[MT_STATE_OFFSET: MT_STATE_OFFSET + MT_STATE_WORDS * 8] = words.astype("<u8").view(np.uint8)
    return torch.from_numpy(state)


def keyed_generator(key: Sequence[int], device: torch.device | str = CPU) -> torch.Generator:
    """A generator whose stream is set by the whole `key` (any number of 32-bit words), not by 32 bits of it.

    On the CPU: MT19937 from init_by_array(key). Elsewhere (CUDA's Philox takes a 64-bit seed): the seed is
    the first 63-bit draw of that CPU stream."""
    cpu = torch.Generator().set_state(keyed_state(key))
    if torch.device(device).type == CPU:
        return cpu
    seed = int(torch.randint(0, PHILOX_SEED_BOUND, (1,), generator=cpu))
    return torch.Generator(device=device).manual_seed(seed)


def seed_global_generators(key: Sequence[int]) -> None:
    """Seed torch's global generators (CPU, and every CUDA device) from `key` as `keyed_generator` does."""
    torch.default_generator.set_state(keyed_state(key))
    if torch.cuda.is_available():
        seed = int(torch.randint(0, PHILOX_SEED_BOUND, (1,), generator=keyed_generator(key)))
        torch.cuda.manual_seed_all(seed)


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
