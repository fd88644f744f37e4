"""What a training run shows while it runs (rank 0): ``<results>/metrics.jsonl`` (one JSON line per evaluation),
TensorBoard scalars (``<results>/tensorboard/``: loss, learning rate, gradient norm, images per second, every
metric, against the step; when the ``tensorboard`` package is installed) and ``<results>/metrics.png`` (the loss
and each metric against the step; matplotlib), redrawn at each evaluation.

Both optional packages are imported when first needed; without one, one warning line says what is missing and
the run goes on. A resumed run keeps only the records up to the step it resumed from (the evaluations and events
after it belong to a run that is being replaced).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

from launch.runtime.files import atomic_write

METRICS_LOG = "metrics.jsonl"
PLOT_NAME = "metrics.png"
TENSORBOARD_DIR = "tensorboard"
LOSS_LINE = re.compile(r"^step\s+(\d+) loss (\S+)")  # train.py's log line: "step    100 loss 0.12345 lr ..."
PLOT_PANEL_SIZE = (4.0, 3.0)  # inches per panel
PLOT_DPI = 100
TRAIN_TAG, EVAL_TAG = "train", "eval"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path` (none when it does not exist; a damaged last line, from a killed writer of an
    older version, is dropped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """All records, one JSON line each, replacing `path` atomically (never a half line)."""
    with atomic_write(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_losses(log: Path, until_step: int) -> list[tuple[int, float]]:
    """(step, loss) of train.py's log lines up to `until_step`, the latest line of each step (a resumed run
    logs some steps again), in step order."""
    if not log.is_file():
        return []
    losses: dict[int, float] = {}
    for line in log.read_text().splitlines():
        m = LOSS_LINE.match(line)
        if m and int(m.group(1)) <= until_step:
            losses[int(m.group(1))] = float(m.group(2))
    return sorted(losses.items())


class TensorBoard:
    """Scalars into ``<folder>`` when `torch.utils.tensorboard` imports; otherwise one warning and nothing."""

    def __init__(self, folder: Path, purge_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # imports the tensorboard package
        except ImportError:
            warnings.warn("TensorBoard scalars are off: the tensorboard package is not installed "
                          "(pip install -e '.[tensorboard]')", stacklevel=2)
            self.writer = None
            return
        self.writer = SummaryWriter(str(folder), purge_step=purge_step or None)

    def add(self, prefix: str, values: dict[str, float | None], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def draw(out: Path, losses: list[tuple[int, float]], records: list[dict[str, Any]], title: str) -> bool:
    """metrics.png: the training loss, then one panel per metric, against the step. False (and one warning) when
    matplotlib is missing."""
    try:
        import matplotlib  # seconds to import: only here
    except ImportError:
        warnings.warn(f"{out.name} is not drawn: matplotlib is not installed (pip install -e '.[plot]')",
                      stacklevel=2)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(key for record in records for key in record.get("metrics", {})))
    panels = 1 + len(names)
    fig, axes = plt.subplots(1, panels, figsize=(PLOT_PANEL_SIZE[0] * panels, PLOT_PANEL_SIZE[1]), squeeze=False)
    axes = axes[0]
    if losses:
        axes[0].plot([s for s, _ in losses], [v for _, v in losses], lw=1)
    axes[0].set_ylabel("training loss")
    for ax, name in zip(axes[1:], names):
        points = [(r["step"], r["metrics"][name]) for r in records if r.get("metrics", {}).get(name) is not None]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o")
        ax.set_ylabel(name)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=PLOT_DPI)
    plt.close(fig)
    return True


class TrainingMonitor:
    """Rank 0's records of one training process, from `start_step` on (a resumed run drops later records)."""

    def __init__(self, results: Path, start_step: int, log: Path, title: str) -> None:
        self.results, self.log, self.title = results, log, title
        self.metrics_path = results / METRICS_LOG
        kept = [r for r in read_records(self.metrics_path) if r.get("step", 0) <= start_step]
        if kept != read_records(self.metrics_path):
            write_records(self.metrics_path, kept)
        self.tensorboard = TensorBoard(results / TENSORBOARD_DIR, start_step)
        self.plot = True

    def evaluated_steps(self) -> set[int]:
        """The steps that have a metrics.jsonl line."""
        return {int(r["step"]) for r in read_records(self.metrics_path) if "step" in r}

    def training(self, step: int, values: dict[str, float | None]) -> None:
        """One log line's scalars (loss, lr, grad_norm, images_per_s)."""
        self.tensorboard.add(TRAIN_TAG, values, step)

    def evaluation(self, record: dict[str, Any]) -> None:
        """One evaluation: its metrics.jsonl line (replacing one of the same step), its scalars, metrics.png."""
        step = int(record["step"])
        records = [r for r in read_records(self.metrics_path) if r.get("step") != step] + [record]
        records.sort(key=lambda r: r["step"])
        write_records(self.metrics_path, records)
        self.tensorboard.add(EVAL_TAG, record["metrics"], step)
        self.tensorboard.add(EVAL_TAG, {"seconds": record.get("eval_seconds")}, step)
        if self.plot:
            self.plot = draw(self.results / PLOT_NAME, read_losses(self.log, step), records, self.title)

    def close(self) -> None:
        self.tensorboard.close()
