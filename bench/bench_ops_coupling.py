"""Benchmarks of the affine coupling op (forward and backward), Triton vs torch.

Run: ``pytest bench/bench_ops_coupling.py --benchmark-only`` (add ``--benchmark-json
out.json`` to keep the numbers). Triton runs on CUDA only (skipped otherwise); the torch
reference runs on CUDA at the full size and on the CPU at a small size.

Bytes moved (``bytes_moved``), float32, B x C x H x W target, parameters at the target
resolution (k = 1):

- forward, eval: read x (C) and h = [s_raw, t] (2C), write z (C): 4 C B H W x 4 bytes,
  plus tiny (W, the VN mean). At 1024 x 1024, C = 16, B = 2: 537 MB.
- forward, training: the VN batch mean needs a first pass over s_raw: + C (5 C).
- backward, eval: read grad z, x, h (4C), write grad x, grad h (3C): 7 C.
- backward, training: the VN mean of grad s is a grid-wide reduction, so grad s is
  written raw and corrected by a second pass (read grad s and s_raw, write): 10 C.

``extra_info`` records ``gbytes_per_s`` = bytes_moved / median time, to compare with
the device's measured bandwidth (the floor of a memory-bound op).
"""

from __future__ import annotations

import pyramidflow_kernels as ops
import pytest
import torch
from byte_model import Shape, op_bytes

FULL = (2, 1024, 1024)  # B, H, W
SMALL = (2, 64, 64)
CHANNELS = 16
FLOAT32_BYTES = 4


def bytes_moved(
    shape: tuple[int, int, int], C: int, training: bool, direction: str = "forward"
) -> int:
    """Bytes read + written by the Triton kernels for one call (float32, k = 1): the
    formula lives in ``byte_model.op_bytes``."""
    batch, height, width = shape
    target = Shape(batch=batch, channels=C, height=height, width=width)
    return op_bytes("affine_coupling", target, direction, training=training)


def _inputs(shape, device, volume_norm="CVN"):
    batch, height, width = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, CHANNELS, height, width, device=device, generator=gen)
    h = torch.randn(batch, 2 * CHANNELS, height, width, device=device, generator=gen)
    weight, _ = torch.linalg.qr(torch.randn(CHANNELS, CHANNELS, device=device, generator=gen))
    mean_shape = (1, 1, height, width) if volume_norm == "CVN" else (1, CHANNELS, 1, 1)
    running_mean = torch.zeros(mean_shape, device=device)
    return x, h, weight, running_mean


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cases():
    cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skipif(not cuda, reason="needs a CUDA device")
    try:
        import triton  # noqa: F401

        has_triton = True
    except Exception:  # noqa: BLE001 - any import failure means no Triton
        has_triton = False
    skip_triton = pytest.mark.skipif(not (cuda and has_triton), reason="needs CUDA and Triton")
    return [
        pytest.param("triton", "cuda", FULL, id="triton-cuda-1024", marks=skip_triton),
        pytest.param("torch", "cuda", FULL, id="torch-cuda-1024", marks=skip_gpu),
        pytest.param("torch", "cpu", SMALL, id="torch-cpu-64"),
    ]


def _record(benchmark, shape, training, direction) -> None:
    moved = bytes_moved(shape, CHANNELS, training, direction)
    benchmark.extra_info["bytes_moved"] = moved
    benchmark.extra_info["shape"] = f"{shape[0]}x{CHANNELS}x{shape[1]}x{shape[2]}"
    median = benchmark.stats.stats.median if benchmark.stats else None
    if median:
        benchmark.extra_info["gbytes_per_s"] = moved / median / 1e9


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "device", "shape"), _cases())
def test_coupling_forward(benchmark, backend, device, shape, training):
    x, h, weight, running_mean = _inputs(shape, device)

    def run():
        with torch.no_grad():
            out = ops.affine_coupling(
                x, h, weight, running_mean, volume_norm="CVN", training=training, backend=backend
            )
        _sync(device)
        return out

    run()  # compile / warm up
    benchmark.pedantic(run, rounds=20 if device == "cuda" else 5, warmup_rounds=2)
    _record(benchmark, shape, training, "forward")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "device", "shape"), _cases())
def test_coupling_backward(benchmark, backend, device, shape, training):
    x, h, weight, running_mean = _inputs(shape, device)
    leaves = [t.requires_grad_(True) for t in (x, h, weight)]
    z, _ = ops.affine_coupling(
        *leaves, running_mean, volume_norm="CVN", training=training, backend=backend
    )
    grad_z = torch.randn_like(z)

    def run():
        grads = torch.autograd.grad(z, leaves, grad_z, retain_graph=True)
        _sync(device)
        return grads

    run()
    benchmark.pedantic(run, rounds=20 if device == "cuda" else 5, warmup_rounds=2)
    _record(benchmark, shape, training, "backward")
