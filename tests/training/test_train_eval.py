"""train.py --eval-every: the EMA weights scored inside the training job through the sampling library.

In this process with the stand-in feature network (tests/fake_inception.py: microseconds per image, float64
projections, so a feature row does not depend on its batch): the losses of a run with evaluations equal those of
one without; each metrics.jsonl line is what sample_ddp.py, run afresh with the line's argv, prints, and what the
evaluator computes on those images; an evaluation stopped by a signal exits 3 with its checkpoint on disk and
`--resume auto` finishes it, then trains on exactly as the uninterrupted run; bad --eval-* input is one line
before the first step. The two-process run with the real Inception architecture is in test_train_eval_ddp.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FOLDER_CLASSES
from fake_inception import StandInExtractor, make_random_inception_state

import sample_ddp
import train
from evaluation import run_metrics
from evaluation.inception import InceptionWeights
from evaluation.report import evaluate
from launch.runtime import preempt
from launch.runtime.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED
from models import training_monitor

SIZE = 8  # the tiny image folder's side (tests/training/conftest.py)
N = 8  # images per evaluation: 2 batches of 4 (precision/recall need more than 3)
BATCH = 4
STEPS = 4
EVERY = 2
METRIC_KEYS = ("inception_score", "fid", "sfid", "precision", "recall")
LOSS_LINE = re.compile(r"^step\s+(\d+) loss (\S+)", re.M)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A feature network's weights file (the stand-in only hashes it) and a reference of 16 random images."""
    base = tmp_path_factory.mktemp("eval-inputs")
    out = {"weights": base / "inception.pth", "ref": base / "ref.npz", "cache": base / "cache"}
    torch.save(make_random_inception_state(0), out["weights"])
    rng = np.random.default_rng(7)
    np.savez(out["ref"], arr_0=rng.integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8))
    return out


@pytest.fixture(scope="module")
def in_process():
    """train.py and sample_ddp.py in this process with the stand-in network; handlers and hooks restored."""
    saved = {sig: signal.getsignal(sig) for sig in preempt.STOP_SIGNALS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_metrics, "InceptionExtractor", lambda w, d, b: StandInExtractor(w, str(d), b))
        mp.setattr(sys, "excepthook", sys.excepthook)  # the sampler installs its fail-fast hook
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("DIT_CPU_THREADS", "1")
        yield mp
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preempt._stop.clear()


def train_args(image_folder: Path, results: Path, inputs: dict[str, Path] | None, *extra: str) -> list[str]:
    args = ["--data-path", str(image_folder), "--image-size", str(SIZE), "--vae", "none", "--model", "custom",
            "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--patch-size", "2", "--global-batch-size", "4",
            "--max-steps", str(STEPS), "--ckpt-every", "100", "--log-every", "1", "--lr", "1e-3", "--ema-decay", "0.5",
            "--num-workers", "0", "--no-progress", "--results-dir", str(results)]
    if inputs is not None:
        args += ["--eval-every", str(EVERY), "--eval-ref", str(inputs["ref"]), "--eval-samples", str(N),
                 "--eval-steps", "5", "--eval-batch-size", str(BATCH), "--eval-cfg-scale", "1.5",
                 "--eval-inception-weights", str(inputs["weights"]), "--eval-cache-dir", str(inputs["cache"])]
    return args + list(extra)


def losses(results: Path) -> dict[int, float]:
    """step -> logged loss (the last line of each step: a resumed run logs its steps after the checkpoint)."""
    return {int(s): float(v) for s, v in LOSS_LINE.findall((results / train.LOG_NAME).read_text())}


def records(results: Path) -> list[dict]:
    return training_monitor.read_records(results / training_monitor.METRICS_LOG)


