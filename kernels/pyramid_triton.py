"""Triton Laplacian pyramid: decompose and compose, forward and backward.

Same signatures and semantics as :mod:`pyramid_reference` (the oracle). NCHW tensors are
seen as N*C independent planes stacked vertically; every kernel works on a 2D tile of
that stack (a tile may span several small planes), with the zero padding of each plane
done by masked loads. Two kernels do all the work:

- ``_window_kernel`` (one coarse column per lane, a tile of planes x columns walking down
  the coarse rows) needs the 6x6 fine window rows/cols 2p-2 .. 2p+3 around the 2x2 block
  of coarse pixel p. It loads each fine row once per tile, as three two-pixel vector
  loads per lane (columns 2q-2 .. 2q+3), blurs it horizontally, keeps the last four
  rows' sums in registers for the vertical taps, and either
  * ``MODE_BLUR_MAX``: blurs the four fine pixels of the block (separable 5x5 binomial,
    zero pad 2) and keeps their max: ``Down(g) = maxpool2x2(G(g))`` in one pass, with
    torch's max-pool rule (first maximum in row-major order; NaN propagates); or
  * ``MODE_ROUTE`` (Down's backward): the same blur and rule, writing the coarse
    gradient to the fine pixel the max came from (zeros elsewhere); or
  * ``MODE_UP_ADJOINT``: applies the adjoint of ``Up`` (blur, then sum over 2x2
    replication blocks), a separable 6x6 stencil with taps [1, 5, 10, 10, 5, 1] / 16.
- ``_up_kernel`` (one fine pixel per lane) computes ``Up(c) = G(replicate2x(c))`` from the
  coarse grid directly: after replication, the 5-tap binomial at fine row y = 2p + phase
  touches coarse rows p-1, p, p+1 with taps (5, 10, 1) / 16 (even phase) or
  (1, 10, 5) / 16 (odd phase); zero padding at the fine resolution is zero padding of the
  coarse grid because H and W are even. It writes ``fine + Up(c)`` or ``fine - Up(c)``
  (band = g - Up(g_next) of decompose, r = Up(r) + band of compose), optionally with
  per-row maxima of the result (used by the anomaly map's image score; NaN propagates,
  as in torch's amax).

Per level, decompose is ``_window_kernel`` (blur + max) then ``_up_kernel`` (subtract);
compose is one ``_up_kernel`` (add). Compose is linear: its backward is its adjoint, one
``_window_kernel`` (up-adjoint) per level. Down's backward (never needed by the model,
whose pyramid input is frozen) routes the gradient through the max-pool with
``_window_kernel`` (route), which recomputes the blur exactly as the forward did, so
near-ties go to the pixel the forward chose, then blurs it back with
``pyramid_reference.blur`` (the blur is self-adjoint).

Each per-level primitive is registered with ``torch.library.triton_op`` as
``pyramidflow::pyramid_down`` (its backward's routing: ``pyramid_down_route``),
``pyramidflow::pyramid_up_add`` and ``pyramidflow::pyramid_up_adjoint``, each with
``register_autograd``; the public
functions chain them in Python, so ``torch.compile`` sees through them on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._triton_utils import acc_dtype, launch, register_op, tile_2d, tile_walk
from .pyramid_reference import blur, check_pyramid_input

__all__ = ["pyramid_compose", "pyramid_decompose", "up_add", "up_adjoint", "down"]

MODE_BLUR_MAX = 0
MODE_UP_ADJOINT = 1
MODE_ROUTE = 2

# --------------------------------------------------------------------------- kernels


@triton.jit
def _fine_row(src, y, x, H, W, live, left_ok, center_ok, right_ok, ACC: tl.constexpr):
    """Fine row y ([S, 1, 1]: one row per segment) at columns 2q-2 .. 2q+3 of every lane,
    as three column pairs (left, center, right), each a vector load of two contiguous
    pixels; zero outside the plane. ``x = 2q + (0, 1)`` along the last axis, ``src``
    points at each segment's plane, the ``*_ok`` masks say which pairs lie in the row."""
    row = src + y * W + x
    inside = live & (y >= 0) & (y < H)
    left = tl.load(row - 2, mask=inside & left_ok, other=0.0).to(ACC)
    center = tl.load(row, mask=inside & center_ok, other=0.0).to(ACC)
    right = tl.load(row + 2, mask=inside & right_ok, other=0.0).to(ACC)
    v0, v1 = tl.split(left)
    v2, v3 = tl.split(center)
    v4, v5 = tl.split(right)
    return v0, v1, v2, v3, v4, v5


