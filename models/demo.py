"""Build a DiT with UNTRAINED random weights and save it as a train-style checkpoint.

    python -m models.demo --out demo_out/untrained-dit-s4-32px.pt
    python -m models.demo --out tiny.pt --model custom --depth 2 --hidden-size 32 --num-heads 2 --patch-size 2

For exercising the pipeline offline (README command 1, tests): the official initialisation
zeroes the adaLN and output layers, which would make every prediction zero, so those are
redrawn from N(0, PERTURB_STD) to give a model with a non-trivial, label-dependent output.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from launch.runtime.command import run_command
from launch.runtime.files import atomic_write
from models.checkpoints import CUSTOM_MODEL
from models.dit import DIT_CONFIGS, DiT

PERTURB_STD = 0.02


def untrained_dit(
    model: str = "DiT-S/4",
    input_size: int = 32,
    in_channels: int = 3,
    num_classes: int = 10,
    learn_sigma: bool = True,
    seed: int = 0,
    **arch: int,
) -> tuple[DiT, dict]:
    """A randomly initialised DiT and its architecture config (registry name or `custom` + sizes)."""
    dims = dict(arch) if model == CUSTOM_MODEL else dict(DIT_CONFIGS[model])
    torch.manual_seed(seed)
    net = DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma, **dims)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, PERTURB_STD)
    config = {"model": model, "input_size": input_size, "in_channels": in_channels, "num_classes": num_classes,
              "learn_sigma": learn_sigma, **dims}
    return net, config


def save_checkpoint(net: DiT, config: dict, out: str | os.PathLike) -> Path:
    """Write ``{"ema", "config", "note"}`` (the train.py layout that models.checkpoints reads) to ``out``."""
    out = Path(out)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    with atomic_write(out) as f:  # creates the parent folder; never a half-written file under `out`
        torch.save({"ema": state, "config": config, "note": "UNTRAINED random weights"}, f)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: build the model and write the checkpoint."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", required=True, help="checkpoint path to write")
    p.add_argument("--model", default="DiT-S/4", choices=[*DIT_CONFIGS, CUSTOM_MODEL])
    p.add_argument("--image-size", type=int, default=32, help="pixel-space input size")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth", type=int, default=2, help="custom only")
    p.add_argument("--hidden-size", type=int, default=64, help="custom only")
    p.add_argument("--num-heads", type=int, default=2, help="custom only")
    p.add_argument("--patch-size", type=int, default=2, help="custom only")
    a = p.parse_args(argv)
    arch = dict(depth=a.depth, hidden_size=a.hidden_size, num_heads=a.num_heads, patch_size=a.patch_size)

    def body(args: argparse.Namespace) -> int:
        net, config = untrained_dit(args.model, args.image_size, args.channels, args.num_classes, seed=args.seed,
                                    **(arch if args.model == CUSTOM_MODEL else {}))
        path = save_checkpoint(net, config, args.out)
        print(f"wrote {path}: {args.model} with UNTRAINED random weights (samples will not look like anything)")
        return 0

    return run_command(lambda: a, body)


if __name__ == "__main__":
    raise SystemExit(main())
