"""Triton implementation of ``affine_coupling_recompute``: the registered op
``pyramidflow::affine_coupling_recompute`` (``coupling_triton._recompute_impl``).

One step of a recompute backward for one coupling is one fused kernel: the inverse, then
the forward's backward from the rebuilt x, without re-running the forward for a graph.
In training it is followed by the VN gradient correction; the VN batch mean is the
caller's ``batch_mean`` when given (2 launches), else for CVN at batches of 2 to 4 reduced
inside the fused kernel (2 launches), else by the VN sum kernel first (3 launches: SVN's
mean spans every pixel). 1 launch in eval.
"""

from __future__ import annotations

import torch

from . import coupling_triton  # noqa: F401  (registers the pyramidflow:: coupling ops)

__all__ = ["affine_coupling_recompute"]


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
    """``(x, grad_x, grad_h, grad_weight)`` exactly as
    :func:`coupling_reference.affine_coupling_recompute`."""
    with torch.no_grad():
        x, grad_x, grad_h, grad_weight = torch.ops.pyramidflow.affine_coupling_recompute(
            z, grad_z, h, weight, running_mean, volume_norm, bool(training), float(clamp),
            batch_mean,
        )  # fmt: skip
    return x, grad_x, grad_h, grad_weight