@pytest.fixture(scope="module")
def plain_run(in_process, image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "run"
    assert train.main(train_args(image_folder, out, None)) == EXIT_OK
    return out


@pytest.fixture(scope="module")
def eval_run(in_process, image_folder, inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    assert train.main(train_args(image_folder, out, inputs)) == EXIT_OK
    return out


def test_evaluations_change_no_loss_and_no_weight(plain_run, eval_run):
    assert losses(eval_run) == losses(plain_run) and len(losses(plain_run)) == STEPS
    final_a = torch.load(plain_run / "checkpoints" / f"{STEPS:07d}.pt", weights_only=True)
    final_b = torch.load(eval_run / "checkpoints" / f"{STEPS:07d}.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, value in final_a[part].items():
            assert torch.equal(final_b[part][name], value), (part, name)
    # the checkpoints every evaluation needs, one metrics.jsonl line each, every metric a number
    assert sorted(p.name for p in (eval_run / "checkpoints").glob("*.pt")) == ["0000002.pt", "0000004.pt"]
    assert [r["step"] for r in records(eval_run)] == [2, 4]
    for record in records(eval_run):
        assert set(record["metrics"]) == set(METRIC_KEYS) and record["eval_seconds"] > 0
        assert record["metrics"]["fid"] > 0


def test_the_logged_command_reproduces_each_number(in_process, eval_run, inputs, tmp_path):
    """sample_ddp.py with the line's argv (in a fresh folder) prints the same numbers, and the evaluator on the
    same images (the argv with --save npz) computes them too."""
    worst = 0.0
    for record in records(eval_run):
        argv = record["sample_ddp_args"]
        assert argv[argv.index("--ckpt") + 1] == str((eval_run / "checkpoints" / f"{record['step']:07d}.pt").resolve())
        out = tmp_path / f"again-{record['step']}"
        assert sample_ddp.main([*argv, "--sample-dir", str(out)]) == EXIT_OK
        (metrics_json,) = out.glob("*.metrics.json")
        again = json.loads(metrics_json.read_text())
        for key, value in record["metrics"].items():
            worst = max(worst, abs(again[key] - value) / abs(value))
    assert worst <= 1e-5
    # the evaluator (evaluation.report.evaluate) on the last step's images as an ADM .npz
    npz_dir = tmp_path / "npz"
    assert sample_ddp.main([*argv, "--save", "npz", "--sample-dir", str(npz_dir)]) == EXIT_OK
    (npz,) = npz_dir.glob("*.npz")
    network = StandInExtractor(InceptionWeights(inputs["weights"], "explicit", True))
    expected = evaluate(inputs["ref"], npz, network, cache_dir=None)
    for key in METRIC_KEYS:
        assert record["metrics"][key] == pytest.approx(expected[key], rel=1e-5), key


def test_log_tensorboard_and_plot(eval_run, capsys):
    log = (eval_run / train.LOG_NAME).read_text()
    lines = [ln for ln in log.splitlines() if ln.startswith("eval step")]
    assert len(lines) == 2 and all(re.search(r"eval \d+\.\d s \(\d+% of the wall time so far\)", ln) for ln in lines)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(eval_run / training_monitor.TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", *(f"eval/{k}" for k in METRIC_KEYS)} <= tags
    logged = sorted(losses(eval_run).items())
    assert [e.step for e in events.Scalars("train/loss")] == [s for s, _ in logged]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([v for _, v in logged], abs=6e-6)  # %.5f
    assert [e.step for e in events.Scalars("eval/fid")] == [r["step"] for r in records(eval_run)]
    assert [e.value for e in events.Scalars("eval/fid")] == pytest.approx(
        [r["metrics"]["fid"] for r in records(eval_run)], rel=1e-6)
    from PIL import Image

    with Image.open(eval_run / training_monitor.PLOT_NAME) as im:
        assert im.size[0] > im.size[1] and np.asarray(im.convert("L")).std() > 0  # loss + 5 metric panels


def test_without_tensorboard_one_warning(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.warns(UserWarning, match="tensorboard package is not installed") as seen:
        board = training_monitor.TensorBoard(tmp_path / "tb", 0)
    board.add("train", {"loss": 1.0}, 1)
    board.close()
    assert len(seen) == 1 and not (tmp_path / "tb").exists()


@pytest.mark.parametrize("stop_at", ["during", "after"])
def test_a_stopped_evaluation_resumes_and_training_continues_exactly(in_process, eval_run, image_folder, inputs,
                                                                     tmp_path, monkeypatch, capsys, stop_at):
    """A stop signal during step 2's evaluation (a real SIGUSR1 while its first batch is stored) or after its last
    batch: exit 3 with checkpoint 2 on disk; --resume auto redoes what is missing (the stored features kept) and
    the metrics and the losses that follow are the uninterrupted run's."""
    from sampling import consumers

    before = signal.getsignal(signal.SIGUSR1)
    if stop_at == "during":
        real_add = consumers.RunOutputs.add

        def add_then_signal(self, batch):  # noqa: ANN001, ANN202
            real_add(self, batch)
            if batch.indices[0] == 0:
                assert signal.getsignal(signal.SIGUSR1) is preempt._handle  # caught only during the evaluation
                os.kill(os.getpid(), signal.SIGUSR1)

        monkeypatch.setattr(consumers.RunOutputs, "add", add_then_signal)
    else:
        calls = {"n": 0}

        def requested() -> bool:  # the stream asks once per batch, then the evaluation once more: that one says stop
            calls["n"] += 1
            return calls["n"] == N // BATCH + 1

        monkeypatch.setattr(preempt, "requested", requested)
    out = tmp_path / "run"
    args = train_args(image_folder, out, inputs)
    assert train.main(args) == EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGUSR1) == before  # the training's own handlers are back
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["0000002.pt"]
    assert [r["step"] for r in records(out)] == ([] if stop_at == "during" else [2])
    assert "rerun with --resume auto" in (out / train.LOG_NAME).read_text()
    capsys.readouterr()
    monkeypatch.undo()
    preempt._stop.clear()  # the flag a real signal set (a new process starts without it)
    assert train.main(args) == EXIT_OK  # --resume auto is the default
    stdout = capsys.readouterr().out
    if stop_at == "during":
        assert f": {BATCH} of {N} stored, 0 to extract" in stdout  # the first batch's features were kept
    uninterrupted = {r["step"]: r for r in records(eval_run)}
    assert [r["step"] for r in records(out)] == [2, 4]
    for record in records(out):
        expected = uninterrupted[record["step"]]["metrics"]
        assert record["metrics"] == pytest.approx(expected, rel=1e-12)
    assert losses(out) == losses(eval_run)


def _main_error(argv: list[str], capsys) -> str:
    assert train.main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_evaluation_input_is_one_line_before_any_work(image_folder, inputs, tmp_path, capsys):
    out = tmp_path / "run"
    base = train_args(image_folder, out, inputs)
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=np.zeros(2048), sigma=np.eye(2048))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = {
        "--eval-ref": [*base, "--eval-ref", str(tmp_path / "missing.npz")],
        "--eval-ref ": [*base, "--eval-ref", str(folder)],
        "statistics only": [*base, "--eval-ref", str(stats_only), "--eval-metrics", "fid,prec"],
        "precision/recall need more than": [*base, "--eval-samples", "3"],
        "does not apply to a diffusion": [*base, "--eval-sampler", "euler-maruyama"],
        "--eval-metrics": [*base, "--eval-metrics", "fid,nonsense"],
        "--eval-steps": [*base, "--eval-sampler", "ddim", "--eval-steps", "1"],
        "--eval-every needs --eval-ref": train_args(image_folder, out, None, "--eval-every", "2"),
        "--eval-ref is the reference of --eval-every": train_args(image_folder, out, None, "--eval-ref",
                                                                  str(inputs["ref"])),
        "needs the null label": [*base, "--class-dropout", "0"],
    }
    for needle, argv in cases.items():
        line = _main_error(argv, capsys)
        assert needle.strip() in line, (needle, line)
        assert "--num-fid-samples" not in line and "--ref " not in line  # train.py's flag names
    flow = [*base, "--objective", "flow", "--no-learn-sigma", "--eval-sampler", "ddpm"]
    assert "does not apply to a flow-matching model" in _main_error(flow, capsys)
    assert not out.exists()  # nothing made: no checkpoint, no log


def euler_by_hand(ckpt: Path, n: int, steps: int, num_classes: int) -> np.ndarray:
    """REPA's Euler sampler written out for a SiT (network time 1 - t, velocity negated): x_T of sample i from
    generator seed i after its label draw, balanced labels; uint8 as the pixel codec (clamp(127.5 x + 128))."""
    from models.sit import SiT

    state = torch.load(ckpt, weights_only=True)
    config = state["config"]
    net = SiT(**{k: config[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                         "num_heads", "num_classes", "learn_sigma")}).eval()
    net.load_state_dict(state["ema"])
    labels = torch.from_numpy(np.random.default_rng(0).permutation(np.arange(n) % num_classes))
    x_T = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        torch.randint(num_classes, (1,), generator=g)
        x_T.append(torch.randn(config["in_channels"], SIZE, SIZE, generator=g))
    x = torch.stack(x_T).double()
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:]):
            v = -net(x.float(), torch.full((n,), 1 - t), labels).double()
            x = x + (t_next - t) * v
    return torch.clamp(127.5 * x.float() + 128, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_flow_objective_evaluates_with_a_flow_sampler_that_sample_ddp_reproduces(in_process, image_folder, inputs,
                                                                                 tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(image_folder, out, inputs, "--objective", "flow", "--max-steps", str(EVERY),
                      "--eval-cfg-scale", "1")
    assert train.main(args) == EXIT_OK
    (record,) = records(out)
    argv = record["sample_ddp_args"]
    assert argv[argv.index("--sampler") + 1] == "euler"  # the flow objective's default
    assert sample_ddp.main([*argv, "--save", "npz", "--sample-dir", str(tmp_path / "again")]) == EXIT_OK
    (metrics_json,) = (tmp_path / "again").glob("*.metrics.json")
    assert json.loads(metrics_json.read_text())["fid"] == pytest.approx(record["metrics"]["fid"], rel=1e-5)
    (npz,) = (tmp_path / "again").glob("*.npz")
    images = np.load(npz)["arr_0"]
    expected = euler_by_hand(Path(record["checkpoint"]), N, 5, len(FOLDER_CLASSES))
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1  # float noise may move a level
    capsys.readouterr()
    ddpm = [*argv, "--sampler", "ddpm", "--sample-dir", str(tmp_path / "ddpm")]
    assert sample_ddp.main(ddpm) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: --sampler ddpm") and "flow-matching model (family sit)" in err
