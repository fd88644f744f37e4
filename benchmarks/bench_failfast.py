"""Time from SIGKILL of one rank to the exit of the whole torchrun job (target: under 30 s).

    python benchmarks/bench_failfast.py --repeats 3

Starts `torchrun --standalone --nproc_per_node=2 sample_ddp.py` (gloo, CPU) on a small untrained
model, waits for the first PNGs, SIGKILLs rank 1 and measures until torchrun has exited.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def once(tmp: Path, ckpt: Path) -> dict:
    """One kill; `tmp` must be a fresh folder (PNGs of an earlier run would end the wait at once)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "sample_ddp.py",
           "--model", "custom", "--ckpt", str(ckpt), "--image-size", "16", "--vae", "none", "--num-classes", "10",
           "--num-fid-samples", "400", "--per-proc-batch-size", "4", "--num-sampling-steps", "50",
           "--sample-dir", str(tmp / "samples"), "--overwrite"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp / "samples").glob("*/0*.png")):
        time.sleep(0.05)
    workers = children(proc.pid)
    if len(workers) != 2:
        proc.kill()
        raise RuntimeError(f"expected 2 workers, found {workers}: {proc.communicate()[0][-2000:]}")
    killed = time.time()
    os.kill(workers[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    seconds = time.time() - killed
    line = next((ln for ln in output.splitlines() if "SIGKILL" in ln or "Signal 9" in ln), "")
    return {"seconds_to_exit": round(seconds, 2), "returncode": proc.returncode, "report": line.strip()[:160]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from models.demo import save_checkpoint, untrained_dit

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        net, config = untrained_dit("custom", input_size=16, in_channels=3, num_classes=10, depth=4, hidden_size=64,
                                    num_heads=2, patch_size=2)
        ckpt = save_checkpoint(net, config, tmp / "m.pt")
        for repeat in range(a.repeats):
            print(json.dumps(once(Path(tempfile.mkdtemp(dir=tmp, prefix=f"run{repeat}-")), ckpt)), flush=True)


if __name__ == "__main__":
    main()
