"""Public ops: one signature per op, dispatched to the torch reference or to Triton.

Every op takes ``backend=None | "auto" | "torch" | "triton"`` (see ``_backend``): ``None``
and ``auto`` read ``$PYRAMIDFLOW_BACKEND`` (default ``auto``); ``auto`` runs Triton for
CUDA tensors when Triton imports and the torch reference otherwise; ``triton`` on CPU tensors needs
``TRITON_INTERPRET=1`` (Triton's interpreter, for tests). The Triton implementation of op
``name`` is the function ``name`` of the module named in ``TRITON_MODULES``, imported on
first use (so Triton is never imported on the torch path).

Common to every op:

- Layout: NCHW tensors; outputs are new tensors, inputs are never modified.
- Dtypes: float32 and float64 (the tested ones); outputs have the input's dtype. Triton
  accumulates in float64 for float64 inputs, in float32 otherwise.
- Devices: the torch reference runs wherever torch does (CPU, CUDA, ...); Triton runs on
  CUDA. All tensors of one call must be on one device.
- Autograd: the reference is plain differentiable torch. The Triton ops are
  ``torch.library.triton_op``s with registered backwards (``anomaly_map`` excepted, see
  there), so ``torch.compile`` and ``torch.export`` trace through both backends.
- Stateless: nothing is cached between calls, nothing random is drawn, no buffer is
  updated (running statistics are the caller's).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from . import coupling_reference, loss_map_reference, pyramid_reference
from ._backend import resolve_backend

TRITON_MODULES: dict[str, str] = {
    "pyramid_decompose": "pyramid_triton",
    "pyramid_compose": "pyramid_triton",
    "affine_coupling": "coupling_triton",
    "affine_coupling_inverse": "coupling_triton",
    "affine_coupling_recompute": "coupling_recompute",
    "fourier_loss": "loss_map_triton",
    "anomaly_map": "loss_map_triton",
}


_TRITON_MODULE_CACHE: dict[str, ModuleType] = {}


def _triton_module(name: str) -> ModuleType:
    """The module holding the Triton implementation of op ``name``, found and imported on
    first use only (the lookup is cached per op name)."""
    module = _TRITON_MODULE_CACHE.get(name)
    if module is None:
        module_name = f"{__package__}.{TRITON_MODULES[name]}"
        if importlib.util.find_spec(module_name) is None:
            raise NotImplementedError(f"no Triton implementation of {name} ({module_name})")
        module = importlib.import_module(module_name)
        _TRITON_MODULE_CACHE[name] = module
    return module


def _pick(name: str, reference: Callable, backend: str | None, tensor: torch.Tensor) -> Callable:
    # The backend is resolved on every call (it depends on the tensor's device and on
    # $PYRAMIDFLOW_BACKEND, and validates the argument); only the module lookup is cached.
    # The function itself is read from the module each call, so that replacing it there
    # (a wrapper, a test spy) takes effect.
    if resolve_backend(backend, tensor) == "triton" and name in TRITON_MODULES:
        return getattr(_triton_module(name), name)
    return reference


def pyramid_decompose(
    x: torch.Tensor, levels: int, *, backend: str | None = None
) -> list[torch.Tensor]:
    """Laplacian decomposition with max-pool down of x into ``levels`` bands, finest first.

    x: (B, C, H, W), H and W divisible by 2^(levels-1), levels >= 2 (ValueError
    otherwise). Returns ``levels`` tensors, band l of shape (B, C, H/2^l, W/2^l):
    band l = g_l - Up(g_{l+1}) for l < levels-1 and the last band is g_{levels-1}, where
    g_0 = x, g_{l+1} = Down(g_l) = maxpool2x2(G(g_l)), Up(c) = G(replicate2x(c)) and G is
    the 5x5 binomial blur ([1,4,6,4,1] outer itself / 256, zero padded), per channel.

    Triton fuses per level: blur + 2x2 max-pool (one kernel), then upsample + blur +
    subtract (one kernel). The backward (w.r.t. x) routes through the max-pool argmax.
    """
    return _pick("pyramid_decompose", pyramid_reference.decompose, backend, x)(x, levels)


def pyramid_compose(bands: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """Exact inverse of :func:`pyramid_decompose`: r = bands[L-1], then r = Up(r) + bands[l]
    for l = L-2 .. 0; returns r, (B, C, H, W).

    bands: L >= 1 tensors (B, C, H/2^l, W/2^l), finest first, as decompose returns them
    (any C, e.g. 1 for channel-reduced maps). Linear: its backward is its adjoint.
    Triton fuses per level upsample + blur + add (one kernel); the backward is one fused
    adjoint kernel per level (upsample-adjoint and blur as one 6x6 stencil).
    """
    return _pick("pyramid_compose", pyramid_reference.compose, backend, bands[0])(bands)


def affine_coupling(
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    *,
    volume_norm: str,
    training: bool,
    clamp: float = 2.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling z = W (exp(VN(softclamp(s_raw))) * x + t); returns (z, vn_mean).

    x: (B, C, h, w), the level being transformed; z has its shape and dtype.
    h: (B, 2C, k*h, k*w), the raw parameter-network output [s_raw, t] (channels 0..C-1
    the log-scale, C..2C-1 the shift), k >= 1 per axis: target pixel (i, j) takes its
    parameters at (k*i, k*j) (nearest resize; k = 2 for a PyramidFlow Down block).
    weight: (C, C), mixing applied per pixel after the affine, z[:, o] = sum_c W[o, c] y[:, c].
    softclamp(s) = clamp * 0.636 * atan(s / clamp). ``volume_norm``: ``"CVN"`` subtracts
    one mean per parameter pixel (over batch and channels), ``"SVN"`` one per channel (over
    batch and space). ``training=True`` subtracts the batch mean, taken over all k*h x k*w
    parameter pixels; ``False`` subtracts ``running_mean`` ((1, 1, k*h, k*w) for CVN,
    (1, C, 1, 1) for SVN; may be None in training). ``vn_mean`` is the mean that was
    subtracted, in the running-mean shape: the op never updates ``running_mean``, the
    caller does from it.

    Triton fuses soft clamp, VN subtraction, the every-k-th-pixel pick, exp, affine and
    the C x C mix in one pass over x (plus one reduction kernel for the batch mean in
    training). Its backward gives the grads of x, h and weight (with the VN batch-mean
    correction), recomputing the affine output instead of saving it.
    """
    fn = _pick("affine_coupling", coupling_reference.affine_coupling, backend, x)
    return fn(x, h, weight, running_mean, volume_norm=volume_norm, training=training, clamp=clamp)


