"""``pyramidflow demo``: generate the synthetic demo data, train, evaluate, tabulate."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    UsageError,
    add_common_options,
    print_table,
)


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on the ``pyramidflow`` parser's subparsers."""
    p = subparsers.add_parser(
        "demo",
        help="generate the synthetic demo data, train, evaluate and print a results table",
        description="Generate the built-in synthetic categories (if absent), train one model "
        "per category, evaluate on its test split, write models, overlays and metrics.json.",
    )
    p.add_argument("--out", type=Path, default=Path("pyramidflow-demo"), help="output folder")
    p.add_argument("--data", type=Path, help="where the demo data lives (default OUT/data)")
    p.add_argument("--categories", nargs="+", metavar="NAME", help="subset of the categories")
    p.add_argument("--epochs", type=int, help="override the demo's 8 epochs")
    add_common_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from ..synthetic import DEMO_CATEGORIES

    categories = args.categories or list(DEMO_CATEGORIES)
    unknown = sorted(set(categories) - set(DEMO_CATEGORIES))
    if unknown:
        raise UsageError(
            f"--categories: unknown {', '.join(unknown)}; known: {', '.join(DEMO_CATEGORIES)}"
        )
    overrides = {"epochs": args.epochs} if args.epochs is not None else {}
    summary = run_demo(
        args.out,
        data_dir=args.data,
        categories=categories,
        overrides=overrides,
        device=args.device,
        progress=not args.no_progress,
    )
    print()
    print_table(summary["categories"], summary["mean"])
    print(f"\nwrote {Path(args.out) / 'metrics.json'} ({summary['seconds']:.0f} s)")
    return 0
