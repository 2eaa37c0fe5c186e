"""Triton Fourier loss and anomaly map (docs/method.md sections 7-8), forward and backward.

Same signatures and semantics as :mod:`loss_map_reference` (the oracle). Channels are
reduced before composing (compose is linear), so every pyramid runs on one channel.

Fourier loss, per call:

- ``_pair_sq_diff_kernel`` (per level): one program per pixel block and pair of image
  blocks I <= J (up to 8 images each) loads both blocks' images of each channel once and
  accumulates ``(z_i - z_j)^2 / C`` for their pairs i < j, writing one channel per pair,
  (P, 1, h, w);
- the Triton pyramid compose (:mod:`pyramid_triton`) to the (P, H, W) map D;
- ``torch.fft.rfft2`` (cuFFT; no FFT in Triton);
- ``_spectrum_abs_kernel``: per-program partial sums of ``w_col * |F|`` (w = 1 for the
  columns standing for one frequency, 0 and W/2; 2 for conjugate pairs), finished in
  torch (deterministic, no atomics), divided by P * H * W.

Backward: ``_spectrum_abs_grad_kernel`` writes ``g * w_col / (P H W) * F / |F|``
(0 where F = 0) in one pass; the adjoint of rfft2 is then ``irfft2(Z, norm="forward")``
where Z is that half spectrum with its self-conjugate columns (0 and, for even W, W/2)
replaced by ``Y[k] + conj(Y[-k])`` (derivation at :func:`rfft2_adjoint`); then the
adjoint compose (Triton); then ``_pair_sq_diff_grad_kernel`` scatters
``2 (z_i - z_j) / C * dD`` to both images of every pair: one program per pixel block and
image block sums over the pairs of its images, one block of partners at a time, adding
into its own gradient rows (no atomics).

Anomaly map: ``_abs_diff_mean_kernel`` (per level, ``mean_c |z - T|``; up to 16 images per
program share each template read), the compose, and
the image score from per-row partial maxima written by the last compose level, finished
in torch. It is inference only (no backward): it raises if a gradient is requested.

Registered ops (``torch.library.triton_op``): ``pyramidflow::pair_sq_diff_mean`` (+
``_backward``), ``pyramidflow::spectrum_abs_mean`` (+ ``_backward``) and
``pyramidflow::anomaly_map``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._triton_utils import acc_dtype, launch, register_op, register_unary_op, tile_1d, tile_2d
from .pyramid_triton import pyramid_compose, up_launch

__all__ = ["anomaly_map", "fourier_loss", "rfft2_adjoint"]

_PAIR_IMAGES = 8  # images per pair block: B_pad <= 8 keeps a block pair in registers
_PAIR_TILE = 4096  # block images^2 * pixels held by one pair program
_ABS_DIFF_IMAGES = 16  # images per anomaly-map program: the template is read B / 16 times
_ABS_DIFF_TILE = 4096  # images x float32 pixels held by one anomaly-map program

# --------------------------------------------------------------------------- kernels


@triton.jit
def _pair_index(i, j, B):
    """Row-major index of pair (i, j), i < j, among the pairs of a batch of B."""
    return i * B - (i * (i + 1)) // 2 + (j - i - 1)


@triton.jit
def _pair_sq_diff_kernel(
    z_ptr,
    d_ptr,
    B,
    C,
    HW,
    BLOCK_B: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """d[pair(i, j), pix] = mean_c (z[i, c, pix] - z[j, c, pix])^2 for the pairs i < j with
    i in image block I and j in image block J, where ``program_id(1) = I * blocks + J``;
    programs with J < I hold no pair and return at once."""
    blocks = tl.cdiv(B, BLOCK_B)
    block_i = tl.program_id(1) // blocks
    block_j = tl.program_id(1) % blocks
    if block_j < block_i:
        return
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[None, None, :]
    i = block_i * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None]
    j = block_j * BLOCK_B + tl.arange(0, BLOCK_B)[None, :, None]
    live = pix < HW
    # [BLOCK_B, 1, BLOCK] and [1, BLOCK_B, BLOCK] loads: each thread reads the pixels of
    # its slice of the pair tile itself (from the cache), rather than a shared-memory
    # exchange of one [BLOCK_B, BLOCK] load
    rows_i = z_ptr + i.to(tl.int64) * C * HW + pix
    rows_j = z_ptr + j.to(tl.int64) * C * HW + pix
    mask_i = (i < B) & live
    mask_j = (j < B) & live
    acc = tl.zeros((BLOCK_B, BLOCK_B, BLOCK), dtype=ACC)
    for _ in range(C):
        v_i = tl.load(rows_i, mask=mask_i, other=0.0).to(ACC)
        v_j = tl.load(rows_j, mask=mask_j, other=0.0).to(ACC)
        diff = v_i - v_j
        acc += diff * diff
        rows_i += HW
        rows_j += HW
    pair = _pair_index(i, j, B).to(tl.int64)
    mask = (i < j) & (j < B) & live
    out = (acc / C).to(d_ptr.dtype.element_ty)
    tl.store(d_ptr + pair * HW + pix, out, mask=mask)


@triton.jit
def _pair_sq_diff_grad_kernel(
    z_ptr,
    gd_ptr,
    gz_ptr,
    B,
    C,
    HW,
    BLOCK_B: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """gz[b, c] = 2/C * sum_{o != b} (z[b, c] - z[o, c]) * gd[pair(b, o)] for the images b of
    block ``program_id(1)``: a run-time loop over the image blocks of o accumulates into
    gz in place (each lane re-reads only what it wrote; no atomics)."""
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    img_i = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = pix[None, :] < HW
    mask_i = (img_i[:, None] < B) & live
    start_i = img_i[:, None].to(tl.int64) * C * HW + pix[None, :]
    # [partner j, image i, pixel]: the sums over partners stay in each thread's registers
    # (with the partners on axis 1, Triton spread them over warps: a shared-memory
    # reduction, ~70 bar.sync, per channel; bench/gpu_build_check.py)
    i = img_i[None, :, None]
    for block_j in range(0, tl.cdiv(B, BLOCK_B)):
        img_j = block_j * BLOCK_B + tl.arange(0, BLOCK_B)
        j = img_j[:, None, None]
        pair = _pair_index(tl.minimum(i, j), tl.maximum(i, j), B).to(tl.int64)
        gmask = (i != j) & (i < B) & (j < B) & (pix[None, None, :] < HW)
        g = tl.load(gd_ptr + pair * HW + pix[None, None, :], mask=gmask, other=0.0).to(ACC)
        row_sum = tl.sum(g, axis=0)
        rows_i = z_ptr + start_i
        rows_j = z_ptr + img_j[:, None].to(tl.int64) * C * HW + pix[None, :]
        mask_j = (img_j[:, None] < B) & live
        out = gz_ptr + start_i
        for _ in range(C):
            v_i = tl.load(rows_i, mask=mask_i, other=0.0).to(ACC)
            v_j = tl.load(rows_j, mask=mask_j, other=0.0).to(ACC)
            mixed = tl.sum(g * v_j[:, None, :], axis=0)
            grad = 2.0 * (v_i * row_sum - mixed) / C
            # blocks after the first add to what this lane stored for the earlier ones
            grad += tl.load(out, mask=mask_i & (block_j > 0), other=0.0).to(ACC)
            tl.store(out, grad.to(gz_ptr.dtype.element_ty), mask=mask_i)
            rows_i += HW
            rows_j += HW
            out += HW


@triton.jit
def _column_weight(col, Wr, W_EVEN: tl.constexpr):
    """1 for the self-conjugate rfft columns (0, and W/2 for even W), else 2."""
    single = col == 0
    if W_EVEN:
        single = single | (col == Wr - 1)
    return tl.where(single, 1.0, 2.0)


@triton.jit
def _spectrum_abs_kernel(
    f_ptr,
    partial_ptr,
    R,
    Wr,
    W_EVEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """partial[program] = sum over its tile of w_col * |F| (F interleaved re, im)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (r < R) & (col < Wr)
    offs = 2 * (r * Wr + col)
    re = tl.load(f_ptr + offs, mask=mask, other=0.0).to(ACC)
    im = tl.load(f_ptr + offs + 1, mask=mask, other=0.0).to(ACC)
    value = tl.sqrt(re * re + im * im) * _column_weight(col, Wr, W_EVEN)
    total = tl.sum(tl.sum(value, axis=1), axis=0)
    slot = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(partial_ptr + slot, total.to(partial_ptr.dtype.element_ty))


