"""``pyramidflow evaluate``: pixel and image metrics on MVTec AD or BTAD test folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MAX_PIXELS
from .common import (
    add_common_options,
    add_max_pixels_option,
    check_new_file,
    print_table,
)


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``pyramidflow`` parser's subparsers."""
    p = subparsers.add_parser(
        "evaluate",
        help="pixel/image AUROC and AUPRO on MVTec AD or BTAD test folders",
        description="Scores each category's test split at the model's resolution and prints "
        "pixel AUROC, image AUROC, AUPRO (FPR <= 0.3, normalised) and full-range AUPRO. A "
        "dataset root stands for all its categories.",
    )
    p.add_argument("model", type=Path, help="model file written by `train`")
    p.add_argument(
        "data", type=Path, nargs="+", help="MVTec AD or BTAD category folder(s) or root(s)"
    )
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_max_pixels_option(p, DEFAULT_MAX_PIXELS)
    add_common_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..api import Detector
    from ..io.atomic import atomic_write_text
    from ..io.datasets import find_categories
    from ..metrics import json_safe, mean_metrics

    if args.json is not None:
        check_new_file(args.json, args.overwrite)
        args.json.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after evaluating
    folders = [f for root in args.data for f in find_categories(root)]  # check all first
    detector = Detector.load(args.model, device=args.device, max_pixels=args.max_pixels)
    rows = {}
    for folder in folders:
        evaluation = detector.evaluate(folder, progress=not args.no_progress)
        name = Path(folder).resolve().name or str(folder)  # "." -> the folder's own name
        if name in rows:
            name = str(folder)
        rows[name] = evaluation.metrics
    mean = mean_metrics(rows)
    print(f"scoring: {detector.config.scoring}")
    print_table(rows, mean if len(rows) > 1 else None)
    if args.json is not None:
        summary = json_safe({"scoring": detector.config.scoring, "categories": rows, "mean": mean})
        atomic_write_text(args.json, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return 0
