"""`pyramidflow train`: resumable training state, per-epoch test metrics that never pick
the model, and the matching Detector.fit keywords."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyramidflow import Config, Detector
from pyramidflow.cli import main
from pyramidflow.cli.train import train_state_path
from pyramidflow.io.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--image-size", "32", "--levels", "2", "--stacks", "1", "--channels", "4",
    "--kernel-size", "3", "--augment", "--lr", "1e-3", "--no-progress",
]  # fmt: skip
EPOCHS = ["--epochs", "3"]  # 8 images, 1 held out: 3 steps of 2 per epoch
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
ENV.pop("PYRAMIDFLOW_DEBUG", None)

# Runs the CLI; with a second argument "stall", the process blocks for good right after
# writing its first training-state checkpoint, so that the test can SIGKILL it there.
RUNNER = textwrap.dedent(
    """
    import sys, time
    from pyramidflow.training import loop
    from pyramidflow.cli import main

    if sys.argv[1] == "stall":
        real_save = loop.save_train_state

        def save_then_stall(*args, **kwargs):
            real_save(*args, **kwargs)
            time.sleep(600)

        loop.save_train_state = save_then_stall
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.fixture(scope="module")
def category(tiny_category: Path) -> Path:
    """The session's tiny category (conftest.py)."""
    return tiny_category


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = tmp_path_factory.mktemp("runner") / "run_cli.py"
    script.write_text(RUNNER)
    return script


def _cli(runner: Path, mode: str, *args: object) -> subprocess.Popen:
    command = [sys.executable, str(runner), mode, "train", *map(str, args)]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err.decode()


def _saved(path: Path) -> dict[str, torch.Tensor]:
    saved = load_checkpoint(path)
    assert saved.template is not None
    tensors = dict(saved.model.state_dict())
    tensors.update({f"template.{i}": t for i, t in enumerate(saved.template)})
    return tensors


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different}"