@triton.jit
def _spectrum_abs_grad_kernel(
    f_ptr,
    grad_ptr,
    out_ptr,
    count,
    R,
    Wr,
    W_EVEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """out = g * w_col / count * F / |F| (0 where F = 0), interleaved re, im."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (r < R) & (col < Wr)
    offs = 2 * (r * Wr + col)
    re = tl.load(f_ptr + offs, mask=mask, other=0.0).to(ACC)
    im = tl.load(f_ptr + offs + 1, mask=mask, other=0.0).to(ACC)
    magnitude = tl.sqrt(re * re + im * im)
    scale = tl.load(grad_ptr).to(ACC) * _column_weight(col, Wr, W_EVEN) / count
    factor = tl.where(magnitude > 0.0, scale / tl.where(magnitude > 0.0, magnitude, 1.0), 0.0)
    tl.store(out_ptr + offs, (re * factor).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offs + 1, (im * factor).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _abs_diff_mean_kernel(
    z_ptr,
    t_ptr,
    out_ptr,
    B,
    C,
    HW,
    BLOCK_B: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """out[b, pix] = mean_c |z[b, c, pix] - t[c, pix]| for BLOCK_B images at once: each
    template value is read once per program, not once per image."""
    pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    img = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = pix < HW
    mask = (img[:, None] < B) & live[None, :]
    rows = img[:, None].to(tl.int64) * C
    t_row = t_ptr + pix
    acc = tl.zeros((BLOCK_B, BLOCK), dtype=ACC)
    for c in range(C):
        z = tl.load(z_ptr + (rows + c) * HW + pix[None, :], mask=mask, other=0.0).to(ACC)
        t = tl.load(t_row, mask=live, other=0.0).to(ACC)
        acc += tl.abs(z - t[None, :])
        t_row += HW  # pointer steps: c * HW passes 2^31 at C = 64, 8192 px
    out = out_ptr + img[:, None].to(tl.int64) * HW + pix[None, :]
    tl.store(out, (acc / C).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _pair_blocks(batch: int, pixels: int) -> tuple[int, int, int]:
    """(images per block, pixels per program, image blocks) of the pair kernels."""
    block_b = min(_PAIR_IMAGES, triton.next_power_of_2(batch))
    block = tile_1d(pixels, max(16, _PAIR_TILE // (block_b * block_b)))
    return block_b, block, triton.cdiv(batch, block_b)


def _check_batch(batch: int) -> None:
    if batch < 2:
        raise ValueError(f"the Siamese loss needs a batch of at least 2 images, got {batch}")


def pair_sq_diff_launch(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (P, 1, h, w): mean over channels of (z_i - z_j)^2, pairs i < j."""
    z = z.contiguous()
    batch, channels, height, width = z.shape
    _check_batch(batch)
    pixels = height * width
    out = z.new_empty((batch * (batch - 1) // 2, 1, height, width))
    block_b, block, blocks = _pair_blocks(batch, pixels)
    launch(
        _pair_sq_diff_kernel,
        (triton.cdiv(pixels, block), blocks * blocks),
        z,
        out,
        batch,
        channels,
        pixels,
        BLOCK_B=block_b,
        BLOCK=block,
        ACC=acc_dtype(z.dtype),
    )
    return out


def pair_sq_diff_grad_launch(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`pair_sq_diff_launch` with respect to z."""
    z = z.contiguous()
    grad = grad.contiguous()
    batch, channels, height, width = z.shape
    pixels = height * width
    out = torch.empty_like(z)
    block_b, block, blocks = _pair_blocks(batch, pixels)
    launch(
        _pair_sq_diff_grad_kernel,
        (triton.cdiv(pixels, block), blocks),
        z,
        grad,
        out,
        batch,
        channels,
        pixels,
        BLOCK_B=block_b,
        BLOCK=block,
        ACC=acc_dtype(z.dtype),
    )
    return out


def _spectrum_grid(spectrum: torch.Tensor) -> tuple[tuple[int, int], int, int, int]:
    rows = spectrum.numel() // spectrum.shape[-1]
    block_r, block_c = tile_2d(rows, spectrum.shape[-1])
    grid = (triton.cdiv(rows, block_r), triton.cdiv(spectrum.shape[-1], block_c))
    return grid, rows, block_r, block_c


def spectrum_abs_mean_launch(maps: torch.Tensor) -> torch.Tensor:
    """mean over maps and frequencies of |FFT2(map)| of (P, H, W) maps, via rfft2."""
    maps = maps.contiguous()
    count, height, width = maps.shape
    spectrum = torch.fft.rfft2(maps)
    grid, rows, block_r, block_c = _spectrum_grid(spectrum)
    partial = maps.new_empty(grid[0] * grid[1])
    launch(
        _spectrum_abs_kernel,
        grid,
        torch.view_as_real(spectrum),
        partial,
        rows,
        spectrum.shape[-1],
        W_EVEN=width % 2 == 0,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        ACC=acc_dtype(maps.dtype),
    )
    return partial.sum() / (count * height * width)


def rfft2_adjoint(
    grad_spectrum: torch.Tensor, width: int, *, overwrite: bool = False
) -> torch.Tensor:
    """Adjoint (vector-Jacobian product) of ``rfft2`` on real (..., H, width) input.

    With X = rfft2(x) and incoming gradient Y = dL/dRe X + i dL/dIm X (half spectrum),
    dL/dx = Re(sum_kl Y_kl e^{+i theta}) = H W Re(ifft2(Y zero-padded to full width)).
    Twice that real part is ifft2 of Y plus its conjugate mirror Y*[-k, -l]; the mirror
    of interior columns fills the missing half, while the self-conjugate columns (0,
    and W/2 for even W) receive both, Y[k, l] + conj(Y[-k, l]). That full spectrum is
    Hermitian, so dL/dx = (1/2) irfft2(Z, norm="forward") with Z those half columns.
    ``overwrite`` builds Z in ``grad_spectrum`` itself instead of a copy.
    """
    z = grad_spectrum if overwrite else grad_spectrum.clone()
    columns = [0, width // 2] if width % 2 == 0 and width > 1 else [0]
    for col in columns:
        column = z[..., col].clone()
        mirrored = torch.roll(torch.flip(column, dims=(-1,)), 1, dims=-1)
        z[..., col] = column + mirrored.conj()
    return 0.5 * torch.fft.irfft2(z, s=(grad_spectrum.shape[-2], width), norm="forward")


def spectrum_abs_mean_grad_launch(grad: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`spectrum_abs_mean_launch` with respect to the maps."""
    maps = maps.contiguous()
    count, height, width = maps.shape
    spectrum = torch.fft.rfft2(maps)  # recomputed: one small FFT instead of a saved spectrum
    grid, rows, block_r, block_c = _spectrum_grid(spectrum)
    grad_spectrum = torch.empty_like(spectrum)
    launch(
        _spectrum_abs_grad_kernel,
        grid,
        torch.view_as_real(spectrum),
        grad.reshape(1).to(maps.dtype).contiguous(),
        torch.view_as_real(grad_spectrum),
        count * height * width,
        rows,
        spectrum.shape[-1],
        W_EVEN=width % 2 == 0,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        ACC=acc_dtype(maps.dtype),
    )
    return rfft2_adjoint(grad_spectrum, width, overwrite=True).to(maps.dtype)


def abs_diff_mean_launch(z: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w), template (1, C, h, w) or (C, h, w) -> (B, 1, h, w) mean_c |z - T|."""
    z = z.contiguous()
    batch, channels, height, width = z.shape
    if template.dim() == 4:
        if template.shape[0] != 1:
            raise ValueError(f"template must be (1, C, h, w) or (C, h, w), got {template.shape}")
        template = template[0]
    if tuple(template.shape) != (channels, height, width):
        raise ValueError(
            f"template level {tuple(template.shape)} does not match latent level {tuple(z.shape)}"
        )
    template = template.to(z.dtype).contiguous()
    pixels = height * width
    out = z.new_empty((batch, 1, height, width))
    block_b = min(triton.next_power_of_2(batch), _ABS_DIFF_IMAGES)
    # float64 tiles hold half the values: the same registers (4096 spilled with Triton 3.6)
    values = _ABS_DIFF_TILE // 2 if z.dtype == torch.float64 else _ABS_DIFF_TILE
    block = tile_1d(pixels, values // block_b)
    launch(
        _abs_diff_mean_kernel,
        (triton.cdiv(pixels, block), triton.cdiv(batch, block_b)),
        z,
        template,
        out,
        batch,
        channels,
        pixels,
        BLOCK_B=block_b,
        BLOCK=block,
        ACC=acc_dtype(z.dtype),
    )
    return out


# --------------------------------------------------------------------------- registered ops


def _anomaly_fn(
    latents: list[torch.Tensor], template: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(latents) != len(template) or not latents:
        raise ValueError(
            f"need one template level per latent level, got {len(latents)} and {len(template)}"
        )
    reduced = [abs_diff_mean_launch(z, t) for z, t in zip(latents, template, strict=True)]
    result = reduced[-1]
    maxima = None
    for level in range(len(reduced) - 2, -1, -1):
        result, maxima = up_launch(result, reduced[level], with_max=level == 0)
    if maxima is None:  # a single level: nothing composed
        maxima = result.reshape(result.shape[0], -1)
    return result[:, 0], maxima.amax(dim=1)


_pair_op = register_unary_op("pair_sq_diff_mean", pair_sq_diff_launch, pair_sq_diff_grad_launch)
_spectrum_op = register_unary_op(
    "spectrum_abs_mean", spectrum_abs_mean_launch, spectrum_abs_mean_grad_launch
)
_anomaly_op = register_op("anomaly_map", _anomaly_fn)


# --------------------------------------------------------------------------- public


def fourier_loss(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """Triton :func:`loss_map_reference.fourier_loss`: Siamese Fourier loss (scalar)."""
    _check_batch(latents[0].shape[0])
    maps = pyramid_compose([_pair_op(z) for z in latents])
    return _spectrum_op(maps[:, 0])


def anomaly_map(
    latents: Sequence[torch.Tensor], template: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton :func:`loss_map_reference.anomaly_map`: map (B, H, W) and score (B,).

    Inference only: raises if a gradient through it is requested.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*latents, *template)):
        raise RuntimeError(
            "the Triton anomaly_map is inference only (no backward); call it under "
            "torch.no_grad(), detach its inputs, or use backend='torch' for gradients"
        )
    return _anomaly_op(list(latents), list(template))
