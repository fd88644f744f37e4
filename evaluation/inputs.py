"""Everything about an evaluation's inputs that can be checked before any image goes through Inception.

Each batch is opened (headers only), its stored statistics read and checked (shape, NaN/Inf), and each
metric's needs met: FID/sFID/FD_DINOv2 need the statistics or the images of each side, the Inception Score the
sample images, precision/recall the images of both sides and more than k of each. A bad input fails here, in
seconds, with one line naming the file and what to do.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from evaluation.batches import DINOV2_PIL_KEYS, IMAGES_KEY, STATISTICS_KEYS, ImageBatch, open_batch
from evaluation.dinov2 import DEFAULT_RESIZE, RESIZE_PIL
from evaluation.errors import EvaluationError
from evaluation.features import DINOV2
from evaluation.inception import INPUT_SIZE
from evaluation.metrics import (
    ALL_METRICS,
    FRECHET_FEATURES,
    MANIFOLD_METRICS,
    METRIC_IS,
    PRINT_NAMES,
    normalise_metrics,
)
from evaluation.precision_recall import NEAREST_K
from evaluation.statistics import MIN_COV_IMAGES

Gaussian = tuple[np.ndarray, np.ndarray]  # (mu [D], sigma [D, D]) float64
BatchInput = str | os.PathLike | ImageBatch
REFERENCE, SAMPLE = "reference", "sample"


@dataclass(frozen=True)
class CheckedBatch:
    """An opened batch and the statistics stored in it that the requested Frechet distances will use."""

    batch: ImageBatch
    given: Mapping[str, Gaussian]  # "pool" / "spatial" / "dinov2" -> (mu, sigma); ADM: stored statistics win


@dataclass(frozen=True)
class EvaluationInputs:
    ref: CheckedBatch
    sample: CheckedBatch
    metrics: tuple[str, ...]  # short names, ADM's order
    bootstrap: int = 0  # resamples for the spread of FID/sFID/IS (0: none)


def open_checked(path: BatchInput, role: str) -> ImageBatch:
    """Open a batch (or take an opened one); a batch with images must hold enough for a covariance."""
    batch = path if isinstance(path, ImageBatch) else open_batch(path)
    if batch.has_images and batch.num_images < MIN_COV_IMAGES:
        raise EvaluationError(f"{role} batch {batch.path} holds {batch.num_images} image(s); the metrics need at "
                              f"least {MIN_COV_IMAGES}")
    return batch


def statistics_keys(kind: str, dinov2_resize: str = DEFAULT_RESIZE) -> tuple[str, str]:
    """The (mu, sigma) array names of `kind` in a batch file; DINOv2's depend on the resize mode."""
    return DINOV2_PIL_KEYS if kind == DINOV2 and dinov2_resize == RESIZE_PIL else STATISTICS_KEYS[kind]


def given_statistics(batch: ImageBatch, kind: str, dim: int | None,
                     dinov2_resize: str = DEFAULT_RESIZE) -> Gaussian | None:
    """The (mu, sigma) of `kind` stored in `batch`, checked (`dim` None: any width); None when the file has none."""
    mu_key, sigma_key = statistics_keys(kind, dinov2_resize)
    if not (batch.has(mu_key) and batch.has(sigma_key)):
        return None
    mu, sigma = batch.array(mu_key).astype(np.float64), batch.array(sigma_key).astype(np.float64)
    if dim is None and mu.ndim == 1:
        dim = mu.shape[0]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise EvaluationError(f"{batch.path}: {mu_key}/{sigma_key} have shapes {mu.shape}/{sigma.shape}, "
                              f"expected ({dim},)/({dim}, {dim})")
    for key, value in ((mu_key, mu), (sigma_key, sigma)):
        if not np.all(np.isfinite(value)):
            raise EvaluationError(f"{batch.path}: {key} contains NaN or Inf; recompute the statistics "
                                  "(python -m evaluation.reference) or remove them to use arr_0")
    return mu, sigma


