"""The ADM metrics by name: CLI choices, report keys, printed names, and what each needs.

`--metrics` takes the short names (`is,fid,sfid,prec,recall`) or the report's keys (`inception_score`,
`precision`, ...); reports and printed lines always follow ADM's order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from evaluation.errors import EvaluationError

METRIC_IS, METRIC_FID, METRIC_SFID, METRIC_PREC, METRIC_RECALL = "is", "fid", "sfid", "prec", "recall"
METRICS = (METRIC_IS, METRIC_FID, METRIC_SFID, METRIC_PREC, METRIC_RECALL)  # ADM's order
PRINT_NAMES = {METRIC_IS: "Inception Score", METRIC_FID: "FID", METRIC_SFID: "sFID",
               METRIC_PREC: "Precision", METRIC_RECALL: "Recall"}
JSON_KEYS = {METRIC_IS: "inception_score", METRIC_FID: "fid", METRIC_SFID: "sfid",
             METRIC_PREC: "precision", METRIC_RECALL: "recall"}
ALIASES = {**{m: m for m in METRICS}, **{key: m for m, key in JSON_KEYS.items()}}
MANIFOLD_METRICS = frozenset({METRIC_PREC, METRIC_RECALL})  # need per-image pool_3 features of both sets
# Which statistics of a set each Frechet distance compares: pool_3 (mu, sigma) or spatial (mu_s, sigma_s).
FRECHET_FEATURES = {METRIC_FID: "pool", METRIC_SFID: "spatial"}
STD_SUFFIX = "_std"  # bootstrap spread: fid_std, sfid_std, inception_score_std


def normalise_metrics(names: Iterable[str], flag: str = "--metrics") -> tuple[str, ...]:
    """Short or report names -> short names in ADM's order; unknown names (or none) raise one line listing the
    choices."""
    names = [m.strip().lower() for m in names if m.strip()]
    unknown = [m for m in names if m not in ALIASES]
    if unknown or not names:
        raise EvaluationError(f"{flag} {','.join(names)!r}: unknown {', '.join(unknown) or 'empty list'}; choose "
                              f"from {','.join(METRICS)} (or the report's names: {','.join(JSON_KEYS.values())})")
    chosen = {ALIASES[m] for m in names}
    return tuple(m for m in METRICS if m in chosen)


def parse_metrics(text: str) -> list[str]:
    """`--metrics` text (comma-separated) -> short names in ADM's order."""
    return list(normalise_metrics(text.split(",")))


def format_report(report: Mapping[str, Any], metrics: Iterable[str]) -> list[str]:
    """ADM's lines (`FID: 2.27...`), in ADM's order; a metric that could not be computed is left out."""
    return [f"{PRINT_NAMES[m]}: {report[JSON_KEYS[m]]}" for m in metrics if report.get(JSON_KEYS[m]) is not None]


def format_spread(report: Mapping[str, Any], metrics: Iterable[str]) -> list[str]:
    """`FID bootstrap std: 0.31...` lines for the metrics the report has a bootstrap spread of."""
    keys = [(PRINT_NAMES[m], JSON_KEYS[m] + STD_SUFFIX) for m in metrics]
    return [f"{name} bootstrap std: {report[key]}" for name, key in keys if report.get(key) is not None]
