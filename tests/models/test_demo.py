"""models.demo: an untrained checkpoint that models.checkpoints loads, and one-line write errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.runtime.errors import EXIT_BAD_INPUT
from models.checkpoints import CUSTOM_MODEL, build_model
from models.demo import main


def test_demo_checkpoint_loads_as_custom_model(tmp_path, capsys):
    out = tmp_path / "sub" / "demo.pt"
    main(["--out", str(out), "--model", CUSTOM_MODEL, "--image-size", "8", "--num-classes", "5", "--depth", "1"])
    assert "UNTRAINED" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["demo.pt"]  # no temporary file left
    model, meta = build_model(CUSTOM_MODEL, out, input_size=8, num_classes=5)
    assert (model.depth, model.hidden_size, model.in_channels) == (1, 64, 3) and meta["weights"] == "ema"
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 900])
    out_img = model(torch.cat([x, x]), torch.cat([t, t]), torch.tensor([0, 5, 1, 5]))
    # the adaLN and output layers were redrawn from N(0, 0.02): the output depends on the input, the label and
    # the timestep (the official zero init would give exactly 0 everywhere)
    zeros = [name for name, p in model.named_parameters() if not p.any()]
    assert not zeros, zeros
    assert not torch.allclose(out_img[0], out_img[2])  # label 0 vs 1, same x and t
    assert torch.allclose(out_img[1], out_img[3])  # the same (x, t, y): the same output
    assert not torch.allclose(out_img[0], out_img[1])  # another x, t and label
    final = model.final_layer.linear.weight
    assert abs(final.std().item() - 0.02) < 0.005 and abs(final.mean().item()) < 0.005


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="uses /proc as an unwritable folder")
def test_unwritable_output_is_one_line_exit_2(capsys):
    assert main(["--out", "/proc/no-such-folder/demo.pt"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "/proc/no-such-folder/demo.pt" in err
