"""Benchmarks: one model per dataset category, trained, evaluated and tabulated.

``pyramidflow benchmark ROOT --out DIR`` trains each category of an MVTec AD or BTAD root
with the paper's settings (MVTec AD: the per-category preset; BTAD and other folders: the
paper's defaults, as the paper gives no per-class settings for BTAD), evaluates it on its
test split and writes ``DIR/<category>.safetensors`` and ``DIR/metrics.json``. A rerun
reuses the models already in DIR (so an interrupted run resumes where it stopped) and
keeps the rows of categories it does not run; ``--overwrite`` retrains.

:func:`run_categories` is the loop shared with the synthetic demo (:mod:`pyramidflow.demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import data
from .api import Detector, Evaluation
from .atomic import atomic_write_text
from .config import MVTEC_CATEGORIES, Config
from .errors import DataError
from .metrics import REPORTED_METRICS, json_safe, mean_metrics

#: Config fields that fitting fills in from the data, or that do not change the results:
#: a reused model may differ from the requested config in these.
_RESOLVED_FIELDS = frozenset({"mean", "std", "in_channels", "normalization", "memory", "backend"})


@dataclass
class CategoryJob:
    """One category to train (or reuse from ``model_path``) and evaluate."""

    name: str
    data: Path
    config: Config
    model_path: Path


def benchmark_config(category: str, **overrides: Any) -> Config:
    """The paper's preset for an MVTec AD category; the paper's defaults for any other
    (BTAD 01/02/03 included). ``overrides`` apply on top of either."""
    if category in MVTEC_CATEGORIES:
        return Config.for_category(category, **overrides)
    return Config(**{"category": category, **overrides})


def settings_mismatch(requested: Config, trained: Config) -> str | None:
    """The first setting in which a trained model differs from the requested config, as
    ``"field: trained X, requested Y"``; None when it matches. Fields that fitting resolves
    from the data (normalization, channels; size for native geometry) are not compared."""
    skip = set(_RESOLVED_FIELDS)
    if requested.geometry == "native":
        skip.add("image_size")
    want, have = requested.to_dict(), trained.to_dict()
    for key in sorted(want.keys() - skip):
        if want[key] != have.get(key):
            return f"{key}: trained {have.get(key)!r}, requested {want[key]!r}"
    return None


def _write_json(path: Path, values: dict[str, Any]) -> None:
    text = json.dumps(json_safe(values), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _check_reusable(job: CategoryJob) -> None:
    mismatch = settings_mismatch(job.config, Detector.load(job.model_path).config)
    if mismatch is not None:
        raise DataError(
            f"{job.model_path}: trained with other settings ({mismatch}); pass --overwrite "
            "to retrain or choose another output folder"
        )


def _obtain_detector(
    job: CategoryJob, *, retrain: bool, device: str, progress: bool
) -> tuple[Detector, bool]:
    """The job's trained detector and whether it was reused from ``job.model_path``."""
    if job.model_path.exists() and not retrain:
        return Detector.load(job.model_path, device=device), True
    detector = Detector(job.config, device=device).fit(job.data, progress=progress)
    job.model_path.parent.mkdir(parents=True, exist_ok=True)
    detector.save(job.model_path)
    return detector, False


def run_categories(
    jobs: Sequence[CategoryJob],
    metrics_path: str | os.PathLike[str],
    *,
    retrain: bool = False,
    previous: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    after: Callable[[CategoryJob, Detector, Evaluation], None] | None = None,
) -> dict[str, Any]:
    """Train (or, unless ``retrain``, reuse the saved model of) and evaluate each job.

    ``metrics_path`` is rewritten after every category with ``categories`` (the rows of the
    jobs run so far, after those of ``previous``, an earlier summary, for categories not
    among the jobs), their ``mean``, each model's ``configs``, the ``info`` items and
    ``seconds``. ``after`` runs on each evaluated category. Returns the last summary."""
    if not retrain:  # refuse before training anything, not halfway through
        for job in jobs:
            if job.model_path.exists():
                _check_reusable(job)
    metrics_path = Path(metrics_path)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    names = {job.name for job in jobs}
    earlier = previous or {}
    rows = {k: v for k, v in earlier.get("categories", {}).items() if k not in names}
    configs = {k: v for k, v in earlier.get("configs", {}).items() if k in rows}
    start = time.perf_counter()
    summary: dict[str, Any] = {}
    for job in jobs:
        tick = time.perf_counter()
        detector, reused = _obtain_detector(job, retrain=retrain, device=device, progress=progress)
        evaluation = detector.evaluate(job.data, progress=progress)
        if after is not None:
            after(job, detector, evaluation)
        row = {k: float(evaluation.metrics[k]) for k in REPORTED_METRICS}
        row["seconds"] = round(time.perf_counter() - tick, 2)
        rows[job.name] = row
        configs[job.name] = detector.config.to_dict()
        log(
            f"{job.name:<12} pixel AUROC {row['pixel_auroc']:.4f}  image AUROC "
            f"{row['image_auroc']:.4f}  AUPRO@0.3 {row['aupro']:.4f}  ({row['seconds']:.0f} s"
            + (", saved model reused)" if reused else ")")
        )
        summary = {
            "categories": rows,
            "mean": mean_metrics(rows),
            "configs": configs,
            **(info or {}),
            "seconds": round(time.perf_counter() - start, 2),
        }
        _write_json(metrics_path, summary)
    return summary


# -- command line ----------------------------------------------------------------------------


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


_OVERRIDE_FLAGS = ("epochs", "levels", "stacks", "channels", "kernel_size", "batch_size", "seed")


def cmd_benchmark(args: argparse.Namespace) -> int:
    """``pyramidflow benchmark ROOT --out DIR``: train and evaluate every category."""
    from .cli import UsageError, _print_table  # the command line sits above this module

    folders = data.find_categories(args.root)
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
        category = data.open_category(folder)  # check every layout before training any
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
    rows = summary["categories"]
    _print_table(rows, summary["mean"] if len(rows) > 1 else None)
    print(f"\nwrote {metrics_path} ({summary['seconds']:.0f} s)")
    return 0


def add_benchmark_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``benchmark ROOT --out DIR`` on a CLI's subparsers."""
    from .cli import positive  # the command line sits above this module

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
    p.add_argument(
        "--overwrite", action="store_true", help="retrain and replace models already in --out"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=cmd_benchmark)
    return p