@triton.jit
def _row_blur2(src, y, x, H, W, live, left_ok, center_ok, right_ok, ACC: tl.constexpr):
    """Unscaled horizontal binomial of fine row y at columns 2q and 2q+1."""
    v0, v1, v2, v3, v4, v5 = _fine_row(src, y, x, H, W, live, left_ok, center_ok, right_ok, ACC)
    even = v0 + 4.0 * v1 + 6.0 * v2 + 4.0 * v3 + v4
    odd = v1 + 4.0 * v2 + 6.0 * v3 + 4.0 * v4 + v5
    return even, odd


@triton.jit
def _row_adjoint(src, y, x, H, W, live, left_ok, center_ok, right_ok, ACC: tl.constexpr):
    """Unscaled up-adjoint taps [1, 5, 10, 10, 5, 1] over fine columns 2q-2 .. 2q+3."""
    v0, v1, v2, v3, v4, v5 = _fine_row(src, y, x, H, W, live, left_ok, center_ok, right_ok, ACC)
    return (v0 + v5) + 5.0 * (v1 + v4) + 10.0 * (v2 + v3)


@triton.jit
def _pool_pick(best, index, value, position: tl.constexpr):
    """One step of torch's max-pool scan: a larger value or a NaN takes over."""
    take = (value > best) | (value != value)
    return tl.where(take, value, best), tl.where(take, position, index)


