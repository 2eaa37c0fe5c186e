"""Numerical health: does the flow still invert what it encodes?

PyramidFlow's maps are invertible by construction, so ``inverse(forward(x))`` must give
back the projected features of ``x`` up to float rounding. A relative error far above
rounding (default threshold 1e-3) means the model is numerically broken for those
inputs (exploding scales, a near-singular 1x1 mixing, corrupted weights), and its
anomaly maps should not be trusted. The check runs in eval mode, like inference.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from .model import PyramidFlow

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


def cmd_check(args: argparse.Namespace) -> int:
    """``pyramidflow check MODEL IMAGES...``: print each image's reconstruction error;
    exit code 1 when any is above ``--threshold``."""
    from . import data
    from .checkpoint import load_checkpoint

    paths = data.expand_inputs(args.images)
    model = load_checkpoint(args.model).model
    images = data.load_stack(paths, model.config)
    errors = reconstruction_error(model, images, batch_size=args.batch_size, device=args.device)
    width = max(len(str(p)) for p in paths)
    for path, error in zip(paths, errors.tolist(), strict=True):
        flag = "  ABOVE THRESHOLD" if error > args.threshold else ""
        print(f"{str(path):<{width}}  {error:.3e}{flag}")
    bad = int((errors > args.threshold).sum())
    print(
        f"{bad} of {len(paths)} image(s) above {args.threshold:g}; worst {errors.max().item():.3e}"
    )
    return 1 if bad else 0


def add_check_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``check MODEL IMAGES... [--threshold T]`` on a CLI's subparsers."""
    from .cli import positive  # the command line sits above this module

    parser = subparsers.add_parser(
        "check",
        help="numerical health: relative error of inverse(forward(x)) per image",
        description="Encodes each image and decodes it back; prints the relative error "
        "against the projected features (float rounding is ~1e-6). Exit code 1 when any "
        f"image is above --threshold (default {DEFAULT_THRESHOLD:g}).",
    )
    parser.add_argument("model", type=Path, help="model file (.safetensors)")
    parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument(
        "--threshold",
        type=positive(float),
        default=DEFAULT_THRESHOLD,
        help=f"largest acceptable relative error (default {DEFAULT_THRESHOLD:g})",
    )
    parser.add_argument(
        "--batch-size", type=positive(int), default=8, help="images per forward pass"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.set_defaults(func=cmd_check)
    return parser
