"""`python -m evaluation.compare A.metrics.json B.metrics.json [C ...]`: why two FIDs differ.

Reads metrics files (`evaluator --json` outputs, the sampler's `<run>.metrics.json`) and prints
- the metrics side by side, with their bootstrap spread (`fid_std`, ...) where the file has one;
- every protocol field that differs, most influential first (`evaluation.protocol.FIELD_ORDER`: the reference
  batch and the feature networks, then the sample count, then the sampling settings);
- a verdict per metric for each file against the first: `not comparable` when a field of its yardstick differs
  (reference, feature network, sample count, metric settings; named), else `within noise` when
  |difference| < 2 x spread (spread = sqrt(std_A^2 + std_B^2) of the spreads the files have), else
  `comparable` (the difference is real, and the differing sampling fields say where it may come from).
`--json` prints the same as one JSON object for scripts. A file without a protocol is one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evaluation.cli import HelpFormatter
from evaluation.errors import EvaluationError
from evaluation.metrics import ALL_METRICS, JSON_KEYS, PRINT_NAMES, STD_SUFFIX
from evaluation.protocol import affected_metrics, differing_fields, field_note, read_protocol
from launch.runtime.command import run_command

NOISE_SPREADS = 2.0  # |difference| below this many spreads is within noise
COMPARABLE, WITHIN_NOISE, NOT_COMPARABLE = "comparable", "within noise", "not comparable"
VERDICTS = (COMPARABLE, WITHIN_NOISE, NOT_COMPARABLE)
HASH_SHOWN = 12  # characters of a SHA-256 shown in the text table
FLOAT_DIGITS = 4
MIN_FILES = 2
SIGNIFICANT = 6  # digits of a float setting shown in the differences

EXAMPLES = """examples:
  python -m evaluation.compare samples/run-a.metrics.json samples/run-b.metrics.json
  python -m evaluation.compare base.json cfg1.25.json cfg1.5.json --json > comparison.json
