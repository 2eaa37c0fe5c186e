"""Training checkpoints: resume equals an uninterrupted run; faults never lose the last one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pyramidflow.io.atomic as atomic_module
from pyramidflow import Config, PyramidFlow
from pyramidflow.errors import TrainingError
from pyramidflow.io.checkpoint import load_checkpoint
from pyramidflow.training import loop

TINY = dict(image_size=32, levels=3, stacks=1, channels=8, kernel_size=3, augment=True)
CONFIG = Config(**TINY, epochs=3, lr=1e-3)
ROOT = Path(__file__).resolve().parents[1]


def _images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _model(seed: int = 0) -> PyramidFlow:
    torch.manual_seed(seed)
    return PyramidFlow(CONFIG)


def _state(model: PyramidFlow) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different}"


@pytest.fixture(scope="module")
def straight() -> dict[int, tuple[dict[str, torch.Tensor], loop.TrainReport]]:
    """One uninterrupted 3-epoch run: its state after epochs 1, 2 and 3."""
    model = _model()
    states: dict[int, dict[str, torch.Tensor]] = {}
    report = loop.train(
        model,
        _images(),
        CONFIG,
        on_epoch=lambda epoch, loss: states.update({epoch + 1: _state(model)}),
    )
    return {epochs: (state, report) for epochs, state in states.items()}


def test_resume_reaches_the_weights_of_an_uninterrupted_run(straight, tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    loop.train(_model(), _images(), CONFIG.replace(epochs=1), checkpoint_path=path)
    saved = load_checkpoint(path)
    assert saved.info["epoch"] == 1 and saved.info["step"] == 3

    fresh = _model(seed=123)  # other initial weights: everything must come from the file
    report = loop.train(fresh, _images(), CONFIG, checkpoint_path=path, resume=True)
    reference_state, reference_report = straight[3]
    _assert_same(_state(fresh), reference_state)  # bit for bit on the CPU
    assert report.start_epoch == 1 and report.steps == reference_report.steps == 9
    assert report.epoch_losses == reference_report.epoch_losses
    assert not fresh.training
    assert load_checkpoint(path).info["epoch"] == 3


def test_resume_without_a_file_starts_from_scratch_and_refuses_other_settings(
    straight, tmp_path: Path
) -> None:
    path = tmp_path / "new.safetensors"
    model = _model()
    loop.train(model, _images(), CONFIG.replace(epochs=1), checkpoint_path=path, resume=True)
    _assert_same(_state(model), straight[1][0])
    with pytest.raises(TrainingError, match="different config.*lr"):
        loop.train(_model(), _images(), CONFIG.replace(lr=1e-4), checkpoint_path=path, resume=True)
    with pytest.raises(TrainingError, match="other images"):
        loop.train(_model(), _images(8), CONFIG, checkpoint_path=path, resume=True)
    with pytest.raises(ValueError, match="needs a checkpoint_path"):
        loop.train(_model(), _images(), CONFIG, resume=True)


def test_checkpoints_are_written_every_n_epochs_and_after_the_last(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    seen: list[int | None] = []

    def on_epoch(epoch: int, loss: float) -> None:
        seen.append(load_checkpoint(path).info["epoch"] if path.exists() else None)

    loop.train(
        _model(), _images(), CONFIG, checkpoint_path=path, checkpoint_every=2, on_epoch=on_epoch
    )
    assert seen == [None, 2, 3]


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    straight, tmp_path: Path
) -> None:
    path = tmp_path / "state.safetensors"
    images = _images()
    snapshot: dict[str, bytes] = {}

    def poison(epoch: int, loss: float) -> None:
        if epoch == 0:
            snapshot["bytes"] = path.read_bytes()
            images[:, 0, 5, 5] = float("inf")  # every later batch is broken

    with pytest.raises(TrainingError, match="loss became (nan|inf) at epoch 2, step 4"):
        loop.train(_model(), images, CONFIG, checkpoint_path=path, on_epoch=poison)
    assert path.read_bytes() == snapshot["bytes"]
    saved = load_checkpoint(path)
    assert saved.info["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in saved.model.state_dict().values())
    _assert_same(saved.model.state_dict(), straight[1][0])

    fixed = _model(seed=7)  # with the data repaired, resuming gives the uninterrupted run
    loop.train(fixed, _images(), CONFIG, checkpoint_path=path, resume=True)
    _assert_same(_state(fixed), straight[3][0])


def test_a_crash_while_saving_leaves_the_previous_checkpoint_loadable(
    straight, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.safetensors"
    loop.train(_model(), _images(), CONFIG.replace(epochs=1), checkpoint_path=path)
    before = path.read_bytes()
    real_open = open

    class HalfWrite:
        """A file that writes half of what it is given, then fails (disk full)."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            return False

        def write(self, data: bytes) -> int:
            self.handle.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(  # the module's own name `open` shadows the builtin
        atomic_module, "open", lambda name, mode: HalfWrite(real_open(name, mode)), raising=False
    )
    with pytest.raises(TrainingError, match="could not write the training checkpoint"):
        loop.train(_model(), _images(), CONFIG.replace(epochs=2), checkpoint_path=path, resume=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]  # no temp left
    assert load_checkpoint(path).info["epoch"] == 1

    model = _model(seed=5)
    loop.train(model, _images(), CONFIG.replace(epochs=2), checkpoint_path=path, resume=True)
    _assert_same(_state(model), straight[2][0])


