"""Training data: image folders (class = subfolder), precomputed VAE latents, and the offline digits demo set.

Every dataset is indexed by a key ``(index, flip)`` so that the order of the data and every random
horizontal flip are decided by :class:`EpochPlan` from the seed, the epoch and the step alone; a resumed
run therefore sees exactly the batches an uninterrupted run would have seen.

Images are returned as float tensors [C, H, W] in [-1, 1] (the ADM/DiT convention), latents as the
scaled VAE latents [4, h, w].

The digits demo (``--dataset digits``): scikit-learn's 1,797 handwritten digits (8x8 pixels, 17 grey
levels 0..16, offline inside the package) become 32x32 RGB by
    x8 = value / 16 in [0, 1]  ->  bilinear upsampling x4 (torch ``interpolate``, align_corners=False)
    ->  uint8 round(255 * x32)  ->  the grey channel replicated to R, G, B.
Digits are white on black; classes "0".."9" map to indices 0..9.
"""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from diffusion.rng import STREAM_DATA_FLIP, STREAM_DATA_ORDER, STREAM_LATENT_CHUNK, keyed_generator, stream_key
from launch.runtime.command import run_command
from launch.runtime.errors import EXIT_OK, RankError, UserError
from launch.runtime.files import atomic_write
from launch.runtime.images import center_crop
from launch.runtime.partition import share_bounds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
DIGITS_SOURCE_SIZE = 8  # sklearn digits are 8x8
DIGITS_MAX_VALUE = 16.0  # grey levels 0..16
DIGITS_SIZE = 32  # demo image side
DIGITS_NUM_CLASSES = 10
UINT8_MAX = 255.0
RGB_CHANNELS = 3
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
CHANNEL_CHOICES = (1, 3)
LATENT_CHUNK = 32  # images per VAE encode call; each chunk has its own noise stream (latent_chunk_key)
LATENT_NOISE_RULE = "keyed_generator(stream_key(3, seed, chunk))"  # recorded in each latent shard's source
LATENT_SHARDS_KEY = "shards"  # a sharded cache index names its shard files under this key
LATENT_SHARD_SUFFIX = ".shards"  # shards of cache X live in X.shards/
LATENT_SHARD_DIGITS = 9  # X.shards/000000000-000000032.pt


class DataError(UserError):
    """The training data cannot be used (one-line message naming the path or flag)."""


class UnreadableImageError(DataError, RankError):
    """An image file of --data-path that does not decode, found by the rank (or DataLoader worker) reading it."""


class _KeepWriteError:
    """A binary file that remembers why a write failed: torch.save reports it as an unrelated RuntimeError."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.error = f, None

    def write(self, b: bytes) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through `atomic_write` (fsync, rename): a killed job never leaves a half file behind, and a
    full disk or a file-size limit is `FileWriteError` naming ``path`` (not torch's ``unexpected pos`` error)."""
    path = Path(path)
    with atomic_write(path, fsync=True) as f:
        out = _KeepWriteError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
    return path


def to_model_range(images_uint8: torch.Tensor, channels: int = RGB_CHANNELS) -> torch.Tensor:
    """uint8 RGB [..., H, W, 3] -> float [..., channels, H, W] in [-1, 1] (x / 127.5 - 1).

    channels=1 keeps the luma (exactly the grey value of grey images; the pixel codec decodes it to R=G=B).
    """
    x = images_uint8.float()
    if channels == 1:
        x = (x * torch.tensor(LUMA_WEIGHTS)).sum(-1, keepdim=True)
    elif channels != RGB_CHANNELS:
        raise DataError(f"--image-channels must be one of {CHANNEL_CHOICES}, got {channels}")
    return x.div(UINT8_MAX / 2).sub(1.0).movedim(-1, -3).contiguous()


# ------------------------------------------------------------------------------------------ digits demo


