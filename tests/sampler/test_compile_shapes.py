"""--compile sees one batch shape per call site: the last, shorter batch is padded, so the
model is only ever called with the shapes warmed up at start (guided 2B, and B outside a guidance interval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent('''
    import json, sys, torch
    import sample_ddp
    from sampling.network import forward_shapes
    from sampling.options import config_from_args

    calls = []
    def fake_compile(model, mode=None, **kwargs):  # stands in for torch.compile: records every call's batch
        model.register_forward_pre_hook(lambda module, args: calls.append(int(args[0].shape[0])))
        return model
    torch.compile = fake_compile
    code = sample_ddp.main(sys.argv[2:])
    cfg = config_from_args(sample_ddp.build_parser().parse_args(sys.argv[2:]))
    with open(sys.argv[1], "w") as f:
        json.dump({"code": code, "calls": calls, "shapes": forward_shapes(cfg)}, f)
''')


def test_every_forward_has_a_warmed_up_shape(sampler, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", DIT_CPU_THREADS="1")
    script, out = tmp_path / "driver.py", tmp_path / "calls.json"
    script.write_text(DRIVER)
    args = [*sampler.pixel_args(tmp_path / "s", 4, 3, steps=6), "--guidance-interval", "200", "800", "--compile",
            "--no-npz"]
    result = subprocess.run([sys.executable, str(script), str(out), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["code"] == 0 and sorted(report["shapes"]) == [3, 6]
    assert report["calls"][:2] == [6, 3]  # the warm-up, once per shape
    assert set(report["calls"]) == {3, 6}  # 4 images in batches of 3: the last batch (1 image) was padded
    assert len(report["calls"]) == 2 + 2 * 6  # two batches of 6 steps, one model call per step
