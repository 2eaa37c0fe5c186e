"""Pure-torch reference of the affine coupling with volume normalization and 1x1 mixing.

From the parameter network's raw output ``h = [s_raw, t]`` (B, 2C, hp, wp):
s = clamp * 0.636 * atan(s_raw / clamp); s = s - mean (batch mean over the VN dims in
training, the running mean in eval); when the parameter resolution is a multiple of the
target's, s and t are nearest-resized (pick every k-th pixel); z = W (exp(s) * x + t),
W applied per pixel over channels (docs/method.md sections 3-6).
"""

from __future__ import annotations

import torch

SOFT_CLAMP_GAIN = 0.636
VN_DIMS = {"CVN": (0, 1), "SVN": (0, 2, 3)}


def vn_dims(volume_norm: str) -> tuple[int, ...]:
    """Reduction dims of a volume normalization: CVN (0, 1) per pixel, SVN (0, 2, 3)."""
    try:
        return VN_DIMS[volume_norm]
    except KeyError:
        raise ValueError(f"volume_norm must be 'CVN' or 'SVN', got {volume_norm!r}") from None


def soft_clamp(s_raw: torch.Tensor, clamp: float) -> torch.Tensor:
    """clamp * 0.636 * atan(s_raw / clamp): smooth bound of |s| below ~clamp."""
    return clamp * SOFT_CLAMP_GAIN * torch.atan(s_raw / clamp)


def _log_scale_and_shift(
    h: torch.Tensor,
    target_hw: tuple[int, int],
    running_mean: torch.Tensor | None,
    volume_norm: str,
    training: bool,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s_raw, shift = h.chunk(2, dim=1)
    log_scale = soft_clamp(s_raw, clamp)
    if training:
        mean = log_scale.mean(dim=vn_dims(volume_norm), keepdim=True)
    else:
        if running_mean is None:
            raise ValueError("eval mode needs the running mean of the volume normalization")
        mean = running_mean
    log_scale = log_scale - mean
    stride_h, stride_w = h.shape[-2] // target_hw[0], h.shape[-1] // target_hw[1]
    if (stride_h, stride_w) != (1, 1):
        log_scale = log_scale[..., ::stride_h, ::stride_w]
        shift = shift[..., ::stride_h, ::stride_w]
    return log_scale, shift, mean


def inverse_matrix(weight: torch.Tensor) -> torch.Tensor:
    """W^-1 in float64, without a host synchronization on CUDA: ``linalg.inv_ex`` skips
    the singularity check that makes ``linalg.inv`` wait for the device (the 1x1 mixing
    matrices have |det W| = 1 by construction, so the check cannot fire)."""
    return torch.linalg.inv_ex(weight.double()).inverse


def mix_channels(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a (C_out, C_in) matrix per pixel: (B, C_in, H, W) -> (B, C_out, H, W)."""
    return torch.einsum("oc,bchw->bohw", weight, x)


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
    """Forward coupling. Returns ``(z, mean)``; ``mean`` is the VN mean that was subtracted
    (the batch mean in training, for the caller's running-mean update)."""
    log_scale, shift, mean = _log_scale_and_shift(
        h, x.shape[-2:], running_mean, volume_norm, training, clamp
    )
    return mix_channels(weight, torch.exp(log_scale) * x + shift), mean


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
    """Inverse coupling: x = (W^-1 z - t) * exp(-s) with the same (s, t) as the forward."""
    log_scale, shift, _ = _log_scale_and_shift(
        h, z.shape[-2:], running_mean, volume_norm, training, clamp
    )
    return _inverse_affine(z, log_scale, shift, weight)


def _inverse_affine(
    z: torch.Tensor, log_scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    inverse_weight = inverse_matrix(weight).to(weight.dtype)
    return (mix_channels(inverse_weight, z) - shift) * torch.exp(-log_scale)


def affine_coupling_recompute(
    z: torch.Tensor,
    grad_z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    *,
    volume_norm: str,
    training: bool,
    clamp: float = 2.0,
    batch_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One coupling's step of a recompute backward: the forward's input ``x`` rebuilt from
    its output ``z``, then the forward's gradients at ``x``: ``(x, grad_x, grad_h,
    grad_weight)`` for the incoming ``grad_z``. In training, ``batch_mean`` (the forward's
    ``vn_mean``, if kept) is subtracted instead of the mean reduced from h again. Not
    differentiable itself.

    The gradients are written out (the chain rule of :func:`affine_coupling`, as the Triton
    backward computes them) instead of taken by autograd through a rebuilt forward, whose
    saved tensors made this step the CPU walk's memory peak; ``tests/test_invertible.py``
    holds them to autograd's."""
    kept = training and batch_mean is not None
    if kept:
        dims = vn_dims(volume_norm)
        expected = tuple(1 if d in dims else n for d, n in enumerate(h[:, : z.shape[1]].shape))
        got = tuple(batch_mean.shape)
        if got != expected:
            raise ValueError(f"batch_mean must have shape {expected}, got {got}")
    with torch.no_grad():
        log_scale, shift, _ = _log_scale_and_shift(
            h, z.shape[-2:], batch_mean if kept else running_mean, volume_norm,
            training and not kept, clamp,
        )  # fmt: skip
        x = _inverse_affine(z, log_scale, shift, weight)
        scale = torch.exp(log_scale)
        del log_scale
        # z = W y, y = scale * x + shift, at the rebuilt x (as the forward would see it)
        grad_weight = torch.einsum("bohw,bchw->oc", grad_z, torch.addcmul(shift, scale, x))
        del shift
        grad_y = mix_channels(weight.t(), grad_z)
        channels = z.shape[1]
        stride_h, stride_w = h.shape[-2] // z.shape[-2], h.shape[-1] // z.shape[-1]
        picked = (stride_h, stride_w) != (1, 1)
        grad_h = torch.zeros_like(h) if picked else torch.empty_like(h)
        grad_s, grad_t = grad_h[:, :channels], grad_h[:, channels:]
        grad_t[..., ::stride_h, ::stride_w] = grad_y
        grad_x = grad_y.mul_(scale)  # grad_y is not needed any more
        del scale
        # d y / d log_scale = scale * x
        torch.mul(grad_x, x, out=grad_s[..., ::stride_h, ::stride_w])
        if training:  # the subtracted batch mean depends on every s of its VN group
            grad_s -= grad_s.mean(dim=vn_dims(volume_norm), keepdim=True)
        # d soft_clamp(s) / d s = gain / (1 + (s / clamp)^2), in place: one temporary
        grad_s.div_((h[:, :channels] / clamp).square_().add_(1.0)).mul_(SOFT_CLAMP_GAIN)
    return x, grad_x, grad_h, grad_weight
