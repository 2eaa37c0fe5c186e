"""GPU hazards that show without a GPU: kernels launch on their tensors' device, and no
op waits for the device to compute the mixing matrix's inverse."""

from __future__ import annotations

import ast
import contextlib
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

pytest.importorskip("triton", reason="Triton does not import: the Triton kernels cannot run")

from pyramidflow_kernels import _triton_utils  # noqa: E402
from pyramidflow_kernels.coupling_reference import inverse_matrix  # noqa: E402

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


@pytest.fixture
def entered(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """Devices made current through torch.cuda.device (recorded, nothing switched)."""
    seen: list[torch.device] = []

    @contextlib.contextmanager
    def fake_device(device):
        seen.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return seen


def test_device_guard_takes_the_first_cuda_tensors_device(entered):
    with FakeTensorMode():
        on_second_gpu = torch.empty(4, device="cuda:1")
    with _triton_utils.device_guard((torch.zeros(2), 3, on_second_gpu)):
        pass
    assert entered == [torch.device("cuda:1")]
    with _triton_utils.device_guard((torch.zeros(2), 3)):
        pass
    assert entered == [torch.device("cuda:1")]  # CPU tensors: no device switch


def test_device_guard_is_a_no_op_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with FakeTensorMode():
        on_gpu = torch.empty(4, device="cuda:0")
    with _triton_utils.device_guard((on_gpu,)):  # fake tensors traced on a CPU machine
        pass


def test_compiled_launch_runs_inside_the_device_guard(entered, monkeypatch):
    launched: list[int] = []

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(len(entered))

    monkeypatch.setattr(_triton_utils, "interpreting", lambda: False)
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: Stub())
    with FakeTensorMode():
        x = torch.empty(4, device="cuda:1")
    _triton_utils.launch(object(), (1,), x, BLOCK=4)
    assert launched == [1] and entered == [torch.device("cuda:1")]  # launched while entered


def test_inverse_matrix_is_exact_in_float64():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    weight = (q + 0.1 * torch.randn(16, 16, generator=gen, dtype=torch.float64)).float()
    inverse = inverse_matrix(weight)
    assert inverse.dtype == torch.float64
    eye = torch.eye(16, dtype=torch.float64)
    assert (weight.double() @ inverse - eye).abs().max() < 1e-12


def test_no_op_calls_the_synchronizing_inverse():
    """``torch.linalg.inv`` checks for singular input by waiting for the device (a host
    synchronization per call on CUDA); the ops use ``inverse_matrix`` instead."""
    calls = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "inv":
                calls.append(f"{path.name}:{node.lineno}")
    assert calls == []
