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

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import Detector, Evaluation
from .config import MVTEC_CATEGORIES, Config
from .errors import DataError
from .io.atomic import atomic_write_text
from .metrics import REPORTED_METRICS, json_safe, mean_metrics

#: Config fields that fitting fills in from the data, or that do not change the results:
#: a reused model may differ from the requested config in these.
_RESOLVED_FIELDS = frozenset(
    {
        "mean",
        "std",
        "in_channels",
        "normalization",
        "memory",
        "memory_budget",
        "backend",
        "max_pixels",
    }  # fmt: skip
)


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
