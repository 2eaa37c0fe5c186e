"""Triton implementation of ``affine_coupling_recompute``: two registered coupling ops.

The step of a recompute backward for one coupling is the inverse (``pyramidflow::
affine_coupling_inverse``, which also returns the VN mean it subtracted: in training one
batch reduction of ``h``) followed by the fused backward (``pyramidflow::
affine_coupling_backward``) given that mean. So the VN mean is reduced once, and the
forward coupling is not run again just to build an autograd graph: 4 kernel launches in
training (VN sum, inverse, backward, VN gradient correction), 2 in eval.
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, grad_x, grad_h, grad_weight)`` exactly as
    :func:`coupling_reference.affine_coupling_recompute`."""
    options = (volume_norm, bool(training), float(clamp))
    with torch.no_grad():
        x, mean = torch.ops.pyramidflow.affine_coupling_inverse(
            z, h, weight, running_mean, *options
        )
        grad_x, grad_h, grad_weight = torch.ops.pyramidflow.affine_coupling_backward(
            grad_z, None, x, h, weight, mean, *options
        )
    return x, grad_x, grad_h, grad_weight