def test_step_checkpoints_resume_in_the_middle_of_an_epoch(straight, tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"

    class StopError(Exception):
        pass

    def stop_at_step_5(step: int, loss: float) -> None:
        if step == 5:
            raise StopError

    with pytest.raises(StopError):
        loop.train(
            _model(), _images(), CONFIG, checkpoint_path=path, checkpoint_every_steps=2,
            on_step=stop_at_step_5,
        )  # fmt: skip
    info = load_checkpoint(path).info
    assert (info["epoch"], info["batch"], info["step"]) == (1, 1, 4)  # 3 steps per epoch

    fresh = _model(seed=11)
    report = loop.train(
        fresh, _images(), CONFIG, checkpoint_path=path, checkpoint_every_steps=2, resume=True
    )
    _assert_same(_state(fresh), straight[3][0])
    assert report.epoch_losses == straight[3][1].epoch_losses and report.steps == 9
    with pytest.raises(ValueError, match="checkpoint_every_steps must be >= 1"):
        loop.train(_model(), _images(), CONFIG, checkpoint_path=path, checkpoint_every_steps=0)


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from safetensors.torch import save_file
    import pyramidflow.io.atomic
    from pyramidflow import Config, PyramidFlow
    from pyramidflow.training import loop

    path, kill_at_step, die_in_save, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    config = Config(image_size=32, levels=3, stacks=1, channels=8, kernel_size=3, augment=True,
                    epochs=3, lr=1e-3)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = PyramidFlow(config)

    def on_step(step, loss):
        if step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a hard kill

    if die_in_save == "yes":  # the temporary file is written, the process dies before rename
        pyramidflow.io.atomic.os.replace = lambda *args: os._exit(3)
    loop.train(model, images, config, checkpoint_path=path, resume=True, on_step=on_step)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    """
)


@pytest.mark.slow
def test_a_killed_training_process_resumes_to_the_uninterrupted_result(
    straight, tmp_path: Path
) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    path, out = tmp_path / "state.safetensors", tmp_path / "final.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run(kill_at_step: int, die_in_save: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(script), str(path), str(kill_at_step), die_in_save, str(out)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    killed = run(kill_at_step=5, die_in_save="no")  # mid-epoch 2 (steps 4-6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load_checkpoint(path).info["epoch"] == 1

    died = run(kill_at_step=0, die_in_save="yes")  # resumes, dies while saving epoch 2
    assert died.returncode == 3, died.stderr
    assert load_checkpoint(path).info["epoch"] == 1  # the stray temp file is ignored

    finished = run(kill_at_step=0, die_in_save="no")
    assert finished.returncode == 0, finished.stderr
    from safetensors.torch import load_file

    final = load_file(out)
    reference = straight[3][0]
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)
