"""``pyramidflow export``: a model as an ONNX or torch.export inference graph."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..io.export import DEFAULT_OPSET, FORMATS, INPUT_NAME, OUTPUT_NAMES, export_checkpoint
from .common import check_new_file


def run(args: argparse.Namespace) -> int:
    """``pyramidflow export MODEL --format onnx|pt2 --out PATH [--overwrite]``."""
    out = Path(args.out)
    check_new_file(out, args.overwrite)
    path = export_checkpoint(
        args.model, out, args.format, opset=args.opset, dynamic_batch=not args.static_batch
    )
    print(f"wrote {path} ({args.format}; input {INPUT_NAME!r}, outputs {', '.join(OUTPUT_NAMES)})")
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``export`` on the ``add_subparsers()`` object of the ``pyramidflow`` parser;
    its handler is ``args.func`` and returns the exit code."""
    p = subparsers.add_parser(
        "export",
        help="export a model as an ONNX or torch.export (.pt2) inference graph",
        description="Write MODEL's inference graph: normalized images (B, C, H, W) -> anomaly "
        "map (B, H, W) and score (B,), template included, dynamic batch size. Preprocessing "
        "and the threshold are stored as metadata beside the graph.",
    )
    p.add_argument("model", type=Path, help="model file written by `train`")
    p.add_argument("--format", choices=FORMATS, required=True, help="onnx or pt2")
    p.add_argument("--out", type=Path, required=True, help="file to write (.onnx or .pt2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})"
    )
    p.add_argument(
        "--static-batch", action="store_true", help="fix the batch size to 1 instead of dynamic"
    )
    p.set_defaults(func=run)
    return p
