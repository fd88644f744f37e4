"""The metrics by name: CLI choices, report keys, printed names, and what each needs.

`--metrics` takes the short names (`is,fid,sfid,prec,recall`, and `fd_dinov2,dinov2_prec,dinov2_recall`) or
the report's keys (`inception_score`, `precision`, `dinov2_precision`, ...); reports and printed lines always
follow ADM's order, then the DINOv2 metrics. The default is ADM's five (`METRICS`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from evaluation.errors import EvaluationError

METRIC_IS, METRIC_FID, METRIC_SFID, METRIC_PREC, METRIC_RECALL = "is", "fid", "sfid", "prec", "recall"
METRICS = (METRIC_IS, METRIC_FID, METRIC_SFID, METRIC_PREC, METRIC_RECALL)  # ADM's order; the default
# EDM2's FD_DINOv2 (DINOv2 ViT-L/14 CLS features), and precision/recall (k = 3) on the same features.
METRIC_FD_DINOV2, METRIC_DINOV2_PREC, METRIC_DINOV2_RECALL = "fd_dinov2", "dinov2_prec", "dinov2_recall"
DINOV2_METRICS = (METRIC_FD_DINOV2, METRIC_DINOV2_PREC, METRIC_DINOV2_RECALL)
ALL_METRICS = METRICS + DINOV2_METRICS  # the choices, in report order
PRINT_NAMES = {METRIC_IS: "Inception Score", METRIC_FID: "FID", METRIC_SFID: "sFID",
               METRIC_PREC: "Precision", METRIC_RECALL: "Recall", METRIC_FD_DINOV2: "FD_DINOv2",
               METRIC_DINOV2_PREC: "DINOv2 Precision", METRIC_DINOV2_RECALL: "DINOv2 Recall"}
JSON_KEYS = {METRIC_IS: "inception_score", METRIC_FID: "fid", METRIC_SFID: "sfid",
             METRIC_PREC: "precision", METRIC_RECALL: "recall", METRIC_FD_DINOV2: "fd_dinov2",
             METRIC_DINOV2_PREC: "dinov2_precision", METRIC_DINOV2_RECALL: "dinov2_recall"}
ALIASES = {**{m: m for m in ALL_METRICS}, **{key: m for m, key in JSON_KEYS.items()}}
# Precision/recall need per-image features of both sets: pool_3 (ADM's) or DINOv2's.
MANIFOLD_FEATURES = {METRIC_PREC: "pool", METRIC_RECALL: "pool", METRIC_DINOV2_PREC: "dinov2",
                     METRIC_DINOV2_RECALL: "dinov2"}
MANIFOLD_METRICS = frozenset(MANIFOLD_FEATURES)
# (precision, recall) metric pairs by the features they share.
MANIFOLD_PAIRS = {"pool": (METRIC_PREC, METRIC_RECALL), "dinov2": (METRIC_DINOV2_PREC, METRIC_DINOV2_RECALL)}
# Which statistics of a set each Frechet distance compares: pool_3 (mu, sigma), spatial (mu_s, sigma_s) or
# DINOv2's CLS features (mu_dinov2, sigma_dinov2).
FRECHET_FEATURES = {METRIC_FID: "pool", METRIC_SFID: "spatial", METRIC_FD_DINOV2: "dinov2"}
STD_SUFFIX = "_std"  # bootstrap spread: fid_std, sfid_std, inception_score_std


def normalise_metrics(names: Iterable[str], flag: str = "--metrics") -> tuple[str, ...]:
    """Short or report names -> short names in report order (ADM's, then DINOv2's); unknown names (or none)
    raise one line listing the choices."""
    names = [m.strip().lower() for m in names if m.strip()]
    unknown = [m for m in names if m not in ALIASES]
    if unknown or not names:
        raise EvaluationError(f"{flag} {','.join(names)!r}: unknown {', '.join(unknown) or 'empty list'}; choose "
                              f"from {','.join(ALL_METRICS)} (or the report's names: {','.join(JSON_KEYS.values())})")
    chosen = {ALIASES[m] for m in names}
    return tuple(m for m in ALL_METRICS if m in chosen)


def parse_metrics(text: str) -> list[str]:
    """`--metrics` text (comma-separated) -> short names in report order."""
    return list(normalise_metrics(text.split(",")))


def format_report(report: Mapping[str, Any], metrics: Iterable[str]) -> list[str]:
    """ADM's lines (`FID: 2.27...`), in ADM's order; a metric that could not be computed is left out."""
    return [f"{PRINT_NAMES[m]}: {report[JSON_KEYS[m]]}" for m in metrics if report.get(JSON_KEYS[m]) is not None]


def format_spread(report: Mapping[str, Any], metrics: Iterable[str]) -> list[str]:
    """`FID bootstrap std: 0.31...` lines for the metrics the report has a bootstrap spread of."""
    keys = [(PRINT_NAMES[m], JSON_KEYS[m] + STD_SUFFIX) for m in metrics]
    return [f"{name} bootstrap std: {report[key]}" for name, key in keys if report.get(key) is not None]