"""


@dataclass
class MetricsFile:
    path: Path
    report: dict[str, Any]
    protocol: dict[str, Any]


@dataclass
class Verdict:
    """One metric of one file against the first file."""

    file: str
    metric: str  # report key (fid, fd_dinov2, ...)
    verdict: str  # one of VERDICTS
    difference: float  # this file's value minus the first file's
    spread: float | None  # sqrt of the summed squared bootstrap spreads (None: no file has one)
    fields: list[str] = field(default_factory=list)  # not comparable: the fields that break it; else: differing


def read_metrics_file(path: str | Path) -> MetricsFile:
    """A metrics JSON file and its protocol; one line naming the file otherwise."""
    path = Path(path)
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise EvaluationError(f"{path}: no such file") from None
    except OSError as exc:
        raise EvaluationError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise EvaluationError(f"{path} is not JSON ({exc}); pass a metrics file (evaluator --json, "
                              "<run>.metrics.json)") from None
    if not isinstance(report, dict):
        raise EvaluationError(f"{path} holds a JSON {type(report).__name__}, not a metrics object")
    return MetricsFile(path, report, read_protocol(report, str(path)))


def metric_value(report: Mapping[str, Any], key: str) -> float | None:
    value = report.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metric_keys(files: Sequence[MetricsFile]) -> list[str]:
    """The report keys with a number in some file, in report order."""
    keys = [JSON_KEYS[m] for m in ALL_METRICS]
    return [k for k in keys if any(metric_value(f.report, k) is not None for f in files)]


def combined_spread(*reports: Mapping[str, Any], key: str) -> float | None:
    """sqrt of the sum of the squared `<key>_std` the reports have; None when none has one."""
    spreads = [s for r in reports if (s := metric_value(r, key + STD_SUFFIX)) is not None]
    return math.sqrt(sum(s * s for s in spreads)) if spreads else None


def verdict(base: MetricsFile, other: MetricsFile, key: str) -> Verdict | None:
    """The verdict on metric `key` of `other` against `base` (None when one of them lacks it)."""
    a, b = metric_value(base.report, key), metric_value(other.report, key)
    if a is None or b is None:
        return None
    differing = [name for name, _ in differing_fields([base.protocol, other.protocol])]
    blocking = [name for name in differing if key in affected_metrics(name)]
    spread = combined_spread(base.report, other.report, key=key)
    if blocking:
        return Verdict(str(other.path), key, NOT_COMPARABLE, b - a, spread, blocking)
    if spread is not None and abs(b - a) < NOISE_SPREADS * spread:
        return Verdict(str(other.path), key, WITHIN_NOISE, b - a, spread, differing)
    return Verdict(str(other.path), key, COMPARABLE, b - a, spread, differing)


def compare(files: Sequence[MetricsFile]) -> dict[str, Any]:
    """The comparison as a JSON-able object: metrics, differing protocol fields, verdicts against files[0]."""
    keys = metric_keys(files)
    differences = differing_fields([f.protocol for f in files])
    return {
        "files": [str(f.path) for f in files],
        "metrics": [{"key": k, "name": _name(k), "values": [metric_value(f.report, k) for f in files],
                     "std": [metric_value(f.report, k + STD_SUFFIX) for f in files]} for k in keys],
        "protocols_same": not differences,
        "differences": [{"field": name, "values": values, "affects": sorted(affected_metrics(name)),
                         "note": field_note(name)} for name, values in differences],
        "verdicts": [asdict(v) for other in files[1:] for k in keys if (v := verdict(files[0], other, k))],
    }


def _name(key: str) -> str:
    metric = next((m for m, k in JSON_KEYS.items() if k == key), None)
    return PRINT_NAMES[metric] if metric else key


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.{SIGNIFICANT}g}"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:HASH_SHOWN]  # a SHA-256
    return "-" if value is None else str(value)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def format_comparison(result: Mapping[str, Any]) -> list[str]:
    """The text report of `compare`."""
    files = result["files"]
    letters = [chr(ord("A") + i) if i < 26 else str(i) for i in range(len(files))]
    lines = [f"{letter}: {name}" for letter, name in zip(letters, files)]
    rows = [["metric", *letters]]
    for m in result["metrics"]:
        rows.append([m["name"], *(("-" if v is None else f"{v:.{FLOAT_DIGITS}f}")
                                  + ("" if s is None else f" +- {s:.{FLOAT_DIGITS}f}")
                                  for v, s in zip(m["values"], m["std"]))])
    lines += [""] + _table(rows) + [""]
    if result["protocols_same"]:
        lines.append("protocol: the same in every file")
    else:
        lines.append("protocol differences, most influential first:")
        diff_rows = [[d["field"], *(_show(v) for v in d["values"]), d["note"]] for d in result["differences"]]
        lines += ["  " + line for line in _table(diff_rows)]
    if result["verdicts"]:
        lines += ["", f"verdicts against {letters[0]}:"]
    for v in result["verdicts"]:
        who = letters[files.index(v["file"])]
        change = f"{v['difference']:+.{FLOAT_DIGITS}f}"
        noise = ("" if v["spread"] is None
                 else f", {NOISE_SPREADS:g} x spread = {NOISE_SPREADS * v['spread']:.{FLOAT_DIGITS}f}")
        if v["verdict"] == NOT_COMPARABLE:
            why = f"{', '.join(v['fields'])} differ{'s' if len(v['fields']) == 1 else ''}"
        elif v["fields"]:
            why = f"{change}{noise}; differs in {', '.join(v['fields'])}"
        else:
            why = f"{change}{noise}; same protocol"
        lines.append(f"  {who} {_name(v['metric'])}: {v['verdict']}: {why}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.compare", formatter_class=HelpFormatter, epilog=EXAMPLES,
                                description="Compare metrics files: the numbers with their spread, the protocol "
                                            "fields that differ (most influential first), a verdict per metric.")
    p.add_argument("files", nargs="+", metavar="METRICS_JSON",
                   help="metrics files (evaluator --json, <run>.metrics.json); the first is the baseline")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _read(args), lambda files: _run(args, files))


def _read(args: argparse.Namespace) -> list[MetricsFile]:
    if len(args.files) < MIN_FILES:
        raise EvaluationError(f"give at least {MIN_FILES} metrics files (the first is the baseline; a file compared "
                              "with itself checks it)")
    return [read_metrics_file(path) for path in args.files]


def _run(args: argparse.Namespace, files: list[MetricsFile]) -> int:
    result = compare(files)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for line in format_comparison(result):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