@pytest.mark.slow
def test_a_killed_cli_run_resumes_to_the_uninterrupted_weights(
    category: Path, runner: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference.safetensors"
    straight = _cli(runner, "run", category, "--out", reference, *TINY, *EPOCHS)

    out = tmp_path / "model.safetensors"
    state = train_state_path(out)
    victim = _cli(
        runner, "stall", category, "--out", out, *TINY, *EPOCHS, "--checkpoint-every", "2"
    )
    deadline = time.monotonic() + 120
    while not state.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    code, err = _finish(victim)
    assert code == -signal.SIGKILL, err
    assert not out.exists()
    info = load_checkpoint(state).info
    assert (info["epoch"], info["batch"], info["step"]) == (0, 2, 2)  # mid-epoch 1

    code, err = _finish(straight)
    assert code == 0, err
    code, err = _finish(_cli(runner, "run", category, "--out", out, *TINY, *EPOCHS, "--resume"))
    assert code == 0, err
    _assert_bitwise_equal(_saved(out), _saved(reference))
    assert load_checkpoint(out).info["threshold"] == load_checkpoint(reference).info["threshold"]
    assert not state.exists()  # removed once the model is written


def _run(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # usage errors leave through argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_saved_state_needs_resume_or_overwrite_and_a_matching_config(
    category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "first.safetensors"
    code, _, err = _run(["train", category, "--out", first, *TINY, *EPOCHS, "--keep-state"], capsys)
    assert code == 0, err
    state = train_state_path(first)
    assert load_checkpoint(state).info["epoch"] == 3  # kept on request

    out = tmp_path / "second.safetensors"
    train_state_path(out).write_bytes(state.read_bytes())  # an interrupted run's state
    code, _, err = _run(["train", category, "--out", out, *TINY, *EPOCHS], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(train_state_path(out)) in err and "--resume" in err and "--overwrite" in err
    assert not out.exists()

    resume_other_lr = ["train", category, "--out", out, *TINY, *EPOCHS, "--resume", "--lr", "5e-4"]
    code, _, err = _run(resume_other_lr, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "different config (lr changed)" in err and str(train_state_path(out)) in err

    # more epochs is no config change: training goes on from epoch 3 of the saved run
    code, stdout, err = _run(
        ["train", category, "--out", out, *TINY, "--epochs", "4", "--resume"], capsys
    )
    assert code == 0, err
    info = load_checkpoint(out).info
    assert info["resumed_at_epoch"] == 3 and info["steps"] == 12 and len(info["epoch_losses"]) == 4
    assert info["epoch_losses"][:3] == load_checkpoint(first).info["epoch_losses"]
    assert not train_state_path(out).exists()

    train_state_path(out).write_bytes(state.read_bytes())
    code, _, err = _run(["train", category, "--out", out, *TINY, *EPOCHS, "--overwrite"], capsys)
    assert code == 0, err  # started over: the same model as the first run
    _assert_bitwise_equal(_saved(out), _saved(first))
    assert not train_state_path(out).exists()


def test_eval_data_reports_every_epoch_but_the_saved_model_is_the_last_epoch(
    category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain, watched = tmp_path / "plain.safetensors", tmp_path / "watched.safetensors"
    code, stdout, err = _run(["train", category, "--out", plain, *TINY, *EPOCHS], capsys)
    assert code == 0, err
    held_out = load_checkpoint(plain).info["held_out_images"]
    assert 0 < held_out < 10  # 8 images: the threshold is the quantile of very few scores
    assert f"0.99 quantile of the scores of {held_out} held-out good images" in stdout
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"only {held_out} image(s)" in warnings[0], err
    code, stdout, err = _run(
        ["train", category, "--out", watched, *TINY, *EPOCHS, "--eval-data", category], capsys
    )
    assert code == 0, err
    lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert all("pixel_auroc" in line and "image_auroc" in line for line in lines)

    # evaluating changed nothing the training sees: same weights, VN means and template
    _assert_bitwise_equal(_saved(watched), _saved(plain))
    info = load_checkpoint(watched).info
    assert [m["epoch"] for m in info["epoch_metrics"]] == [1, 2, 3]
    assert all(0.0 <= m["pixel_auroc"] <= 1.0 for m in info["epoch_metrics"])
    assert [m["loss"] for m in info["epoch_metrics"]] == info["epoch_losses"]
    assert "epoch_metrics" not in load_checkpoint(plain).info

    code, _, err = _run(
        ["train", category, "--out", tmp_path / "x.safetensors", *TINY, "--eval-data", tmp_path],
        capsys,
    )
    assert code == 1 and str(tmp_path) in err  # checked before training starts


def test_epoch_lines_under_the_training_bar_are_lines_of_their_own(
    category: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    terminal_lines,
) -> None:
    screen = io.StringIO()  # one terminal for both streams, as a user sees them
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    with_bar = [a for a in TINY if a != "--no-progress"]
    out = tmp_path / "m.safetensors"
    code = main([str(a) for a in ["train", category, "--out", out, *with_bar, *EPOCHS,
                                  "--eval-data", category]])  # fmt: skip
    shown = [line for line in terminal_lines(screen.getvalue()) if line]
    assert code == 0 and any("training" in line for line in screen.getvalue().split("\r"))
    epochs = [line for line in shown if "pixel_auroc" in line]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"], shown
    assert all(line.startswith("epoch ") for line in epochs), shown


def test_fit_evaluation_leaves_the_global_rng_and_training_mode_alone(category: Path) -> None:
    config = Config(image_size=32, levels=2, stacks=1, channels=4, kernel_size=3, epochs=2)
    seen: dict[str, list[tuple[torch.Tensor, dict[str, float] | None]]] = {}
    for name, eval_data in (("plain", None), ("watched", category)):
        calls: list[tuple[torch.Tensor, dict[str, float] | None]] = []

        def record(epoch: int, loss: float, metrics: dict[str, float] | None, into=calls) -> None:
            into.append((torch.get_rng_state(), metrics))

        detector = Detector(config).fit(category, eval_data=eval_data, on_epoch=record)
        assert detector.model is not None and not detector.model.training
        seen[name] = calls
    assert len(seen["plain"]) == len(seen["watched"]) == 2
    for (plain_rng, no_metrics), (watched_rng, metrics) in zip(
        seen["plain"], seen["watched"], strict=True
    ):
        assert torch.equal(plain_rng, watched_rng)
        assert no_metrics is None and metrics is not None
        assert np.isfinite(metrics["pixel_auroc"])


def test_fit_resumes_from_its_checkpoint(category: Path, tmp_path: Path) -> None:
    config = Config(image_size=32, levels=2, stacks=1, channels=4, kernel_size=3, epochs=2)
    path = tmp_path / "state.safetensors"
    short = Detector(config.replace(epochs=1)).fit(category, checkpoint_path=path)
    assert load_checkpoint(path).info["epoch"] == 1
    resumed = Detector(config).fit(category, checkpoint_path=path, resume=True)
    straight = Detector(config).fit(category)
    assert resumed.info["resumed_at_epoch"] == 1
    assert resumed.info["epoch_losses"][0] == short.info["epoch_losses"][0]
    assert resumed.model is not None and straight.model is not None
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
