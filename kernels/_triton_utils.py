"""Small helpers shared by the Triton op modules: launching, registration, tile sizes.

- :func:`launch` starts a kernel through ``torch.library.wrap_triton`` (so that
  ``torch.compile`` / ``torch.export`` capture it) or, under Triton's interpreter
  (``TRITON_INTERPRET=1``), directly: ``wrap_triton`` rejects interpreted kernels.
- :func:`register_op` registers a Python launcher as ``pyramidflow::<name>`` with
  ``torch.library.triton_op`` and, optionally, its backward with ``register_autograd``.
  The same registered op runs eagerly under the interpreter, so CPU tests exercise the
  registration and autograd wiring used on the GPU. Compiling (tracing with fake tensors)
  needs real Triton kernels: under the interpreter :func:`launch` raises a clear error
  there instead of silently skipping the kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from ._backend import interpreting

NAMESPACE = "pyramidflow"

__all__ = [
    "NAMESPACE",
    "acc_dtype",
    "device_guard",
    "launch",
    "register_op",
    "tile_1d",
    "tile_2d",
    "tile_walk",
]


def device_guard(args: tuple) -> contextlib.AbstractContextManager:
    """The CUDA device of the first CUDA tensor in ``args`` made current (Triton launches
    on the current device and its current stream: without this, tensors on cuda:1 would
    be handed to a kernel running on cuda:0); a no-op for CPU tensors, and where CUDA is
    not available (fake CUDA tensors traced on a CPU machine launch nothing)."""
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.device.type == "cuda":
            if not torch.cuda.is_available():
                break
            return torch.cuda.device(arg.device)
    return contextlib.nullcontext()


def launch(kernel: Callable, grid: tuple[int, ...], *args, **constexprs) -> None:
    """Launch ``kernel[grid](*args, **constexprs)``, through ``wrap_triton`` on a GPU, on
    the device of its tensors."""
    if not interpreting():
        with device_guard(args):
            torch.library.wrap_triton(kernel)[grid](*args, **constexprs)
        return
    if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        raise RuntimeError(
            "Triton kernels cannot be traced under TRITON_INTERPRET=1 (torch.compile / export "
            "need compiled kernels): run the op eagerly, or compile on a GPU"
        )
    kernel[grid](*args, **constexprs)


def register_op(
    name: str,
    fn: Callable,
    *,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
) -> Callable:
    """Register ``fn`` (fully type-annotated, no mutation) as ``pyramidflow::<name>``.

    ``backward(ctx, *grads)`` and ``setup_context(ctx, inputs, output)`` follow
    ``torch.library.register_autograd``. Returns the callable op.
    """
    qualname = f"{NAMESPACE}::{name}"
    op = torch.library.triton_op(qualname, fn, mutates_args=())
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    return op


def register_unary_op(
    name: str,
    forward: Callable[[torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Register ``pyramidflow::<name>`` (y = forward(x)) with its gradient op
    ``<name>_backward`` (grad_x = backward(grad_y, x)); the input is saved for backward."""

    def forward_fn(x: torch.Tensor) -> torch.Tensor:
        return forward(x)

    def backward_fn(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return backward(grad, x)

    backward_op = register_op(f"{name}_backward", backward_fn)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    def autograd_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return backward_op(grad, x)

    return register_op(name, forward_fn, backward=autograd_backward, setup_context=setup_context)


def acc_dtype(dtype: torch.dtype):
    """Accumulation dtype for a kernel on ``dtype``: float64 stays float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile_2d(rows: int, width: int, max_rows: int = 16) -> tuple[int, int]:
    """Power-of-two (BLOCK_H, BLOCK_W) for ``rows`` x ``width`` outputs: ``max_rows`` x 64 on
    a GPU; up to 128 x 128 under the interpreter, whose cost grows with the number of programs."""
    max_h, max_w = (128, 128) if interpreting() else (max_rows, 64)
    block_h = min(max_h, triton.next_power_of_2(max(rows, 1)))
    block_w = min(max_w, triton.next_power_of_2(max(width, 1)))
    return block_h, block_w


def tile_1d(n: int, max_block: int = 1024) -> int:
    """Power-of-two block for ``n`` elements, capped at ``max_block`` (x16 when interpreting)."""
    cap = max_block * 16 if interpreting() else max_block
    return min(cap, triton.next_power_of_2(max(n, 1)))


def tile_walk(planes: int, rows: int, width: int) -> tuple[int, int, int]:
    """(SEGMENTS, ROWS, BLOCK_W) for a kernel that walks down segments of ``ROWS`` rows of
    ``planes`` planes of ``rows`` x ``width``, one column per lane and SEGMENTS segments
    per tile. On a GPU: 128 lanes (several segments per tile when planes are narrow) and
    segments of up to 32 rows, equal in length; under the interpreter, whose cost grows
    with the number of operations a program runs, short segments and large tiles."""
    if interpreting():
        lanes, max_rows = 16384, 4
    else:
        lanes, max_rows = 128, 32
    segment_rows = triton.cdiv(rows, triton.cdiv(rows, max_rows)) if rows else 1
    block_w = min(lanes, triton.next_power_of_2(max(width, 1)))
    segments = lanes // block_w
    if interpreting():  # all 128 lanes on a GPU, even past the last segment: with fewer,
        # Triton spreads a lane's vector over threads and the loads turn scalar
        count = planes * triton.cdiv(rows, segment_rows)
        segments = min(segments, triton.next_power_of_2(max(count, 1)))
    return segments, segment_rows, block_w
