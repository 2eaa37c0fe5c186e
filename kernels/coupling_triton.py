"""Triton affine coupling with volume normalization and 1x1 mixing, forward and backward.

Same signatures and semantics as :mod:`coupling_reference` (the oracle). Per call:

- training only: ``_vn_sum_kernel`` reduces the soft-clamped log-scales to the VN batch
  mean (CVN: per pixel over batch and channels; SVN: per-program partial sums per
  channel, finished in torch; deterministic, no atomics);
- ``_coupling_fwd_kernel``: one pass over a tile of target pixels, all channels: soft
  clamp, VN subtraction, nearest pick of every k-th parameter pixel, exp, affine, and
  the C x C mixing (an unrolled exact fp32 FMA reduction over input channels), storing z;
- ``_coupling_inv_kernel``: the inverse (W^-1 from torch in float64) in one pass;
- ``_coupling_recompute_kernel``: one step of the recompute backward, the inverse and then
  the forward's backward from the x it stores, in one pass (for CVN at batch 2-4 it also
  reduces the VN batch mean at its pixels, so no ``_vn_sum_kernel`` launch).

Backward recomputes y from the saved inputs (nothing per pixel is saved): one kernel
writes the grads of x (or z), both halves of h, and per-program partial sums of the
weight gradient and of the VN correction; in training a second elementwise kernel
applies the batch-mean correction ``g_s - mean(g_s)`` and the soft-clamp derivative.

Forward, inverse and both backwards are ``torch.library.triton_op``s
(``pyramidflow::affine_coupling[_inverse][_backward]``, via ``_triton_utils.register_op``)
with ``register_autograd``, so ``torch.compile`` / ``torch.export`` see through them; under
``TRITON_INTERPRET=1`` the same ops run eagerly and launch the kernels directly.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._backend import interpreting
from ._triton_utils import acc_dtype, launch, register_op
from .coupling_reference import SOFT_CLAMP_GAIN, inverse_matrix, vn_dims

__all__ = ["affine_coupling", "affine_coupling_inverse"]  # and the registered ops

_TILE_ELEMENTS = 4096  # channels x pixels held by one forward program
_MAX_BLOCK_P = 1024
_LANES = 32 * 4  # threads of a program (4 warps, Triton's default)
_CHUNK = 16  # float32 channels per run-time chunk of the coupling kernels (not VN passes)
_CHUNK_BUDGET = 16  # 4-byte elements of each [chunk, BLOCK_P] tile per thread (~6 live)
# Largest batch whose CVN mean the recompute kernel reduces itself: each program reads the
# s rows of all B images at its pixels (B times _vn_sum_kernel's reads, the repeats from
# the cache: the programs of one tile are adjacent); larger batches launch _vn_sum_kernel.
# So does B = 1 (a Triton constant then): that specialization spilled 8 B on sm_80.
_MEAN_HERE_MAX_BATCH = 4

# --------------------------------------------------------------------------- kernels


@triton.jit
def _atan(x):
    """Single-precision arctangent (Cephes-style range reduction and odd polynomial);
    libdevice is not available in the interpreter, so both paths share this code."""
    a = tl.abs(x)
    big = a > 2.414213562373095  # tan(3 pi / 8)
    mid = a > 0.4142135623730950  # tan(pi / 8)
    safe = tl.where(big, a, 1.0)
    u = tl.where(big, -1.0 / safe, tl.where(mid, (a - 1.0) / (a + 1.0), a))
    base = tl.where(big, 1.5707963267948966, tl.where(mid, 0.7853981633974483, 0.0))
    u2 = u * u
    poly = ((8.05374449538e-2 * u2 - 1.38776856032e-1) * u2 + 1.99777106478e-1) * u2
    r = base + ((poly - 3.33329491539e-1) * u2 * u + u)
    return tl.where(x < 0, -r, r)


@triton.jit
def _soft_clamp(s_raw, clamp, GAIN: tl.constexpr):
    return clamp * GAIN * _atan(s_raw / clamp)


@triton.jit
def _soft_clamp_grad(s_raw, clamp, GAIN: tl.constexpr):
    r = s_raw / clamp
    return GAIN / (1.0 + r * r)


@triton.jit
def _param_offsets(p, W, WP, KH: tl.constexpr, KW: tl.constexpr):
    """Flat offset in the parameter plane of target pixel p (every k-th pixel)."""
    if KH == 1 and KW == 1:
        q = p
    else:
        i = p // W
        j = p - i * W
        q = i * KH * WP + j * KW
    return q


@triton.jit
def _vn_sum_kernel(
    h_ptr, part_ptr, C, HWP, n_tiles, clamp,
    CP: tl.constexpr, CVN: tl.constexpr, GAIN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Sums of soft_clamp(s_raw) over a tile of the parameter plane of one image.

    CVN: over channels, per pixel -> part[b, q]. SVN: over pixels, per channel ->
    part[b * n_tiles + tile, c]."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q = tile * BLOCK + tl.arange(0, BLOCK)
    ch = tl.arange(0, CP)
    mask = (ch[:, None] < C) & (q[None, :] < HWP)
    s_rows = h_ptr + (b * (2 * C) + ch[:, None]) * HWP  # int64: 2C HWP passes 2^31
    s_raw = tl.load(s_rows + q[None, :], mask=mask, other=0.0).to(ACC)
    s = tl.where(mask, _soft_clamp(s_raw, clamp, GAIN), 0.0)
    if CVN:
        tl.store(part_ptr + b * HWP + q, tl.sum(s, axis=0), mask=q < HWP)
    else:
        row = (b * n_tiles + tile) * CP
        tl.store(part_ptr + row + ch, tl.sum(s, axis=1))


@triton.jit
def _load_log_scale_shift(
    h_ptr, mean_ptr, b, p, ch, C, HW, W, HWP, WP, clamp,
    CVN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, GAIN: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """[CP, BLOCK_P] tiles of s_raw, VN-centred log-scale s and shift t at target pixels p
    of image b (int64)."""
    q = _param_offsets(p, W, WP, KH, KW)
    mask = (ch[:, None] < C) & (p[None, :] < HW)
    # plane starts in int64 ([CP, 1] columns: 2C HWP passes 2^31 at C = 64, 8192 px)
    s_rows = h_ptr + (b * (2 * C) + ch[:, None]) * HWP
    t_rows = h_ptr + (b * (2 * C) + C + ch[:, None]) * HWP
    s_raw = tl.load(s_rows + q[None, :], mask=mask, other=0.0).to(ACC)
    shift = tl.load(t_rows + q[None, :], mask=mask, other=0.0).to(ACC)
    if CVN:
        mean = tl.load(mean_ptr + q, mask=p < HW, other=0.0).to(ACC)[None, :]
    else:
        mean = tl.load(mean_ptr + ch, mask=ch < C, other=0.0).to(ACC)[:, None]
    log_scale = tl.where(mask, _soft_clamp(s_raw, clamp, GAIN) - mean, 0.0)
    return s_raw, log_scale, shift


@triton.jit
def _coupling_fwd_kernel(
    x_ptr, h_ptr, w_ptr, mean_ptr, z_ptr, C, HW, W, HWP, WP, clamp,
    CP: tl.constexpr, CVN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    GAIN: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """z = W (exp(s) x + t) for a tile of pixels of one image, in run-time chunks of CP
    output channels: a run-time loop over the C input channels computes one row of
    y = exp(s) x + t at a time and mixes it into the chunk's rows of z, so the code does
    not grow with C (beyond 16 channels, y is recomputed once per chunk)."""
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HW
    q = _param_offsets(p, W, WP, KH, KW)
    if CVN:
        mean_pix = tl.load(mean_ptr + q, mask=pm, other=0.0).to(ACC)
    for first in range(0, C, CP):
        rows = first + tl.arange(0, CP)
        z = tl.zeros([CP, BLOCK_P], dtype=ACC)
        # int64 plane starts, then pointers stepped by a plane: C HW passes 2^31
        x_c = x_ptr + b * C * HW + p
        s_c = h_ptr + b * (2 * C) * HWP + q
        t_c = h_ptr + (b * (2 * C) + C) * HWP + q
        for c in range(C):
            x_row = tl.load(x_c, mask=pm, other=0.0).to(ACC)
            s_raw = tl.load(s_c, mask=pm, other=0.0).to(ACC)
            t_row = tl.load(t_c, mask=pm, other=0.0).to(ACC)
            if CVN:
                mean = mean_pix
            else:
                mean = tl.load(mean_ptr + c).to(ACC)
            y_c = tl.exp(_soft_clamp(s_raw, clamp, GAIN) - mean) * x_row + t_row
            w_col = tl.load(w_ptr + rows * C + c, mask=rows < C, other=0.0).to(ACC)
            z += w_col[:, None] * y_c[None, :]
            x_c += HW
            s_c += HWP
            t_c += HWP
        out = z_ptr + (b * C + rows[:, None]) * HW + p[None, :]  # int64 [CP, 1], then + p
        tl.store(out, z.to(z_ptr.dtype.element_ty), mask=(rows[:, None] < C) & pm[None, :])


@triton.jit
def _store_h_grads(
    gh_ptr, gpart_ptr, b, tile, n_tiles, p, rows, g_s, g_t, s_raw, C, HW, W, HWP, WP, clamp,
    CVN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, GAIN: tl.constexpr,
    FINAL: tl.constexpr,
):  # fmt: skip
    """Store grad h of channels ``rows`` at the picked pixels: [g_s * clamp', g_t] when
    FINAL (eval), else the raw g_s, and for SVN its per-program sums per channel (b:
    int64). Returns the per-pixel sum of g_s over ``rows`` (the CVN correction's part)."""
    q = _param_offsets(p, W, WP, KH, KW)
    mask = (rows[:, None] < C) & (p[None, :] < HW)
    s_ptrs = gh_ptr + (b * (2 * C) + rows[:, None]) * HWP + q[None, :]
    t_ptrs = gh_ptr + (b * (2 * C) + C + rows[:, None]) * HWP + q[None, :]
    ty = gh_ptr.dtype.element_ty
    tl.store(t_ptrs, g_t.to(ty), mask=mask)
    if FINAL:
        tl.store(s_ptrs, (g_s * _soft_clamp_grad(s_raw, clamp, GAIN)).to(ty), mask=mask)
    else:
        tl.store(s_ptrs, g_s.to(ty), mask=mask)
    g_s = tl.where(mask, g_s, 0.0)
    if not FINAL and not CVN:
        slot = (b * n_tiles + tile) * C
        tl.store(gpart_ptr + slot + rows, tl.sum(g_s, axis=1), mask=rows < C)
    return tl.sum(g_s, axis=0)


@triton.jit
def _coupling_bwd_kernel(
    x_ptr, h_ptr, w_ptr, mean_ptr, gz_ptr, gx_ptr, gh_ptr, wpart_ptr, gpart_ptr,
    C, HW, W, HWP, WP, n_tiles, clamp,
    CP: tl.constexpr, CVN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    GAIN: tl.constexpr, FINAL: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Grads of the forward coupling for a tile of pixels of one image (y recomputed),
    in run-time chunks of CP input channels; grad z rows are re-read once per chunk."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HW
    g_s_sum = tl.zeros([BLOCK_P], dtype=ACC)
    wpart = wpart_ptr + (b * n_tiles + tile) * C * C
    for first in range(0, C, CP):
        rows = first + tl.arange(0, CP)
        mask = (rows[:, None] < C) & pm[None, :]
        planes = (b * C + rows[:, None]) * HW  # int64 plane starts, [CP, 1]
        x = tl.load(x_ptr + planes + p[None, :], mask=mask, other=0.0).to(ACC)
        s_raw, log_scale, shift = _load_log_scale_shift(
            h_ptr, mean_ptr, b, p, rows, C, HW, W, HWP, WP, clamp, CVN, KH, KW, GAIN, ACC
        )
        scale = tl.exp(log_scale)
        y = scale * x + shift
        g_y = tl.zeros([CP, BLOCK_P], dtype=ACC)
        g_o_ptr = gz_ptr + b * C * HW + p  # stepped by HW
        for o in range(C):
            g_o = tl.load(g_o_ptr, mask=pm, other=0.0).to(ACC)
            w_row = tl.load(w_ptr + o * C + rows, mask=rows < C, other=0.0).to(ACC)
            g_y += w_row[:, None] * g_o[None, :]
            tl.store(wpart + o * C + rows, tl.sum(y * g_o[None, :], axis=1), mask=rows < C)
            g_o_ptr += HW
        g_x = (g_y * scale).to(gx_ptr.dtype.element_ty)
        tl.store(gx_ptr + planes + p[None, :], g_x, mask=mask)
        g_s_sum += _store_h_grads(
            gh_ptr, gpart_ptr, b, tile, n_tiles, p, rows, g_y * scale * x, g_y, s_raw,
            C, HW, W, HWP, WP, clamp, CVN, KH, KW, GAIN, FINAL,
        )  # fmt: skip
    if CVN and not FINAL:
        tl.store(gpart_ptr + b * HW + p, g_s_sum, mask=pm)


@triton.jit
def _inverse_mix(
    z_ptr, winv_ptr, b, p, rows, C, HW, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """u = (W^-1 z)[rows] for a [len(rows), BLOCK_P] tile of image b (int64): a run-time
    loop over the C input channels."""
    u = tl.zeros([rows.shape[0], BLOCK_P], dtype=ACC)
    z_c = z_ptr + b * C * HW + p  # stepped by HW: C HW passes 2^31 at C = 64, 8192 px
    for c in range(C):
        z_row = tl.load(z_c, mask=p < HW, other=0.0).to(ACC)
        w_col = tl.load(winv_ptr + rows * C + c, mask=rows < C, other=0.0).to(ACC)
        u += w_col[:, None] * z_row[None, :]
        z_c += HW
    return u


@triton.jit
def _coupling_inv_kernel(
    z_ptr, h_ptr, winv_ptr, mean_ptr, x_ptr, C, HW, W, HWP, WP, clamp,
    CP: tl.constexpr, CVN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    GAIN: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """x = (W^-1 z - t) exp(-s) for a tile of pixels of one image, in run-time chunks of
    CP output channels (CP <= 16: z rows are re-read once per chunk, from the cache)."""
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    q = _param_offsets(p, W, WP, KH, KW)
    for first in range(0, C, CP):
        rows = first + tl.arange(0, CP)
        u = _inverse_mix(z_ptr, winv_ptr, b, p, rows, C, HW, ACC, BLOCK_P)
        mean = _vn_mean_at(mean_ptr, q, p, rows, C, HW, CVN, ACC)
        _, log_scale, shift = _log_scale_shift(
            h_ptr, mean, b, p, q, rows, C, HW, HWP, clamp, GAIN, ACC
        )
        x = (u - shift) * tl.exp(-log_scale)
        out = x_ptr + (b * C + rows[:, None]) * HW + p[None, :]
        tl.store(out, x.to(x_ptr.dtype.element_ty), mask=(rows[:, None] < C) & (p < HW)[None, :])


@triton.jit
def _coupling_inv_bwd_kernel(
    z_ptr, h_ptr, winv_ptr, mean_ptr, gx_ptr, gz_ptr, gh_ptr, wpart_ptr, gpart_ptr,
    C, HW, W, HWP, WP, n_tiles, clamp,
    CP: tl.constexpr, CVN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    GAIN: tl.constexpr, FINAL: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Grads of the inverse coupling for a tile of pixels of one image (x recomputed), in
    run-time chunks of CP rows of u = W^-1 z; grad z = W^-T grad u is accumulated over
    the chunks in place (each lane re-reads only what it wrote).

    wpart gets per-program sums of g_u z^T, the gradient w.r.t. W^-1."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HW
    g_s_sum = tl.zeros([BLOCK_P], dtype=ACC)
    wpart = wpart_ptr + (b * n_tiles + tile) * C * C
    for first in range(0, C, CP):
        rows = first + tl.arange(0, CP)
        mask = (rows[:, None] < C) & pm[None, :]
        u = _inverse_mix(z_ptr, winv_ptr, b, p, rows, C, HW, ACC, BLOCK_P)
        s_raw, log_scale, shift = _load_log_scale_shift(
            h_ptr, mean_ptr, b, p, rows, C, HW, W, HWP, WP, clamp, CVN, KH, KW, GAIN, ACC
        )
        g_x = tl.load(gx_ptr + (b * C + rows[:, None]) * HW + p[None, :], mask=mask, other=0.0)
        g_u = g_x.to(ACC) * tl.exp(-log_scale)
        z_c = z_ptr + b * C * HW + p  # stepped by HW
        g_z_c = gz_ptr + b * C * HW + p
        for c in range(C):
            z_row = tl.load(z_c, mask=pm, other=0.0).to(ACC)
            w_col = tl.load(winv_ptr + rows * C + c, mask=rows < C, other=0.0).to(ACC)
            g_z = tl.sum(w_col[:, None] * g_u, axis=0)
            g_z += tl.load(g_z_c, mask=pm & (first > 0), other=0.0).to(ACC)
            tl.store(g_z_c, g_z.to(gz_ptr.dtype.element_ty), mask=pm)
            tl.store(wpart + rows * C + c, tl.sum(g_u * z_row[None, :], axis=1), mask=rows < C)
            z_c += HW
            g_z_c += HW
        g_s_sum += _store_h_grads(
            gh_ptr, gpart_ptr, b, tile, n_tiles, p, rows, -g_u * (u - shift), -g_u, s_raw,
            C, HW, W, HWP, WP, clamp, CVN, KH, KW, GAIN, FINAL,
        )  # fmt: skip
    if CVN and not FINAL:
        tl.store(gpart_ptr + b * HW + p, g_s_sum, mask=pm)


@triton.jit
def _vn_mean_at(
    mean_ptr, q, p, ch, C, HW, CVN: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The subtracted VN mean, broadcastable to [len(ch), BLOCK_P] tiles: CVN at parameter
    pixels q ([1, BLOCK_P]), SVN per channel ch ([CP, 1])."""
    if CVN:
        mean = tl.load(mean_ptr + q, mask=p < HW, other=0.0).to(ACC)[None, :]
    else:
        mean = tl.load(mean_ptr + ch, mask=ch < C, other=0.0).to(ACC)[:, None]
    return mean


@triton.jit
def _log_scale_shift(
    h_ptr, mean, b, p, q, ch, C, HW, HWP, clamp, GAIN: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """[CP, BLOCK_P] tiles of s_raw, VN-centred log-scale s and shift t at target pixels p
    (parameter pixels q) of image b (int64), given the subtracted mean (broadcastable)."""
    mask = (ch[:, None] < C) & (p[None, :] < HW)
    # plane starts in int64 ([CP, 1] columns: 2C HWP passes 2^31 at C = 64, 8192 px)
    s_rows = h_ptr + (b * (2 * C) + ch[:, None]) * HWP
    t_rows = h_ptr + (b * (2 * C) + C + ch[:, None]) * HWP
    s_raw = tl.load(s_rows + q[None, :], mask=mask, other=0.0).to(ACC)
    shift = tl.load(t_rows + q[None, :], mask=mask, other=0.0).to(ACC)
    log_scale = tl.where(mask, _soft_clamp(s_raw, clamp, GAIN) - mean, 0.0)
    return s_raw, log_scale, shift


@triton.jit
def _forward_grads_chunk(
    x, s_raw, log_scale, shift, gz_ptr, w_ptr, gx_ptr, gh_ptr, wpart, gpart_ptr,
    b, tile, n_tiles, p, rows, C, HW, W, HWP, WP, clamp,
    CVN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, GAIN: tl.constexpr,
    FINAL: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """The forward coupling's grads for input channels ``rows`` of a tile (y recomputed
    from x): grad x and grad h stored, the chunk's rows of the weight gradient's per-program
    partials stored; returns the per-pixel sum of g_s over ``rows`` (CVN correction)."""
    pm = p < HW
    scale = tl.exp(log_scale)
    y = scale * x + shift
    g_y = tl.zeros([rows.shape[0], BLOCK_P], dtype=ACC)
    g_o_ptr = gz_ptr + b * C * HW + p  # stepped by HW
    for o in range(C):
        g_o = tl.load(g_o_ptr, mask=pm, other=0.0).to(ACC)
        w_row = tl.load(w_ptr + o * C + rows, mask=rows < C, other=0.0).to(ACC)
        g_y += w_row[:, None] * g_o[None, :]
        tl.store(wpart + o * C + rows, tl.sum(y * g_o[None, :], axis=1), mask=rows < C)
        g_o_ptr += HW
    g_x = (g_y * scale).to(gx_ptr.dtype.element_ty)
    planes = (b * C + rows[:, None]) * HW  # int64 plane starts, [CP, 1]
    tl.store(gx_ptr + planes + p[None, :], g_x, mask=(rows[:, None] < C) & pm[None, :])
    return _store_h_grads(
        gh_ptr, gpart_ptr, b, tile, n_tiles, p, rows, g_y * scale * x, g_y, s_raw,
        C, HW, W, HWP, WP, clamp, CVN, KH, KW, GAIN, FINAL,
    )  # fmt: skip


@triton.jit
def _cvn_batch_mean(
    h_ptr, q, pm, B, C, HWP, clamp,
    GAIN: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """The CVN batch mean of soft_clamp(s_raw) at parameter pixels q: the sum over every
    image and channel, over B C (run-time loops, int64 plane starts)."""
    total = tl.zeros([BLOCK_P], dtype=ACC)
    plane_size = tl.full([], 1, tl.int64) * HWP  # int64: 2C HWP passes 2^31
    for image in range(B):
        for channel in range(C):
            row = image * (2 * C) + channel  # the s rows of h
            s_raw = tl.load(h_ptr + row * plane_size + q, mask=pm, other=0.0).to(ACC)
            total += _soft_clamp(s_raw, clamp, GAIN)  # 0 where masked
    return total / (B * C)


@triton.jit
def _coupling_recompute_kernel(
    z_ptr, h_ptr, winv_ptr, w_ptr, mean_ptr, gz_ptr, x_ptr, gx_ptr, gh_ptr, wpart_ptr,
    gpart_ptr, B, C, HW, W, HWP, WP, n_tiles, clamp,
    CP: tl.constexpr, CVN: tl.constexpr, MEAN_HERE: tl.constexpr, KH: tl.constexpr,
    KW: tl.constexpr, GAIN: tl.constexpr, FINAL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """One step of the recompute backward for a tile of pixels of one image: the inverse
    x = (W^-1 z - t) exp(-s), stored, then from the stored x exactly what
    ``_coupling_bwd_kernel`` computes (y recomputed, grads of x, h and W), in run-time
    chunks of CP channels. MEAN_HERE (CVN in training): the VN batch mean at the tile's
    parameter pixels is reduced here, over every image and channel, instead of by
    ``_vn_sum_kernel``. Grid (batch, tiles): the programs of one tile are adjacent, so
    the other images' s rows come from the cache."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < HW
    q = _param_offsets(p, W, WP, KH, KW)
    if MEAN_HERE:
        mean_pix = _cvn_batch_mean(h_ptr, q, pm, B, C, HWP, clamp, GAIN, ACC, BLOCK_P)
    g_s_sum = tl.zeros([BLOCK_P], dtype=ACC)
    wpart = wpart_ptr + (b * n_tiles + tile) * C * C
    for first in range(0, C, CP):
        rows = first + tl.arange(0, CP)
        mask = (rows[:, None] < C) & pm[None, :]
        u = _inverse_mix(z_ptr, winv_ptr, b, p, rows, C, HW, ACC, BLOCK_P)
        if MEAN_HERE:
            mean = mean_pix[None, :]
        else:
            mean = _vn_mean_at(mean_ptr, q, p, rows, C, HW, CVN, ACC)
        s_raw, log_scale, shift = _log_scale_shift(
            h_ptr, mean, b, p, q, rows, C, HW, HWP, clamp, GAIN, ACC
        )
        # rounded to x's dtype as stored, so the grads equal the two-kernel path's
        x = ((u - shift) * tl.exp(-log_scale)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + (b * C + rows[:, None]) * HW + p[None, :], x, mask=mask)
        g_s_sum += _forward_grads_chunk(
            x.to(ACC), s_raw, log_scale, shift, gz_ptr, w_ptr, gx_ptr, gh_ptr, wpart,
            gpart_ptr, b, tile, n_tiles, p, rows, C, HW, W, HWP, WP, clamp,
            CVN, KH, KW, GAIN, FINAL, ACC, BLOCK_P,
        )  # fmt: skip
    if CVN and not FINAL:
        tl.store(gpart_ptr + b * HW + p, g_s_sum, mask=pm)


@triton.jit
def _vn_grad_kernel(
    gh_ptr, h_ptr, corr_ptr, C, HWP, clamp,
    CP: tl.constexpr, CVN: tl.constexpr, GAIN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """In place over the whole parameter plane: g_s_raw = (g_s - corr) * clamp'(s_raw),
    corr = mean of g_s over the VN dims minus grad(mean) / count."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q = tile * BLOCK + tl.arange(0, BLOCK)
    ch = tl.arange(0, CP)
    mask = (ch[:, None] < C) & (q[None, :] < HWP)
    rows = (b * (2 * C) + ch[:, None]) * HWP
    g_s = tl.load(gh_ptr + rows + q[None, :], mask=mask, other=0.0).to(ACC)
    s_raw = tl.load(h_ptr + rows + q[None, :], mask=mask, other=0.0).to(ACC)
    if CVN:
        corr = tl.load(corr_ptr + q, mask=q < HWP, other=0.0).to(ACC)[None, :]
    else:
        corr = tl.load(corr_ptr + ch, mask=ch < C, other=0.0).to(ACC)[:, None]
    g = (g_s - corr) * _soft_clamp_grad(s_raw, clamp, GAIN)
    tl.store(gh_ptr + rows + q[None, :], g.to(gh_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _padded_channels(channels: int) -> int:
    return triton.next_power_of_2(channels)


def _block(cp: int, pixels: int, elements: int = _TILE_ELEMENTS) -> int:
    block = max(16, min(_MAX_BLOCK_P, elements // cp))
    return max(16, min(block, triton.next_power_of_2(pixels)))


def _lane_block(rows: int, pixels: int, element_bytes: int, budget: int) -> int:
    """Pixels per program for a kernel whose [rows, BLOCK_P] tiles keep all ``rows`` of a
    pixel in one thread: BLOCK_P = (pixels per thread) x 32 lanes x 4 warps, so Triton's
    layout puts the pixels on lanes and warps and the rows in registers (mixing rows and
    reducing over them then needs no layout conversion and no barrier). Pixels per
    thread: up to one 16-byte vector, while rows x pixels stays within ``budget``
    elements of 4 bytes. Under the interpreter: the larger ``_block`` tiles."""
    if interpreting():
        return _block(rows, pixels)
    vector = 16 // element_bytes
    per_thread = max(1, min(vector, budget * 4 // (element_bytes * rows)))
    per_thread = 1 << (per_thread.bit_length() - 1)
    return max(16, min(per_thread * _LANES, triton.next_power_of_2(pixels)))


class _Geometry:
    """Shapes and strides shared by every launch of one call."""

    def __init__(self, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> None:
        if x.dim() != 4 or h.dim() != 4:
            raise ValueError(f"x and h must be 4-D, got {tuple(x.shape)} and {tuple(h.shape)}")
        b, c, height, width = x.shape
        if h.shape[0] != b or h.shape[1] != 2 * c:
            raise ValueError(f"h must be (B, 2C, ...) = ({b}, {2 * c}, ...), got {tuple(h.shape)}")
        if weight.shape != (c, c):
            raise ValueError(f"weight must be ({c}, {c}), got {tuple(weight.shape)}")
        hp, wp = h.shape[-2:]
        if hp % height or wp % width or hp < height or wp < width:
            raise ValueError(
                f"parameter size {hp}x{wp} must be an integer multiple of the target size "
                f"{height}x{width}"
            )
        self.batch, self.channels, self.height, self.width = b, c, height, width
        self.hp, self.wp = hp, wp
        self.kh, self.kw = hp // height, wp // width
        self.hw, self.hwp = height * width, hp * wp
        self.cp = _padded_channels(c)
        size = x.element_size()
        # chunk rows: 16 float32 channels (4 float64: 8 spill a few bytes at 128
        # registers, bench/gpu_build_check.py --shapes range); the inverse's backward
        # keeps more tiles live (u, z rows, grad u and both reductions): half
        self.chunk = min(self.cp, _CHUNK if size <= 4 else _CHUNK // 4)
        # (the fused recompute kernel too: at the backward's rows it spilled 8 B)
        self.chunk_inv_bwd = max(1, self.chunk // 2)
        # the forward's backward in float64: 2 rows (4 spilled 8 B at k = 2 on sm_90)
        self.chunk_bwd = self.chunk if size <= 4 else self.chunk_inv_bwd
        self.block_chunk = _lane_block(self.chunk, self.hw, size, _CHUNK_BUDGET)
        self.tiles_chunk = triton.cdiv(self.hw, self.block_chunk)
        self.block_param = _block(self.cp, self.hwp, _TILE_ELEMENTS * 4 // size)
        self.tiles_param = triton.cdiv(self.hwp, self.block_param)


def _vn_count(geo: _Geometry, cvn: bool) -> int:
    return geo.batch * geo.channels if cvn else geo.batch * geo.hwp


def _vn_mean(h: torch.Tensor, geo: _Geometry, cvn: bool, clamp: float) -> torch.Tensor:
    """Batch mean of soft_clamp(s_raw) over the VN dims, in the VN mean's shape."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    if cvn:
        part = torch.empty(geo.batch, geo.hwp, device=h.device, dtype=acc)
    else:
        part = torch.empty(geo.batch * geo.tiles_param, geo.cp, device=h.device, dtype=acc)
    launch(
        _vn_sum_kernel, (geo.tiles_param, geo.batch),
        h, part, geo.channels, geo.hwp, geo.tiles_param, clamp,
        CP=geo.cp, CVN=cvn, GAIN=SOFT_CLAMP_GAIN, ACC=acc_dtype(h.dtype),
        BLOCK=geo.block_param,
    )  # fmt: skip
    total = part.sum(dim=0) / _vn_count(geo, cvn)
    if cvn:
        return total.view(1, 1, geo.hp, geo.wp).to(h.dtype)
    return total[: geo.channels].view(1, geo.channels, 1, 1).to(h.dtype)


def _subtracted_mean(
    h: torch.Tensor,
    running_mean: torch.Tensor | None,
    geo: _Geometry,
    cvn: bool,
    training: bool,
    clamp: float,
) -> torch.Tensor:
    if training:
        return _vn_mean(h, geo, cvn, clamp)
    if running_mean is None:
        raise ValueError("eval mode needs the running mean of the volume normalization")
    return _given_mean(running_mean, "running_mean", geo, cvn)


def _given_mean(mean: torch.Tensor, name: str, geo: _Geometry, cvn: bool) -> torch.Tensor:
    """A VN mean passed in (running, or a kept batch mean), checked, as a new contiguous
    tensor."""
    expected = (1, 1, geo.hp, geo.wp) if cvn else (1, geo.channels, 1, 1)
    if tuple(mean.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(mean.shape)}")
    return mean.detach().clone(memory_format=torch.contiguous_format)


def _is_cvn(volume_norm: str) -> bool:
    return vn_dims(volume_norm) == (0, 1)


def _inverse_weight(weight: torch.Tensor) -> torch.Tensor:
    return inverse_matrix(weight).to(weight.dtype).contiguous()


def _apply_coupling(
    kernel: Any,
    source: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    volume_norm: str,
    training: bool,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward or the inverse kernel (they share the signature: the inverse
    gets the inverted mixing weight); returns the result and the subtracted VN mean,
    which the backward keeps."""
    source, h, weight = source.contiguous(), h.contiguous(), weight.contiguous()
    geo, cvn = _Geometry(source, h, weight), _is_cvn(volume_norm)
    mean = _subtracted_mean(h, running_mean, geo, cvn, training, clamp)
    result = torch.empty_like(source)
    launch(
        kernel, (geo.tiles_chunk, geo.batch),
        source, h, weight, mean, result, geo.channels, geo.hw, geo.width, geo.hwp, geo.wp,
        clamp,
        CP=geo.chunk, CVN=cvn, KH=geo.kh, KW=geo.kw, GAIN=SOFT_CLAMP_GAIN,
        ACC=acc_dtype(source.dtype), BLOCK_P=geo.block_chunk,
    )  # fmt: skip
    return result, mean


def _grad_buffers(
    h: torch.Tensor, geo: _Geometry, cvn: bool, training: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad h, weight partials, VN partials). Grad h starts at zero where the kernel
    does not write it (parameter pixels that are not picked)."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    picked_all = geo.kh == 1 and geo.kw == 1
    grad_h = torch.empty_like(h) if picked_all else torch.zeros_like(h)
    wpart = torch.empty(
        geo.batch * geo.tiles_chunk, geo.channels * geo.channels, device=h.device, dtype=acc
    )
    if not training:
        gpart = torch.empty(1, device=h.device, dtype=acc)
    elif cvn:
        gpart = torch.empty(geo.batch, geo.hw, device=h.device, dtype=acc)
    else:
        gpart = torch.empty(geo.batch * geo.tiles_chunk, geo.channels, device=h.device, dtype=acc)
    return grad_h, wpart, gpart


def _finish_vn_grad(
    grad_h: torch.Tensor,
    h: torch.Tensor,
    gpart: torch.Tensor,
    grad_mean: torch.Tensor | None,
    geo: _Geometry,
    cvn: bool,
    clamp: float,
) -> None:
    """Training: subtract the VN mean of g_s (and add grad(mean) / count), apply clamp'."""
    count = _vn_count(geo, cvn)
    if cvn:
        corr = torch.zeros(geo.hp, geo.wp, device=h.device, dtype=gpart.dtype)
        per_pixel = gpart.sum(dim=0).view(geo.height, geo.width) / count
        corr[:: geo.kh, :: geo.kw] = per_pixel
    else:
        corr = gpart.sum(dim=0)[: geo.channels] / count
    if grad_mean is not None:
        corr = corr - grad_mean.reshape(corr.shape).to(corr.dtype) / count
    launch(
        _vn_grad_kernel, (geo.tiles_param, geo.batch),
        grad_h, h, corr.contiguous(), geo.channels, geo.hwp, clamp,
        CP=geo.cp, CVN=cvn, GAIN=SOFT_CLAMP_GAIN, ACC=acc_dtype(h.dtype),
        BLOCK=geo.block_param,
    )  # fmt: skip


def _backward_impl(
    grad_z: torch.Tensor,
    grad_mean: torch.Tensor | None,
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    volume_norm: str,
    training: bool,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads (x, h, weight) of the forward coupling; y is recomputed from x and h."""
    x, h, weight, grad_z = x.contiguous(), h.contiguous(), weight.contiguous(), grad_z.contiguous()
    geo, cvn = _Geometry(x, h, weight), _is_cvn(volume_norm)
    grad_x = torch.empty_like(x)
    grad_h, wpart, gpart = _grad_buffers(h, geo, cvn, training)
    launch(
        _coupling_bwd_kernel, (geo.tiles_chunk, geo.batch),
        x, h, weight, mean, grad_z, grad_x, grad_h, wpart, gpart,
        geo.channels, geo.hw, geo.width, geo.hwp, geo.wp, geo.tiles_chunk, clamp,
        CP=geo.chunk_bwd, CVN=cvn, KH=geo.kh, KW=geo.kw, GAIN=SOFT_CLAMP_GAIN,
        FINAL=not training, ACC=acc_dtype(x.dtype), BLOCK_P=geo.block_chunk,
    )  # fmt: skip
    if training:
        _finish_vn_grad(grad_h, h, gpart, grad_mean, geo, cvn, clamp)
    grad_w = wpart.sum(dim=0).view(geo.channels, geo.channels)
    return grad_x, grad_h, grad_w.to(weight.dtype)


def _inverse_backward_impl(
    grad_x: torch.Tensor,
    z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    volume_norm: str,
    training: bool,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads (z, h, weight) of the inverse coupling; x is recomputed from z and h."""
    z, h, weight, grad_x = z.contiguous(), h.contiguous(), weight.contiguous(), grad_x.contiguous()
    geo, cvn = _Geometry(z, h, weight), _is_cvn(volume_norm)
    inverse = _inverse_weight(weight)
    grad_z = torch.empty_like(z)
    grad_h, wpart, gpart = _grad_buffers(h, geo, cvn, training)
    launch(
        _coupling_inv_bwd_kernel, (geo.tiles_chunk, geo.batch),
        z, h, inverse, mean, grad_x, grad_z, grad_h, wpart, gpart,
        geo.channels, geo.hw, geo.width, geo.hwp, geo.wp, geo.tiles_chunk, clamp,
        CP=geo.chunk_inv_bwd, CVN=cvn, KH=geo.kh, KW=geo.kw, GAIN=SOFT_CLAMP_GAIN,
        FINAL=not training, ACC=acc_dtype(z.dtype), BLOCK_P=geo.block_chunk,
    )  # fmt: skip
    if training:
        _finish_vn_grad(grad_h, h, gpart, None, geo, cvn, clamp)
    # d(W^-1) = -W^-1 dW W^-1  =>  grad W = -W^-T grad(W^-1) W^-T
    grad_inv = wpart.sum(dim=0).view(geo.channels, geo.channels).double()
    inv_t = inverse_matrix(weight).T
    grad_w = -(inv_t @ grad_inv @ inv_t)
    return grad_z, grad_h, grad_w.to(weight.dtype)


def _recompute_impl(
    z: torch.Tensor,
    grad_z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    volume_norm: str,
    training: bool,
    clamp: float,
    batch_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, grads x, h, weight) of one recompute step: one fused launch, plus in training
    the VN gradient correction and, unless the caller passes the forward's ``batch_mean``
    or the fused kernel reduces the CVN mean itself, the VN batch sum."""
    z, h, weight, grad_z = z.contiguous(), h.contiguous(), weight.contiguous(), grad_z.contiguous()
    geo, cvn = _Geometry(z, h, weight), _is_cvn(volume_norm)
    kept = training and batch_mean is not None
    mean_here = training and not kept and cvn and 2 <= geo.batch <= _MEAN_HERE_MAX_BATCH
    if mean_here:
        mean = torch.empty(1, device=h.device, dtype=h.dtype)  # not read
    elif kept:
        mean = _given_mean(batch_mean.to(h.dtype), "batch_mean", geo, cvn)
    else:
        mean = _subtracted_mean(h, running_mean, geo, cvn, training, clamp)
    x, grad_x = torch.empty_like(z), torch.empty_like(z)
    grad_h, wpart, gpart = _grad_buffers(h, geo, cvn, training)
    launch(
        _coupling_recompute_kernel, (geo.batch, geo.tiles_chunk),
        z, h, _inverse_weight(weight), weight, mean, grad_z, x, grad_x, grad_h, wpart, gpart,
        geo.batch, geo.channels, geo.hw, geo.width, geo.hwp, geo.wp, geo.tiles_chunk, clamp,
        CP=geo.chunk_inv_bwd, CVN=cvn, MEAN_HERE=mean_here, KH=geo.kh, KW=geo.kw,
        GAIN=SOFT_CLAMP_GAIN, FINAL=not training, ACC=acc_dtype(z.dtype),
        BLOCK_P=geo.block_chunk,
    )  # fmt: skip
    if training:
        _finish_vn_grad(grad_h, h, gpart, None, geo, cvn, clamp)
    grad_w = wpart.sum(dim=0).view(geo.channels, geo.channels)
    return x, grad_x, grad_h, grad_w.to(weight.dtype)


# --------------------------------------------------------------------------- registration


def _coupling_fn(
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    volume_norm: str,
    training: bool,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (z, the subtracted VN mean)."""
    return _apply_coupling(
        _coupling_fwd_kernel, x, h, weight, running_mean, volume_norm, training, clamp
    )


def _coupling_backward_fn(
    grad_z: torch.Tensor,
    grad_mean: torch.Tensor | None,
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    volume_norm: str,
    training: bool,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_z, grad_mean, x, h, weight, mean, volume_norm, training, clamp)


def _inverse_fn(
    z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    volume_norm: str,
    training: bool,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x, the subtracted VN mean)."""
    return _apply_coupling(
        _coupling_inv_kernel, z, h, _inverse_weight(weight), running_mean, volume_norm,
        training, clamp,
    )  # fmt: skip


def _inverse_backward_fn(
    grad_x: torch.Tensor,
    z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    volume_norm: str,
    training: bool,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _inverse_backward_impl(grad_x, z, h, weight, mean, volume_norm, training, clamp)


def _recompute_fn(
    z: torch.Tensor,
    grad_z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    volume_norm: str,
    training: bool,
    clamp: float,
    batch_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x, grad x, grad h, grad weight); not differentiable (it is a backward)."""
    return _recompute_impl(
        z, grad_z, h, weight, running_mean, volume_norm, training, clamp, batch_mean
    )


def _setup(ctx, inputs, output) -> None:
    """Save the op's inputs and the subtracted VN mean (small); y is recomputed."""
    first, h, weight, _, volume_norm, training, clamp = inputs
    ctx.save_for_backward(first, h, weight, output[1])
    ctx.options = (volume_norm, training, clamp)


def _coupling_backward(ctx, grad_z, grad_mean):
    x, h, weight, mean = ctx.saved_tensors
    if grad_z is None:
        grad_z = torch.zeros_like(x)
    grads = _coupling_backward_op(grad_z, grad_mean, x, h, weight, mean, *ctx.options)
    return (*grads, None, None, None, None)


def _inverse_backward(ctx, grad_x, _grad_mean):
    z, h, weight, mean = ctx.saved_tensors
    if grad_x is None:
        grad_x = torch.zeros_like(z)
    grads = _inverse_backward_op(grad_x, z, h, weight, mean, *ctx.options)
    return (*grads, None, None, None, None)


_coupling_backward_op = register_op("affine_coupling_backward", _coupling_backward_fn)
_inverse_backward_op = register_op("affine_coupling_inverse_backward", _inverse_backward_fn)
_coupling_op = register_op(
    "affine_coupling", _coupling_fn, backward=_coupling_backward, setup_context=_setup
)
_recompute_op = register_op("affine_coupling_recompute", _recompute_fn)
_inverse_op = register_op(
    "affine_coupling_inverse", _inverse_fn, backward=_inverse_backward, setup_context=_setup
)


# --------------------------------------------------------------------------- public


def affine_coupling(
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    *,
    volume_norm: str,
    training: bool,
    clamp: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton coupling forward: ``(z, mean)`` exactly as
    :func:`coupling_reference.affine_coupling` (the mean is a fresh tensor in eval)."""
    z, mean = _coupling_op(x, h, weight, running_mean, volume_norm, bool(training), float(clamp))
    return z, mean


def affine_coupling_inverse(
    z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    *,
    volume_norm: str,
    training: bool,
    clamp: float = 2.0,
) -> torch.Tensor:
    """Triton coupling inverse: x exactly as :func:`coupling_reference.affine_coupling_inverse`."""
    args = (z, h, weight, running_mean, volume_norm, bool(training), float(clamp))
    return _inverse_op(*args)[0]
