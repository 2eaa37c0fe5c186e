"""``pyramidflow check``: numerical health, the reconstruction error per image."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import DEFAULT_MAX_PIXELS
from ..health import DEFAULT_THRESHOLD, reconstruction_error
from ..io.checkpoint import load_checkpoint
from ..io.images import expand_inputs
from ..preprocess import load_stack
from .common import add_max_pixels_option, positive


def run(args: argparse.Namespace) -> int:
    """``pyramidflow check MODEL IMAGES...``: print each image's reconstruction error;
    exit code 1 when any is above ``--threshold``."""
    paths = expand_inputs(args.images)
    model = load_checkpoint(args.model).model
    images = load_stack(paths, model.config.replace(max_pixels=args.max_pixels))
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


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``check MODEL IMAGES... [--threshold T]`` on a CLI's subparsers."""
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
    add_max_pixels_option(parser, DEFAULT_MAX_PIXELS)
    parser.set_defaults(func=run)
    return parser