def digits_uint8(size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The sklearn digits as uint8 RGB [N, size, size, 3] and int64 labels [N] (transform: module doc)."""
    try:
        from sklearn.datasets import load_digits  # the optional [demo] extra
    except ImportError:
        raise DataError("--dataset digits needs scikit-learn (pip install -e '.[demo]')") from None
    digits = load_digits()
    x8 = torch.from_numpy(digits.images.astype(np.float32) / DIGITS_MAX_VALUE)  # [N, 8, 8] in [0, 1]
    x = F.interpolate(x8[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    grey = torch.round(x.clamp(0, 1) * UINT8_MAX).to(torch.uint8).numpy()  # [N, size, size]
    rgb = np.repeat(grey[..., None], RGB_CHANNELS, axis=-1)
    return np.ascontiguousarray(rgb), digits.target.astype(np.int64)


def digits_class_to_idx() -> dict[str, int]:
    return {str(i): i for i in range(DIGITS_NUM_CLASSES)}


def digits_features(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, S, S, 3] (S a multiple of 8) -> [N, 64] features: grey mean over each (S/8)^2 block."""
    n, s = images_uint8.shape[0], images_uint8.shape[1]
    block = s // DIGITS_SOURCE_SIZE
    grey = images_uint8.astype(np.float64).mean(axis=-1)  # [N, S, S]
    pooled = grey.reshape(n, DIGITS_SOURCE_SIZE, block, DIGITS_SOURCE_SIZE, block).mean(axis=(2, 4))
    return pooled.reshape(n, -1) / UINT8_MAX


def digits_classifier(size: int = DIGITS_SIZE) -> Any:
    """An RBF support-vector classifier (scikit-learn defaults) fitted on all real demo digits.

    Features: :func:`digits_features`; 5-fold cross-validated accuracy on the real digits is 96%.
    Judges whether generated digits show the class they were asked for.
    """
    try:
        from sklearn.svm import SVC  # the optional [demo] extra
    except ImportError:
        raise DataError("the digits classifier needs scikit-learn (pip install -e '.[demo]')") from None
    images, labels = digits_uint8(size)
    return SVC().fit(digits_features(images), labels)


def export_digits(out_dir: str | os.PathLike, size: int = DIGITS_SIZE) -> Path:
    """Write the demo digits as an image folder ``out_dir/<digit>/<index>.png`` (for reference batches)."""
    images, labels = digits_uint8(size)
    out = Path(out_dir)
    for i, (image, label) in enumerate(zip(images, labels)):
        with atomic_write(out / str(int(label)) / f"{i:05d}.png") as f:
            Image.fromarray(image).save(f, format="PNG")
    return out


# ------------------------------------------------------------------------------------------ datasets


class ArrayDataset(Dataset):
    """In-memory uint8 NHWC images with labels (the digits demo)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        class_to_idx: dict[str, int],
        channels: int = RGB_CHANNELS,
    ) -> None:
        self.channels = channels
        self.images = torch.from_numpy(np.asarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.class_to_idx = dict(class_to_idx)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key
        x = to_model_range(self.images[index], self.channels)  # [C, H, W]
        return (x.flip(-1) if flip else x), int(self.labels[index])


def find_classes(root: Path) -> dict[str, int]:
    """Sorted subfolder names -> 0..K-1 (the same rule as torchvision's ImageFolder)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"--data-path {root} has no class subfolders")
    return {name: i for i, name in enumerate(classes)}


def class_images(folder: Path) -> list[Path]:
    """The image files under one class folder, sorted; an empty file (0 bytes, a copy that never finished) is
    one DataError line naming it, found here while listing rather than by a DataLoader worker hours later."""
    files = []
    for p in folder.rglob("*"):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith("."):
            continue
        try:
            st = p.stat()
        except OSError:
            continue  # a dangling link: not an image file
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_size == 0:
            raise DataError(f"--data-path image {p} is empty (0 bytes); copy it again or move it out of the folder")
        files.append(p)
    return sorted(files)


class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>`` with ADM centre-crop preprocessing to ``image_size``."""

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = RGB_CHANNELS) -> None:
        self.channels = channels
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"--data-path {root} is not a folder")
        self.image_size = image_size
        self.class_to_idx = find_classes(self.root)
        self.samples: list[tuple[Path, int]] = []
        for name, idx in self.class_to_idx.items():
            files = class_images(self.root / name)
            if not files:
                raise DataError(
                    f"--data-path class folder {self.root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "add its images or move the folder out (class indices follow the sorted folder names)"
                )
            self.samples.extend((p, idx) for p in files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                arr = center_crop(im, self.image_size)  # uint8 [S, S, 3], ADM preprocessing
        except (OSError, SyntaxError, ValueError) as e:
            reason = str(e).replace(f" '{path}'", "").replace(str(path), "the file")
            raise UnreadableImageError(
                f"--data-path image {path} does not decode ({reason}); replace it or move it out of the folder"
            ) from None
        x = to_model_range(torch.from_numpy(np.array(arr)), self.channels)  # np.array: a writable copy
        return (x.flip(-1) if flip else x), label


class LatentDataset(Dataset):
    """Precomputed latents [N, 2, C, h, w] (original, mirrored) with labels [N], memory-mapped.

    Reads a sharded cache (an index file naming its shards, see :func:`write_latent_index`) or a single
    file holding ``latents`` and ``labels`` (the format written before caches were sharded).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        blob = _load_blob(path)
        if isinstance(blob, dict) and LATENT_SHARDS_KEY in blob:
            shards = [_load_shard(path, name) for name in blob[LATENT_SHARDS_KEY]]
        elif isinstance(blob, dict) and "latents" in blob and "labels" in blob:
            shards = [blob]
        else:
            raise DataError(f"latent file {path} is not a latent cache (needs latents, labels or {LATENT_SHARDS_KEY})")
        self.parts = [shard["latents"] for shard in shards]  # each [n_i, 2, C, h, w]
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])  # part i holds [starts[i], starts[i+1])
        self.labels = torch.cat([shard["labels"] for shard in shards])
        if len(self.labels) != self.starts[-1]:
            raise DataError(f"latent file {path} has {self.starts[-1]} latents but {len(self.labels)} labels")
        self.class_to_idx = dict(blob.get("class_to_idx") or {})
        self.meta = {k: v for k, v in blob.items() if k not in ("latents", "labels", LATENT_SHARDS_KEY)}

    @property
    def latents(self) -> torch.Tensor:
        """All latents [N, 2, C, h, w] (a copy when the cache has several shards)."""
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - self.starts[part], int(bool(flip))].float(), int(self.labels[index])


