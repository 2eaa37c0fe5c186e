"""``pyramidflow benchmark``: train and evaluate one model per category of a dataset root."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..benchmark import CategoryJob, benchmark_config, run_categories
from ..config import SCORINGS
from ..errors import DataError
from ..io.datasets import find_categories, open_category
from ..metrics import REPORTED_METRICS
from .common import UsageError, positive, print_table


def _previous_summary(path: Path, overwrite: bool) -> dict[str, Any]:
    """An earlier run's metrics.json (its rows are kept for categories not rerun)."""
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
        rows, configs = summary["categories"], summary.get("configs", {})
        if not isinstance(rows, dict) or not isinstance(configs, dict):
            raise ValueError
        if not all(
            isinstance(r, dict) and set(REPORTED_METRICS) <= r.keys() for r in rows.values()
        ):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        if overwrite:
            return {}
        raise DataError(
            f"{path}: exists but is not a benchmark metrics file; pass --overwrite to replace "
            "it or choose another --out"
        ) from None
    return summary


_OVERRIDE_FLAGS = (
    "epochs", "levels", "stacks", "channels", "kernel_size", "batch_size", "seed", "scoring",
)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """``pyramidflow benchmark ROOT --out DIR``: train and evaluate every category."""
    folders = find_categories(args.root)
    by_name = {f.name: f for f in folders}
    if args.categories:
        unknown = [n for n in args.categories if n not in by_name]
        if unknown:
            raise UsageError(
                f"--categories: {', '.join(unknown)} not in {args.root}; found {', '.join(by_name)}"
            )
        folders = [by_name[n] for n in dict.fromkeys(args.categories)]
    overrides: dict[str, Any] = {
        k: getattr(args, k) for k in _OVERRIDE_FLAGS if getattr(args, k) is not None
    }
    if args.image_size is not None:
        if len(args.image_size) not in (1, 2):
            raise UsageError("--image-size takes one value (square) or two (height width)")
        overrides["image_size"] = tuple(args.image_size * (3 - len(args.image_size)))
    if overrides.get("batch_size", 2) < 2:
        raise UsageError("--batch-size must be >= 2 (the loss compares image pairs)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder")

    jobs = []
    for folder in folders:
        try:
            config = benchmark_config(folder.name, **overrides)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{folder.name}: {exc}") from None
        model_path = args.out / f"{folder.name}.safetensors"
        if model_path.is_dir():
            raise UsageError(f"{model_path} is a folder; remove it or choose another --out")
        category = open_category(folder)  # check every layout before training any
        if len(category.train) < config.batch_size:
            raise DataError(
                f"{folder}: {len(category.train)} training image(s), fewer than one batch "
                f"of {config.batch_size}"
            )
        jobs.append(CategoryJob(folder.name, folder, config, model_path))

    metrics_path = args.out / "metrics.json"
    summary = run_categories(
        jobs,
        metrics_path,
        retrain=args.overwrite,
        previous=_previous_summary(metrics_path, args.overwrite),
        info={"root": str(args.root), "overrides": overrides},
        device=args.device,
        progress=not args.no_progress,
    )
    print()
    recipes = sorted({job.config.scoring for job in jobs})
    print(f"scoring: {', '.join(recipes)}")
    rows = summary["categories"]
    print_table(rows, summary["mean"] if len(rows) > 1 else None)
    print(f"\nwrote {metrics_path} ({summary['seconds']:.0f} s)")
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``benchmark ROOT --out DIR`` on a CLI's subparsers."""
    p = subparsers.add_parser(
        "benchmark",
        help="train and evaluate one model per category of an MVTec AD or BTAD root",
        description="For each category of ROOT (an MVTec AD or BTAD root, or one category "
        "folder): train with the paper's settings (MVTec AD per-category presets, defaults "
        "otherwise), evaluate on the test split, write OUT/<category>.safetensors and "
        "OUT/metrics.json and print the table. Models already in OUT are reused (a rerun "
        "resumes), unless --overwrite.",
    )
    p.add_argument("root", type=Path, help="dataset root or category folder")
    p.add_argument("--out", type=Path, required=True, help="folder for models and metrics.json")
    p.add_argument("--categories", nargs="+", metavar="NAME", help="run only these categories")
    g = p.add_argument_group("overrides for every category (default: the paper's settings)")
    g.add_argument("--image-size", type=positive(int), nargs="+", metavar="PX", help="S or H W")
    g.add_argument("--epochs", type=positive(int), help="training epochs (paper 15)")
    g.add_argument("--levels", type=positive(int), help="pyramid levels L (replaces presets)")
    g.add_argument("--stacks", type=positive(int), help="coupling stacks S (paper 4)")
    g.add_argument("--channels", type=positive(int), help="latent channels C (paper 16)")
    g.add_argument("--kernel-size", type=positive(int), help="parameter-network kernel k")
    g.add_argument("--batch-size", type=positive(int), help="training batch, >= 2 (paper 2)")
    g.add_argument("--seed", type=int, help="seed of initialisation, shuffling, augmentation")
    g.add_argument("--scoring", choices=SCORINGS, help="anomaly map recipe (default: paper)")
    p.add_argument(
        "--overwrite", action="store_true", help="retrain and replace models already in --out"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)
    return p
