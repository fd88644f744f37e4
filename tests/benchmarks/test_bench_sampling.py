"""The GPU benchmark runs : on CPU with a tiny model, every number it reports is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"images_per_s", "warmup_s", "model_ms_per_step", "outside_ms_per_step", "outside_share", "model_tflops",
        "achieved_tflops", "utilisation"}


def test_tiny_run_reports_throughput_flops_and_host_time():
    cmd = [sys.executable, "benchmarks/bench_sampling.py", "--device", "cpu", "--model", "tiny", "--latent-size", "8",
           "--batch-size", "4", "--steps", "4", "--batches", "1", "--repeats", "1", "--variants", "fp32,bf16",
           "--peak-tflops", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    summaries = {r["summary"]: r for r in rows if "summary" in r}
    assert set(summaries) == {"fp32", "bf16"}
    for row in summaries.values():
        assert KEYS <= set(row), row
        assert row["images_per_s"] > 0 and 0 <= row["outside_share"] < 1 and row["model_ms_per_step"] > 0