def _load_blob(path: str | os.PathLike) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise DataError(f"latent file {path} cannot be read ({str(e)[:100]}); delete it to re-encode") from None


def _load_shard(index: str | os.PathLike, name: str) -> dict[str, Any]:
    shard = Path(index).parent / name
    if not shard.is_file():
        raise DataError(f"latent file {index} names the shard {shard}, which is missing; delete {index} to re-encode")
    blob = _load_blob(shard)
    if not isinstance(blob, dict) or "latents" not in blob or "labels" not in blob:
        raise DataError(f"latent shard {shard} of {index} holds no latents; delete {index} to re-encode")
    return blob


def latent_chunk_key(seed: int, chunk: int) -> list[int]:
    """Key of the posterior noise of chunk ``chunk`` (items [chunk * LATENT_CHUNK, ...)): no world-size term."""
    return stream_key(STREAM_LATENT_CHUNK, seed, chunk)


def latent_shard_bounds(num_items: int, part: int, parts: int, chunk: int = LATENT_CHUNK) -> tuple[int, int]:
    """Items [start, stop) that process ``part`` of ``parts`` encodes: whole chunks, split as `share_bounds`."""
    first, last = share_bounds(-(-num_items // chunk), part, parts)
    return first * chunk, min(last * chunk, num_items)


def latent_shard_path(index: str | os.PathLike, start: int, stop: int) -> Path:
    """``<index>.shards/<start>-<stop>.pt`` beside the index file."""
    index, digits = Path(index), LATENT_SHARD_DIGITS
    return index.with_name(index.name + LATENT_SHARD_SUFFIX) / f"{start:0{digits}d}-{stop:0{digits}d}.pt"


def latent_shards(index: str | os.PathLike, num_items: int, parts: int, chunk: int = LATENT_CHUNK) -> list[Path]:
    """The shard files of a cache made by ``parts`` processes, in item order (a process without items has none)."""
    bounds = [latent_shard_bounds(num_items, part, parts, chunk) for part in range(parts)]
    return [latent_shard_path(index, start, stop) for start, stop in bounds if stop > start]


@torch.no_grad()
def encode_latent_shard(
    dataset: Dataset,
    codec: Any,
    index: str | os.PathLike,
    part: int = 0,
    parts: int = 1,
    seed: int = 0,
    chunk: int = LATENT_CHUNK,
    num_workers: int = 0,
) -> Path | None:
    """Encode process ``part``'s share of the images and their mirrors (one posterior sample each, as fast-DiT).

    The share is whole chunks (`latent_shard_bounds`); chunk k draws its noise from `latent_chunk_key`
    (seed, k), so the cache does not depend on how many processes made it. The shard holds ``latents``
    float16 [n, 2, C, h, w], ``labels`` [n], ``start`` and ``source`` (what it was made from); an existing
    shard with the same source is kept (an interrupted encoding resumes). None when the share is empty.
    After every part is encoded, one process writes the cache file with `write_latent_index`.
    """
    start, stop = latent_shard_bounds(len(dataset), part, parts, chunk)
    if stop <= start:
        return None
    out = latent_shard_path(index, start, stop)
    source = {
        "seed": seed,
        "noise_rule": LATENT_NOISE_RULE,
        "chunk": chunk,
        "num_items": len(dataset),
        "class_to_idx": _class_map(dataset),
    }
    if _shard_source(out) == source:
        return out
    keys = [[(i, False) for i in range(a, min(a + chunk, stop))] for a in range(start, stop, chunk)]
    loader = DataLoader(dataset, batch_sampler=keys, num_workers=num_workers)
    device = getattr(codec, "device", "cpu")
    latents, labels = [], []
    for k, (x, y) in enumerate(loader, start=start // chunk):  # x [B, 3, H, W], y [B]
        generator = keyed_generator(latent_chunk_key(seed, k), device)
        z = codec.encode(torch.cat([x, x.flip(-1)]), generator=generator).cpu()  # [2B, C, h, w]
        latents.append(torch.stack([z[: len(y)], z[len(y) :]], dim=1).half())
        labels.append(y.long())
    blob = {"latents": torch.cat(latents), "labels": torch.cat(labels), "start": start, "source": source}
    return save_torch(blob, out)


def _shard_source(shard: Path) -> dict[str, Any] | None:
    """What an existing shard was made from (None when missing or unreadable)."""
    if not shard.is_file():
        return None
    try:
        blob = _load_blob(shard)
    except DataError:
        return None
    return blob.get("source") if isinstance(blob, dict) else None


def write_latent_index(
    index: str | os.PathLike, shards: list[Path], class_to_idx: dict[str, int], extra: dict[str, Any] | None = None
) -> Path:
    """The cache file ``index``: its shards' names (relative to its folder, in item order), the class map and
    ``extra`` (e.g. image_size, vae). `LatentDataset` reads it."""
    index = Path(index)
    names = [str(Path(shard).relative_to(index.parent)) for shard in shards]
    blob = {LATENT_SHARDS_KEY: names, "class_to_idx": dict(class_to_idx), **(extra or {})}
    return save_torch(blob, index)


def _class_map(dataset: Dataset) -> dict[str, int]:
    return dict(getattr(dataset, "class_to_idx", {}))


# ------------------------------------------------------------------------------------------ data order


class EpochPlan:
    """Which (index, flip) keys each rank reads at every micro-batch, from (seed, epoch) alone.

    Shuffling: a permutation from the keyed stream (seed, epoch), cut to a multiple of the world size, every
    rank its stride (DistributedSampler's layout with drop_last; its seed + epoch rule made seed 1 epoch 0
    the same order as seed 0 epoch 1). An incomplete last batch of a rank is dropped, so all ranks take the
    same number of batches. Flips: one Bernoulli(0.5) per image and epoch from the keyed stream (seed, epoch).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        hflip: bool,
        shuffle: bool = True,
    ) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.hflip = hflip
        self.shuffle = shuffle
        self.per_rank = num_items // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{num_items} training items give no full batch of {batch_size} per process on "
                f"{world_size} processes; lower --global-batch-size"
            )

    def epoch_keys(self, epoch: int) -> list[tuple[int, bool]]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=keyed_generator(stream_key(STREAM_DATA_ORDER, self.seed,
                                                                                          epoch)))
        else:
            order = torch.arange(self.num_items)
        indices = order[: self.per_rank * self.world_size][self.rank :: self.world_size].tolist()
        if self.hflip:
            g = keyed_generator(stream_key(STREAM_DATA_FLIP, self.seed, epoch))
            flips = (torch.rand(self.num_items, generator=g) < 0.5).tolist()  # same on every rank
        else:
            flips = [False] * self.num_items
        return [(i, bool(flips[i])) for i in indices]

    def position(self, micro_batches_done: int) -> tuple[int, int]:
        """(epoch, batch index within it) of the next micro-batch."""
        return divmod(micro_batches_done, self.batches_per_epoch)

    def batches(self, micro_batches_done: int) -> Iterator[list[tuple[int, bool]]]:
        """Endless key batches starting after ``micro_batches_done`` micro-batches."""
        epoch, offset = self.position(micro_batches_done)
        while True:
            keys = self.epoch_keys(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield keys[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Write the offline digits demo set as an image folder (<digit>/<index>.png).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--export-digits", required=True, metavar="DIR", help="output folder")
    p.add_argument("--image-size", type=int, default=DIGITS_SIZE)
    a = p.parse_args(argv)

    def body() -> int:
        out = export_digits(a.export_digits, a.image_size)
        print(f"wrote {sum(1 for _ in out.rglob('*.png'))} images to {out}")
        return EXIT_OK

    return run_command(lambda: None, lambda _: body())


if __name__ == "__main__":
    raise SystemExit(_main())