def _image_needs(role: str, metrics: tuple[str, ...], given: Mapping[str, Gaussian]) -> list[str]:
    """The requested metrics that need this side's images."""
    needs = [m for m, kind in FRECHET_FEATURES.items() if m in metrics and kind not in given]
    needs += [m for m in metrics if m in MANIFOLD_METRICS or (m == METRIC_IS and role == SAMPLE)]
    return [m for m in ALL_METRICS if m in needs]


def check_batch(path: BatchInput, role: str, metrics: Iterable[str], dims: Mapping[str, int | None],
                dinov2_resize: str = DEFAULT_RESIZE) -> CheckedBatch:
    """Open `path` as the reference or sample side of an evaluation of `metrics` and check it serves them.
    `dinov2_resize` picks which stored DINOv2 statistics apply (`mu_dinov2` or `mu_dinov2_pil`)."""
    metrics = normalise_metrics(metrics)
    batch = open_checked(path, role)
    given = {kind: stats for m, kind in FRECHET_FEATURES.items()
             if m in metrics and kind in dims
             and (stats := given_statistics(batch, kind, dims[kind], dinov2_resize)) is not None}
    needs = _image_needs(role, metrics, given)
    if needs and not batch.has_images:
        names = ", ".join(PRINT_NAMES[m] for m in needs)
        usable = ",".join(m for m in FRECHET_FEATURES if FRECHET_FEATURES[m] in given) or "nothing"
        stored = [statistics_keys(FRECHET_FEATURES[m], dinov2_resize) for m in needs if m in FRECHET_FEATURES]
        hint = f" (or their statistics {', '.join('/'.join(keys) for keys in stored)})" if stored else ""
        raise EvaluationError(f"{role} batch {batch.path} holds statistics only: the {role} images ({IMAGES_KEY}) "
                              f"are needed for {names}{hint}; with these statistics use --metrics {usable}, or "
                              f"pass a batch with {IMAGES_KEY}")
    if set(metrics) & MANIFOLD_METRICS and batch.num_images <= NEAREST_K:
        chosen = ",".join(m for m in metrics if m in MANIFOLD_METRICS)
        raise EvaluationError(f"precision/recall need more than {NEAREST_K} {role} images (k-nearest neighbours, "
                              f"k={NEAREST_K}); {batch.path} holds {batch.num_images}: drop {chosen} from "
                              "--metrics or add images")
    return CheckedBatch(batch, given)


def check_inputs(ref: BatchInput, sample: BatchInput, metrics: Iterable[str], dims: Mapping[str, int | None],
                 bootstrap: int = 0, dinov2_resize: str = DEFAULT_RESIZE) -> EvaluationInputs:
    """Both sides of an evaluation, checked against each other; warns about an unusual resolution pair."""
    metrics = normalise_metrics(metrics)
    if bootstrap < 0 or bootstrap == 1:
        raise EvaluationError(f"--bootstrap {bootstrap}: give 0 (none) or at least 2 resamples")
    ref_checked = check_batch(ref, REFERENCE, metrics, dims, dinov2_resize)
    sample_checked = check_batch(sample, SAMPLE, metrics, dims, dinov2_resize)
    if bootstrap and sample_checked.given:
        raise EvaluationError(f"--bootstrap resamples the sample images, but {sample_checked.batch.path} stores "
                              "statistics that replace them (as in ADM); drop --bootstrap or remove mu/sigma")
    r, s = ref_checked.batch, sample_checked.batch
    if r.has_images and s.has_images and (r.height, r.width) != (s.height, s.width):
        warnings.warn(f"reference is {r.width}x{r.height} but samples are {s.width}x{s.height}; both are resized to "
                      f"{INPUT_SIZE}x{INPUT_SIZE} by the network, but the comparison is unusual", stacklevel=2)
    return EvaluationInputs(ref_checked, sample_checked, metrics, bootstrap)
