"""FID against model calls (NFE) of the two demo models, one line per sampler, from bench_samplers.py's JSON.

    python benchmarks/plot_fid_nfe.py benchmarks/results/samplers.json benchmarks/results/flow-samplers.json \
        --out benchmarks/results/fid-vs-nfe.png

Each JSON's "fid" rows (sampler, nfe, fid, ckpt) become one panel; the y axis is logarithmic so that a flow
model's SDE protocol (FID ~150 on the digits) and the ODE solvers (~15) fit in one panel.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="bench_samplers.py --json files")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)

    import matplotlib  # only this output needs it (not a dependency of the package)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.results), figsize=(5.5 * len(args.results), 4.2), dpi=120, sharey=True,
                             squeeze=False)
    for ax, path in zip(axes[0], args.results):
        rows = json.loads(path.read_text())["fid"]
        for name in dict.fromkeys(r["sampler"] for r in rows):  # first-seen order
            mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in mine], [r["fid"] for r in mine], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="model evaluations per image (NFE)", ylabel="FID (1,000 samples)",
               title=Path(rows[0]["ckpt"]).name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Demo digits models: FID against model calls (cfg 1.5, seed 0, balanced labels)")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
