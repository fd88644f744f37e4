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
    out_img = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 900]), torch.tensor([0, 5]))
    assert out_img.abs().max() > 0  # adaLN/output layers perturbed: a non-trivial prediction


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="uses /proc as an unwritable folder")
def test_unwritable_output_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["--out", "/proc/no-such-folder/demo.pt"])
    assert ended.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "/proc/no-such-folder/demo.pt" in err
