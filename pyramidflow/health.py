"""Numerical health: does the flow still invert what it encodes?

PyramidFlow's maps are invertible by construction, so ``inverse(forward(x))`` must give
back the projected features of ``x`` up to float rounding. A relative error far above
rounding (default threshold 1e-3) means the model is numerically broken for those
inputs (exploding scales, a near-singular 1x1 mixing, corrupted weights), and its
anomaly maps should not be trusted. The check runs in eval mode, like inference.
"""

from __future__ import annotations

import warnings

import torch

from .model.flow import PyramidFlow

DEFAULT_THRESHOLD = 1e-3


class NumericalHealthWarning(UserWarning):
    """A model that does not reconstruct its inputs to within the threshold."""


@torch.no_grad()
def reconstruction_error(
    model: PyramidFlow,
    images: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Per-image relative error ||inverse(forward(x)) - P x|| / ||P x|| (L2 over channels and
    pixels; P is the frozen input projection) of normalized images (N, C, H, W), in eval
    mode. Returns float64 (N,) on the CPU; a non-finite reconstruction gives inf."""
    was_training = model.training
    model.to(device).eval()
    errors = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            model.check_input(batch)
            features = model.inconv(batch)
            rebuilt = model.inverse(model(batch))
            diff = (rebuilt.double() - features.double()).flatten(1).norm(dim=1)
            scale = (
                features.double().flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
            )
            error = diff / scale
            error = torch.where(torch.isfinite(error), error, torch.full_like(error, float("inf")))
            errors.append(error.cpu())
    finally:
        model.train(was_training)
    if not errors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(errors)


def check_reconstruction(
    model: PyramidFlow,
    images: torch.Tensor,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """:func:`reconstruction_error`, warning (:class:`NumericalHealthWarning`) when any
    image is above ``threshold``; returns the errors."""
    errors = reconstruction_error(model, images, batch_size=batch_size, device=device)
    bad = int((errors > threshold).sum())
    if bad:
        warnings.warn(
            f"{bad} of {errors.numel()} image(s) reconstruct with relative error above "
            f"{threshold:g} (worst {errors.max().item():.3g}): the model is numerically "
            "unhealthy for them",
            NumericalHealthWarning,
            stacklevel=2,
        )
    return errors