def affine_coupling_inverse(
    z: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    running_mean: torch.Tensor | None,
    *,
    volume_norm: str,
    training: bool,
    clamp: float = 2.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Inverse of :func:`affine_coupling` with the same arguments: x = (W^-1 z - t) * exp(-s).

    z: (B, C, h, w); returns x of the same shape and dtype. The scale and shift come from
    ``h`` (the batch mean too, in training), so the forward is inverted exactly when the
    same ``h``, ``weight`` and ``running_mean`` are passed. W^-1 is computed by torch in
    float64. Triton fuses the unmix, soft clamp, VN, pick and inverse affine in one pass;
    its backward gives the grads of z, h and weight.
    """
    fn = _pick("affine_coupling_inverse", coupling_reference.affine_coupling_inverse, backend, z)
    return fn(z, h, weight, running_mean, volume_norm=volume_norm, training=training, clamp=clamp)


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One coupling's step of a memory-saving backward: ``(x, grad_x, grad_h, grad_weight)``.

    ``z`` is the output of :func:`affine_coupling` with these ``h``, ``weight``,
    ``running_mean`` and options, ``grad_z`` the gradient arriving at it. Returns the
    forward's input x = :func:`affine_coupling_inverse` (z, ...) and the gradients of the
    forward at x with respect to x, h and weight (the VN batch-mean correction included in
    training; ``vn_mean``'s gradient taken as zero: running statistics are not
    differentiated). The caller back-propagates ``grad_h`` and ``grad_weight`` into
    whatever produced h and weight. Not differentiable itself (it is a backward).
    ``batch_mean`` (training only): the ``vn_mean`` that :func:`affine_coupling` returned
    for this h, when the caller kept it; it is then used instead of reduced from h again
    (it must be that mean: h is the forward's, bit for bit, in a recompute backward).

    Triton: the inverse (one VN batch reduction in training, whose mean the backward
    reuses) and the fused backward, without re-running the forward for a graph; 4 kernel
    launches in training, 2 in eval. The torch reference rebuilds x the same way and
    differentiates the reference forward at x.
    """
    fn = _pick("affine_coupling_recompute", coupling_reference.affine_coupling_recompute,
               backend, z)  # fmt: skip
    return fn(
        z, grad_z, h, weight, running_mean, volume_norm=volume_norm, training=training,
        clamp=clamp, batch_mean=batch_mean,
    )  # fmt: skip


def fourier_loss(latents: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """Siamese Fourier loss over all pairs i < j of the batch (scalar).

    latents: L tensors (B, C, H/2^l, W/2^l), finest first, B >= 2 (ValueError otherwise).
    Per pair D = mean_c Compose((z_i - z_j)^2), (H, W), channels reduced before composing
    (compose is linear); loss = mean over the B(B-1)/2 pairs and the H*W frequencies of
    |FFT2(D)|, computed with ``torch.fft.rfft2`` and conjugate-pair column weights. A
    0-dim tensor of the latents' dtype, differentiable w.r.t. every latent.

    Triton fuses per level the all-pairs squared difference with its channel mean,
    composes (Triton), runs rfft2 (cuFFT), and fuses |F| x weight with a deterministic
    partial sum; its backward fuses F / |F| x weight, then the adjoint rfft2 (irfft2),
    the adjoint compose and the scatter to both images of every pair.
    """
    return _pick("fourier_loss", loss_map_reference.fourier_loss, backend, latents[0])(latents)


def anomaly_map(
    latents: Sequence[torch.Tensor],
    template: Sequence[torch.Tensor],
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly map mean_c Compose(|z - T|) (B, H, W) and image score (its max, (B,)).

    latents: L tensors (B, C, H/2^l, W/2^l), finest first. template: L tensors
    (1, C, h_l, w_l) or (C, h_l, w_l) of the same level sizes, broadcast over the batch.
    The map has the finest level's resolution and the latents' dtype.

    Triton fuses per level |z - T| with its channel mean, composes the one-channel maps
    and takes per-row maxima for the score in the last compose kernel. The Triton version
    is inference only: it raises RuntimeError when a gradient is required (call it under
    ``torch.no_grad()``, or use ``backend="torch"``, which is differentiable).
    """
    fn = _pick("anomaly_map", loss_map_reference.anomaly_map, backend, latents[0])
    return fn(latents, template)
