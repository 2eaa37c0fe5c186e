"""Numerical health: reconstruction error of inverse(forward(x)) and the ``check`` command."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyramidflow import Config, PyramidFlow
from pyramidflow.cli import check as check_command
from pyramidflow.health import (
    DEFAULT_THRESHOLD,
    NumericalHealthWarning,
    check_reconstruction,
    reconstruction_error,
)
from pyramidflow.io.checkpoint import save_checkpoint
from pyramidflow.training import loop

TINY = dict(image_size=32, levels=3, stacks=1, channels=8, kernel_size=3, epochs=1)


def _images(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def trained() -> PyramidFlow:
    torch.manual_seed(0)
    model = PyramidFlow(Config(**TINY, lr=1e-3))
    loop.train(model, _images(6))
    return model


def _broken(model: PyramidFlow, log_scale_mean: float) -> PyramidFlow:
    """A copy whose first block squashes its target level by exp(-log_scale_mean)."""
    clone = PyramidFlow(model.config)
    clone.load_state_dict(model.state_dict())
    clone.blocks[0].running_mean.fill_(log_scale_mean)
    return clone.eval()


def test_a_healthy_model_reconstructs_to_float_rounding(trained: PyramidFlow) -> None:
    trained.train()
    errors = reconstruction_error(trained, _images(), batch_size=2)
    assert errors.shape == (5,) and errors.dtype == torch.float64
    assert (errors < 1e-5).all(), errors
    assert (errors > 0).any()  # it measures something: float32 rounding is not zero
    assert trained.training  # the caller's mode is restored

    # the reference: the relative L2 distance, computed directly on the same batch
    trained.eval()
    with torch.no_grad():
        x = _images()[:2]
        diff = trained.inverse(trained(x)).double() - trained.inconv(x).double()
        direct = diff[1].norm() / trained.inconv(x)[1].double().norm()
    torch.testing.assert_close(errors[1], direct, rtol=1e-9, atol=0)


def test_squashed_or_overflowing_scales_are_flagged(trained: PyramidFlow) -> None:
    squashed = reconstruction_error(_broken(trained, 40.0), _images())
    assert (squashed > 1e-2).all(), squashed  # exp(-40) wipes the level out in float32
    overflow = reconstruction_error(_broken(trained, -200.0), _images())
    assert torch.isinf(overflow).all()  # exp(200) overflows float32: reported as inf

    with pytest.warns(NumericalHealthWarning, match="5 of 5 image"):
        check_reconstruction(_broken(trained, 40.0), _images())
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalHealthWarning)
        check_reconstruction(trained, _images())  # healthy: no warning


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyramidflow")
    check_command.add_command(parser.add_subparsers(dest="command", required=True))
    return parser


def _write_images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_check_command_prints_errors_and_fails_above_threshold(
    trained: PyramidFlow, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _write_images(tmp_path / "images")
    healthy = save_checkpoint(tmp_path / "ok.safetensors", trained)
    broken = save_checkpoint(tmp_path / "bad.safetensors", _broken(trained, 40.0))

    args = _parser().parse_args(["check", str(healthy), str(tmp_path / "images")])
    assert args.threshold == DEFAULT_THRESHOLD
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:3]] == [str(p) for p in paths]
    assert all(float(line.split()[1]) < 1e-5 for line in lines[:3])
    assert lines[3].startswith("0 of 3 image(s) above 0.001")

    args = _parser().parse_args(["check", str(broken), str(paths[0]), "--threshold", "1e-3"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "ABOVE THRESHOLD" in out and out.splitlines()[-1].startswith("1 of 1 image(s) above")

    for bad in ("0", "-1", "abc"):
        with pytest.raises(SystemExit) as exc:
            _parser().parse_args(["check", str(healthy), str(paths[0]), "--threshold", bad])
        assert exc.value.code == 2
