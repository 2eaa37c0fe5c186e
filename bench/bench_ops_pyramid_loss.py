"""Benchmarks of the pyramid, Fourier loss and anomaly map ops, Triton vs torch.

Run: ``pytest bench/bench_ops_pyramid_loss.py --benchmark-only`` (add
``--benchmark-json out.json`` to keep the numbers). Triton runs on CUDA only (skipped
otherwise); the torch reference runs on CUDA at the full size and on the CPU at a small
size. Each case records ``bytes_moved`` and ``gbytes_per_s`` (bytes / median time) in
``extra_info``: compare with the device's measured bandwidth, the floor of these
memory-bound ops.

Byte counts (``bytes_moved``) are those of the Triton kernels, every tensor read once
and written once (halo re-reads hit the cache), for B x C x H x W latents / inputs with
L levels. With A = B C H W elements, S = sum_{i < L-1} 4^-i (the levels that get composed
or decomposed), T = sum_{i < L} 4^-i (all levels), P = B (B - 1) / 2 pairs, a = H W:

- decompose forward: per level, down reads g and writes g/4; band reads g, g/4, writes
  the band: 3.5 A S elements. Backward (torch, through the max-pool argmax): counted
  at the same 3.5 A S floor.
- compose forward: read the coarse level (1/4) and the band, write the result:
  2.25 A S. Backward (adjoint): read the level's gradient, write the coarser one: 1.25 A S.
- fourier loss forward: pair kernel reads the latents (A T) and writes P a T; compose
  on P planes (2.25 P a S); rfft2 reads P a and writes ~P a (complex, half width);
  the magnitude kernel reads ~P a. Backward: rfft2 recomputed (2 P a), gradient kernel
  (2 P a), irfft2 and its halving (4 P a), adjoint compose (1.25 P a S), pair backward
  reads the latents and P a T gradient, writes the latent gradients (2 A T + P a T).
- anomaly map forward: read latents (A T) and template (A T / B), write B a T; compose
  on B planes (2.25 B a S); the per-row maxima are B a / 64 (left out).

At 1024 x 1024, C = 16, B = 2, L = 4, float32 (A = 33.6 M, a = 1.05 M, S = 1.3125,
T = 1.328): decompose fwd 617 MB, bwd 617 MB; compose fwd 396 MB, bwd 220 MB; fourier
loss fwd 209 MB, bwd 403 MB; anomaly map fwd 303 MB. Running this file as a script
prints them.
"""

from __future__ import annotations

import pyramidflow_kernels as ops
import pytest
import torch
from byte_model import Shape, op_bytes

FULL = (2, 16, 1024, 1024, 4)  # B, C, H, W, L
SMALL = (2, 16, 64, 64, 4)
FLOAT32_BYTES = 4
OPS = ("decompose", "compose", "fourier_loss", "anomaly_map")


def bytes_moved(
    op: str,
    shape: tuple[int, int, int, int, int],
    direction: str = "forward",
    element_bytes: int = FLOAT32_BYTES,
) -> int:
    """Bytes read + written by the Triton path of ``op`` for (B, C, H, W, L): the formulas
    live in ``byte_model.op_bytes``."""
    return op_bytes(op, Shape(*shape, element_bytes=element_bytes), direction)


def _inputs(op: str, shape, device: str, requires_grad: bool):
    """Arguments of ``op`` (a list of tensors per level, or one tensor for decompose)."""
    batch, channels, height, width, levels = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def level(i: int, b: int = batch) -> torch.Tensor:
        size = (b, channels, height >> i, width >> i)
        return torch.randn(size, device=device, generator=gen).requires_grad_(requires_grad)

    if op == "decompose":
        return (level(0), levels)
    pyramid = [level(i) for i in range(levels)]
    if op == "anomaly_map":
        return (pyramid, [level(i, 1)[0].detach() for i in range(levels)])
    return (pyramid,)


def _call(op: str, backend: str, args):
    fn = {
        "decompose": ops.pyramid_decompose,
        "compose": ops.pyramid_compose,
        "fourier_loss": ops.fourier_loss,
        "anomaly_map": ops.anomaly_map,
    }[op]
    return fn(*args, backend=backend)


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


def _record(benchmark, op, shape, direction, backend, device) -> None:
    moved = bytes_moved(op, shape, direction)
    benchmark.extra_info.update(
        op=op, direction=direction, backend=backend, device=device, shape=list(shape)
    )
    benchmark.extra_info["bytes_moved"] = moved
    median = benchmark.stats.stats.median if benchmark.stats else None
    if median:
        benchmark.extra_info["gbytes_per_s"] = moved / median / 1e9


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("backend", "device", "shape"), _cases())
def test_forward(benchmark, op, backend, device, shape):
    args = _inputs(op, shape, device, requires_grad=False)

    def run():
        with torch.no_grad():
            _call(op, backend, args)
        _sync(device)

    run()  # warm-up: compiles the Triton kernels
    benchmark(run)
    _record(benchmark, op, shape, "forward", backend, device)


@pytest.mark.parametrize("op", [op for op in OPS if op != "anomaly_map"])
@pytest.mark.parametrize(("backend", "device", "shape"), _cases())
def test_backward(benchmark, op, backend, device, shape):
    args = _inputs(op, shape, device, requires_grad=True)
    outputs = _call(op, backend, args)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    grads = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outputs]
    leaves = [args[0]] if op == "decompose" else list(args[0])

    def run():
        torch.autograd.grad(outputs, leaves, grads, retain_graph=True)
        _sync(device)

    run()
    benchmark(run)
    _record(benchmark, op, shape, "backward", backend, device)


if __name__ == "__main__":
    for op in OPS:
        for direction in ("forward", "backward"):
            if op == "anomaly_map" and direction == "backward":
                continue
            moved = bytes_moved(op, FULL, direction)
            print(f"{op:13s} {direction:8s} {moved / 1e6:8.0f} MB at {FULL}")
