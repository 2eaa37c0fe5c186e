"""Shared test setup: the debug switch off, and a tiny category and model made once per
session (tests must not modify them: copy what they change)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from pyramidflow import Config, Detector
from pyramidflow.synthetic import generate_category

#: The model of ``tiny_model`` as ``pyramidflow train`` flags (32 px, L 3, S 1, C 8, k 3).
TINY_FLAGS = [
    "--image-size", "32", "--levels", "3", "--stacks", "1", "--channels", "8",
    "--kernel-size", "3", "--epochs", "1", "--no-progress",
]  # fmt: skip
TINY_CONFIG = Config(image_size=32, levels=3, stacks=1, channels=8, kernel_size=3, epochs=1)


_TEST_DEVICE = {"device": "cpu"}

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """A module of ``bench/`` by file (``bench`` is not a package), imported once."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the Triton op tests run: cpu (Triton's interpreter), cuda (compiled "
        "kernels) or auto (cuda when TRITON_INTERPRET is unset or 0 and CUDA is available)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Resolve --device before any test module imports Triton (TRITON_INTERPRET is read
    when Triton is imported)."""
    choice = config.getoption("--device")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if choice == "cuda":
        if interpreting:
            raise pytest.UsageError("--device cuda needs TRITON_INTERPRET unset or 0")
        os.environ["TRITON_INTERPRET"] = "0"
    elif choice == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    device = choice
    if choice != "cpu":
        import torch

        if choice == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch sees no CUDA device")
        device = "cuda" if not interpreting and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"
    _TEST_DEVICE["device"] = device


def op_test_device() -> str:
    """The device of the Triton op tests (``--device``): "cpu" runs the kernels in Triton's
    interpreter, "cuda" compiled."""
    return _TEST_DEVICE["device"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI errors as users see them: one line, no traceback (PYRAMIDFLOW_DEBUG unset)."""
    monkeypatch.delenv("PYRAMIDFLOW_DEBUG", raising=False)


@pytest.fixture(scope="session")
def tiny_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 px synthetic "disc" category in the MVTec AD layout: 8 good training images,
    2 good and 1 defective test image per defect type, with masks."""
    root = tmp_path_factory.mktemp("tiny_data")
    return generate_category(
        root, "disc", size=32, n_train=8, n_test_good=2, n_test_defect_per_type=1
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model file trained for one epoch on ``tiny_category`` (``TINY_CONFIG``), with a
    template and a threshold."""
    detector = Detector(TINY_CONFIG).fit(tiny_category)
    assert detector.threshold is not None
    return detector.save(tmp_path_factory.mktemp("tiny_model") / "disc.safetensors")


def render_terminal(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: ``\\r`` returns to the line's start and
    later characters overwrite earlier ones (how progress bars redraw themselves)."""
    lines = []
    for raw in text.split("\n"):
        shown: list[str] = []
        column = 0
        for char in raw:
            if char == "\r":
                column = 0
                continue
            if column < len(shown):
                shown[column] = char
            else:
                shown.append(char)
            column += 1
        lines.append("".join(shown).rstrip())
    return lines


@pytest.fixture
def terminal_lines():
    """:func:`render_terminal`, for tests that check what a user sees beside a bar."""
    return render_terminal