@triton.jit
def _max_pool_2x2(v0, v1, v2, v3):
    """(max, its position 0..3) of a 2x2 window in row-major order, chosen as torch's
    max_pool2d does: the first maximum, and NaN (the last one) over any number. The
    forward and the backward of ``down`` both use it, so the gradient goes to the pixel
    whose value the forward returned, ties and NaNs included."""
    index = tl.zeros(v0.shape, dtype=tl.int32)
    best, index = _pool_pick(v0, index, v1, 1)
    best, index = _pool_pick(best, index, v2, 2)
    best, index = _pool_pick(best, index, v3, 3)
    return best, index


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN, as torch's amax (``tl.max`` drops NaNs)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _window_kernel(
    src_ptr,
    dst_ptr,
    grad_ptr,
    N,
    Ho,
    Wo,
    ROWS,
    MODE: tl.constexpr,
    SEGMENTS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ACC: tl.constexpr,
):
    """Coarse (Ho x Wo) output from the 6x6 fine window of each coarse pixel; with
    ``MODE_ROUTE``, the fine (2Ho x 2Wo) gradient of the max-pool instead: each coarse
    pixel's ``grad`` goes to the fine pixel that ``MODE_BLUR_MAX`` took the max of.

    A plane's coarse rows are cut in segments of ROWS rows; a tile is SEGMENTS segments
    (of any planes) x BLOCK_W coarse columns, and walks down its segments' rows together.
    Each fine row is loaded once per segment (three two-pixel vector loads per lane) and
    blurred horizontally; the last four rows' sums stay in registers for the vertical
    taps and the 2x2 reduction. The fine sizes are even by construction (H = 2 Ho,
    W = 2 Wo), which lets the pair loads vectorize."""
    chunks = tl.cdiv(Ho, ROWS)
    seg = tl.program_id(0) * SEGMENTS + tl.arange(0, SEGMENTS)[:, None]
    live = seg < N * chunks  # [SEGMENTS, 1]
    plane = (seg // chunks).to(tl.int64)
    p_start = ((seg % chunks) * ROWS).to(tl.int32)
    q = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]  # [1, BLOCK_W]
    H = 2 * Ho
    W = 2 * Wo
    # [SEGMENTS, BLOCK_W, 2]: the fine column pairs (2q, 2q + 1) of every lane
    q3 = q[:, :, None]
    x = 2 * q3 + tl.arange(0, 2)[None, None, :]
    live3 = live[:, :, None]
    left_ok = (q3 >= 1) & (q3 <= Wo)
    center_ok = q3 < Wo
    right_ok = q3 + 1 < Wo
    src = src_ptr + plane[:, :, None] * H * W
    coarse = plane * Ho * Wo + q  # [SEGMENTS, BLOCK_W] offsets of row 0
    y = 2 * p_start[:, :, None] - 2
    if MODE == 1:
        r0 = _row_adjoint(src, y, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
        r1 = _row_adjoint(src, y + 1, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
        r2 = _row_adjoint(src, y + 2, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
        r3 = _row_adjoint(src, y + 3, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
        for step in range(ROWS):
            p = p_start + step
            y = 2 * p[:, :, None] - 2
            r4 = _row_adjoint(src, y + 4, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
            r5 = _row_adjoint(src, y + 5, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
            result = ((r0 + r5) + 5.0 * (r1 + r4) + 10.0 * (r2 + r3)) * (1.0 / 256.0)
            out_mask = live & (p < Ho) & (q < Wo)
            tl.store(dst_ptr + coarse + p * Wo, result.to(dst_ptr.dtype.element_ty), out_mask)
            r0, r1, r2, r3 = r2, r3, r4, r5
    else:
        e0, o0 = _row_blur2(src, y, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
        e1, o1 = _row_blur2(src, y + 1, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
        e2, o2 = _row_blur2(src, y + 2, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
        e3, o3 = _row_blur2(src, y + 3, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
        for step in range(ROWS):
            p = p_start + step
            y = 2 * p[:, :, None] - 2
            e4, o4 = _row_blur2(src, y + 4, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
            e5, o5 = _row_blur2(src, y + 5, x, H, W, live3, left_ok, center_ok, right_ok, ACC)
            top_left = e0 + 4.0 * e1 + 6.0 * e2 + 4.0 * e3 + e4
            top_right = o0 + 4.0 * o1 + 6.0 * o2 + 4.0 * o3 + o4
            bottom_left = e1 + 4.0 * e2 + 6.0 * e3 + 4.0 * e4 + e5
            bottom_right = o1 + 4.0 * o2 + 6.0 * o3 + 4.0 * o4 + o5
            result, index = _max_pool_2x2(top_left, top_right, bottom_left, bottom_right)
            out_mask = live & (p < Ho) & (q < Wo)
            if MODE == 0:
                result = result * (1.0 / 256.0)
                out = dst_ptr + coarse + p * Wo
                tl.store(out, result.to(dst_ptr.dtype.element_ty), out_mask)
            else:
                g = tl.load(grad_ptr + coarse + p * Wo, mask=out_mask, other=0.0)
                zero = tl.zeros(g.shape, dtype=g.dtype)
                top = tl.join(tl.where(index == 0, g, zero), tl.where(index == 1, g, zero))
                bottom = tl.join(tl.where(index == 2, g, zero), tl.where(index == 3, g, zero))
                fine = dst_ptr + plane[:, :, None] * H * W + (y + 2) * W + x
                tl.store(fine, top, out_mask[:, :, None])
                tl.store(fine + W, bottom, out_mask[:, :, None])
            e0, e1, e2, e3 = e2, e3, e4, e5
            o0, o1, o2, o3 = o2, o3, o4, o5


@triton.jit
def _coarse_row3(ptr, p, q, Hc, Wc, w_left, w_right, ACC: tl.constexpr):
    """Unscaled horizontal up-taps (w_left, 10, w_right) at coarse columns q-1, q, q+1."""
    inside = (p >= 0) & (p < Hc)
    row = ptr + p * Wc
    left = tl.load(row + q - 1, mask=inside & (q >= 1) & (q - 1 < Wc), other=0.0).to(ACC)
    mid = tl.load(row + q, mask=inside & (q < Wc), other=0.0).to(ACC)
    right = tl.load(row + q + 1, mask=inside & (q + 1 < Wc), other=0.0).to(ACC)
    return w_left * left + 10.0 * mid + w_right * right


@triton.jit
def _up_kernel(
    coarse_ptr,
    fine_ptr,
    out_ptr,
    max_ptr,
    N,
    H,
    W,
    SIGN: tl.constexpr,
    HAS_FINE: tl.constexpr,
    WRITE_MAX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ACC: tl.constexpr,
):
    """out = fine + SIGN * Up(coarse) on a tile of N stacked H x W planes (fine optional);
    with WRITE_MAX, the max of each tile row goes to ``max_ptr[row, program_id(1)]``."""
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    rows = row_ids[:, None]
    x = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    live = rows < N * H
    plane = tl.minimum(rows // H, N - 1)  # rows past the end re-read the last plane
    y = (rows % H).to(tl.int32)
    Hc = H // 2
    Wc = W // 2
    p = y // 2
    q = x // 2
    y_even = (y % 2) == 0
    x_even = (x % 2) == 0
    wy_up = tl.where(y_even, 5.0, 1.0)
    wy_down = tl.where(y_even, 1.0, 5.0)
    wx_left = tl.where(x_even, 5.0, 1.0)
    wx_right = tl.where(x_even, 1.0, 5.0)
    coarse = coarse_ptr + plane * Hc * Wc
    above = _coarse_row3(coarse, p - 1, q, Hc, Wc, wx_left, wx_right, ACC)
    center = _coarse_row3(coarse, p, q, Hc, Wc, wx_left, wx_right, ACC)
    below = _coarse_row3(coarse, p + 1, q, Hc, Wc, wx_left, wx_right, ACC)
    value = (wy_up * above + 10.0 * center + wy_down * below) * (SIGN / 256.0)
    mask = live & (x < W)
    offs = rows * W + x
    if HAS_FINE:
        value += tl.load(fine_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_MAX:
        row_max = tl.reduce(tl.where(mask, value, float("-inf")), 1, _max_nan)
        slots = max_ptr + row_ids * tl.num_programs(1) + tl.program_id(1)
        tl.store(slots, row_max.to(max_ptr.dtype.element_ty), mask=row_ids < N * H)


# --------------------------------------------------------------------------- launchers


def _planes(x: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() < 2:
        raise ValueError(f"expected (..., H, W) planes, got shape {tuple(x.shape)}")
    height, width = x.shape[-2], x.shape[-1]
    return (x.numel() // (height * width) if x.numel() else 0), height, width


def window_launch(src: torch.Tensor, mode: int, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Down (``MODE_BLUR_MAX``) or Up-adjoint (``MODE_UP_ADJOINT``) of (..., H, W) planes;
    ``MODE_ROUTE``: the (..., H, W) max-pool gradient of Down at ``src`` for the coarse
    gradient ``grad`` (blur it to get the gradient of Down)."""
    src = src.contiguous()
    n, height, width = _planes(src)
    if height % 2 or width % 2:
        raise ValueError(f"plane size must be even, got {height}x{width}")
    coarse_shape = (*src.shape[:-2], height // 2, width // 2)
    if mode == MODE_ROUTE:
        if grad is None or tuple(grad.shape) != coarse_shape:
            got = None if grad is None else tuple(grad.shape)
            raise ValueError(f"routing needs a gradient of shape {coarse_shape}, got {got}")
        grad = grad.to(src.dtype).contiguous()
        out = torch.empty_like(src)
    else:
        out = src.new_empty(coarse_shape)
    if n == 0:
        return out
    segments, rows, block_w = tile_walk(n, height // 2, width // 2)
    chunks = triton.cdiv(height // 2, rows)
    grid = (triton.cdiv(n * chunks, segments), triton.cdiv(width // 2, block_w))
    launch(
        _window_kernel,
        grid,
        src,
        out,
        grad if grad is not None else src,
        n,
        height // 2,
        width // 2,
        rows,
        MODE=mode,
        SEGMENTS=segments,
        BLOCK_W=block_w,
        ACC=acc_dtype(src.dtype),
    )
    return out


def up_launch(
    coarse: torch.Tensor,
    fine: torch.Tensor | None,
    *,
    subtract: bool = False,
    with_max: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fine +/- Up(coarse)`` (just ``Up(coarse)`` when ``fine`` is None) and, with
    ``with_max``, partial maxima of the result: (N planes, H * column tiles); their max
    over the last axis is each plane's max."""
    coarse = coarse.contiguous()
    shape = (*coarse.shape[:-2], 2 * coarse.shape[-2], 2 * coarse.shape[-1])
    if fine is not None:
        if tuple(fine.shape) != shape:
            raise ValueError(
                f"level sizes do not match: coarse {tuple(coarse.shape)} needs a finer "
                f"level of shape {shape}, got {tuple(fine.shape)}"
            )
        fine = fine.contiguous()
        out = torch.empty_like(fine)
    else:
        out = coarse.new_empty(shape)
    n, height, width = _planes(out)
    block_h, block_w = tile_2d(n * height, width)
    grid = (triton.cdiv(n * height, block_h), triton.cdiv(width, block_w))
    maxima = out.new_empty((n, height * grid[1])) if with_max else None
    if n:
        launch(
            _up_kernel,
            grid,
            coarse,
            fine if fine is not None else out,
            out,
            maxima if maxima is not None else out,
            n,
            height,
            width,
            SIGN=-1.0 if subtract else 1.0,
            HAS_FINE=fine is not None,
            WRITE_MAX=with_max,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            ACC=acc_dtype(out.dtype),
        )
    return out, maxima


# --------------------------------------------------------------------------- registered ops


def _down_fn(x: torch.Tensor) -> torch.Tensor:
    return window_launch(x, MODE_BLUR_MAX)


def _down_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _down_route_fn(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return window_launch(x, MODE_ROUTE, grad)


def _down_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    """Route through the max-pool with the forward's own rule and arithmetic (a Triton
    pass), then blur: the blur is self-adjoint."""
    (x,) = ctx.saved_tensors
    routed = _down_route_op(grad, x)
    channels = x.shape[-3] if x.dim() > 2 else 1
    return blur(routed.reshape(-1, channels, *x.shape[-2:])).reshape(x.shape)


def _up_add_fn(coarse: torch.Tensor, fine: torch.Tensor | None, subtract: bool) -> torch.Tensor:
    return up_launch(coarse, fine, subtract=subtract)[0]


def _up_add_setup(ctx, inputs, output) -> None:
    ctx.has_fine = inputs[1] is not None
    ctx.subtract = inputs[2]


def _up_add_backward(ctx, grad: torch.Tensor):
    grad_coarse = up_adjoint(grad)
    if ctx.subtract:
        grad_coarse = -grad_coarse
    return grad_coarse, (grad if ctx.has_fine else None), None


def _up_adjoint_fn(fine: torch.Tensor) -> torch.Tensor:
    return window_launch(fine, MODE_UP_ADJOINT)


def _up_adjoint_setup(ctx, inputs, output) -> None:
    pass


def _up_adjoint_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    return up_add(grad, None)


_down_route_op = register_op("pyramid_down_route", _down_route_fn)
_down_op = register_op("pyramid_down", _down_fn, backward=_down_backward, setup_context=_down_setup)
_up_add_op = register_op(
    "pyramid_up_add", _up_add_fn, backward=_up_add_backward, setup_context=_up_add_setup
)
_up_adjoint_op = register_op(
    "pyramid_up_adjoint",
    _up_adjoint_fn,
    backward=_up_adjoint_backward,
    setup_context=_up_adjoint_setup,
)


def down(x: torch.Tensor) -> torch.Tensor:
    """``maxpool2x2(G(x))`` of (..., H, W) planes (differentiable)."""
    return _down_op(x)


def up_add(coarse: torch.Tensor, fine: torch.Tensor | None, subtract: bool = False) -> torch.Tensor:
    """``fine + Up(coarse)`` (``fine - Up(coarse)`` with ``subtract``; ``Up(coarse)`` when
    ``fine`` is None), differentiable."""
    return _up_add_op(coarse, fine, subtract)


def up_adjoint(fine: torch.Tensor) -> torch.Tensor:
    """Adjoint of ``Up``: blur then sum over 2x2 blocks (differentiable)."""
    return _up_adjoint_op(fine)


# --------------------------------------------------------------------------- public


def pyramid_decompose(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Triton :func:`pyramid_reference.decompose`: ``levels`` bands, finest first."""
    check_pyramid_input(x, levels)
    bands = []
    gaussian = x
    for _ in range(levels - 1):
        coarser = down(gaussian)
        bands.append(up_add(coarser, gaussian, subtract=True))
        gaussian = coarser
    bands.append(gaussian)
    return bands


def pyramid_compose(bands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Triton :func:`pyramid_reference.compose`: r = band[L-1]; r = Up(r) + band[i]."""
    if len(bands) == 0:
        raise ValueError("pyramid_compose needs at least one band")
    result = bands[-1]
    for band in reversed(bands[:-1]):
        result = up_add(result, band)
    return result
