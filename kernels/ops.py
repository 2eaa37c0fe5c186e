"""Public ops: one signature per op, dispatched to the torch reference or to Triton.

Every op takes ``backend=None | "auto" | "torch" | "triton"`` (see ``_backend``). The
Triton implementation of op ``name`` is the function ``name`` of the module named in
``TRITON_MODULES``, imported on first use (so Triton is never imported on the torch path).
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
    """Laplacian decomposition with max-pool down of x (B, C, H, W) into ``levels`` bands,
    finest first (band i has size H/2^i x W/2^i). H, W must be divisible by 2^(levels-1)."""
    return _pick("pyramid_decompose", pyramid_reference.decompose, backend, x)(x, levels)


def pyramid_compose(bands: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """Exact inverse of :func:`pyramid_decompose`; linear, its backward is its adjoint."""
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
    """Coupling forward z = W (exp(VN(softclamp(s_raw))) * x + t); returns (z, vn_mean).

    x: (B, C, h, w) target level. h: (B, 2C, k*h, k*w) raw parameter-network output
    ([s_raw, t]), k >= 1 (k = 2 for a Down block at full parameter resolution: every
    k-th pixel is used). weight: (C, C) channel mixing. running_mean: the VN running mean
    ((1, 1, k*h, k*w) for CVN, (1, C, 1, 1) for SVN), used in eval mode only.
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
    """Inverse of :func:`affine_coupling` with the same arguments: returns x."""
    fn = _pick("affine_coupling_inverse", coupling_reference.affine_coupling_inverse, backend, z)
    return fn(z, h, weight, running_mean, volume_norm=volume_norm, training=training, clamp=clamp)


def fourier_loss(latents: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """Siamese Fourier loss over all pairs i < j of the batch (scalar).

    latents: L tensors (B, C, H/2^l, W/2^l), B >= 2. D = mean_c Compose((z_i - z_j)^2),
    loss = mean over pairs and frequencies of |FFT2(D)| (computed with rfft2).
    """
    return _pick("fourier_loss", loss_map_reference.fourier_loss, backend, latents[0])(latents)


def anomaly_map(
    latents: Sequence[torch.Tensor],
    template: Sequence[torch.Tensor],
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly map mean_c Compose(|z - T|) (B, H, W) and image score (its max, (B,)).

    template: L tensors (1, C, h_l, w_l) or (C, h_l, w_l), broadcast over the batch.
    """
    fn = _pick("anomaly_map", loss_map_reference.anomaly_map, backend, latents[0])
    return fn(latents, template)
