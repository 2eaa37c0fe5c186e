"""The built-in demo: generate the synthetic categories, train, evaluate, write results.

The demo is sized to finish in a few minutes on two CPU cores: 64 x 64 px, L = 4, S = 2,
C = 16, k = 7, 8 epochs over 40 good images per category (the paper's model uses 256 px,
S = 4 and 15 epochs; see README). Texture categories use the paper's texture
augmentation; the object category none.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import data
from .api import Detector, Evaluation
from .config import Config
from .synthetic import DEMO_CATEGORIES, TEXTURE_CATEGORIES, generate_demo_dataset
from .viz import colorize, overlay

DEMO_SETTINGS: dict[str, Any] = {
    "image_size": 64,
    "levels": 4,
    "stacks": 2,
    "channels": 16,
    "kernel_size": 7,
    "epochs": 8,
}
#: Images the generator writes at; the demo models resize them to ``image_size``.
DEMO_DATA_SIZE = 128
REPORTED_METRICS = ("pixel_auroc", "image_auroc", "aupro", "aupro_full_range")


def demo_config(category: str, **overrides: Any) -> Config:
    """The demo's config for one synthetic category."""
    settings = {**DEMO_SETTINGS, "augment": category in TEXTURE_CATEGORIES, "category": category}
    settings.update(overrides)
    return Config(**settings)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def write_overlays(evaluation: Evaluation, folder: Path, config: Config) -> None:
    """One PNG per test image: the image (model size) blended with its anomaly heatmap,
    all on one colour scale per category so that images can be compared."""
    folder.mkdir(parents=True, exist_ok=True)
    vmin, vmax = np.percentile(evaluation.maps, [1.0, 99.9])
    for sample, amap in zip(evaluation.samples, evaluation.maps, strict=True):
        pixels = data.read_image(sample.path, config.in_channels)
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        small = data.resize_image(tensor, config.image_size)[0].permute(1, 2, 0)
        picture = overlay(small.numpy(), colorize(amap, vmin, vmax))
        Image.fromarray(picture).save(folder / f"{sample.defect_type}_{sample.path.stem}.png")


def run_demo(
    out: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    categories: Sequence[str] = DEMO_CATEGORIES,
    overrides: dict[str, Any] | None = None,
    dataset_options: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Generate data (if absent), train and evaluate each category; write
    ``out/metrics.json``, ``out/<category>/model.safetensors`` and overlays. ``overrides``
    change the model config, ``dataset_options`` the generator (e.g. ``n_train``). Returns
    the metrics dict that was written."""
    out = Path(out)
    data_root = Path(data_dir) if data_dir is not None else out / "data"
    start = time.perf_counter()
    generator_options = {"size": DEMO_DATA_SIZE, **(dataset_options or {})}
    generate_demo_dataset(data_root, categories=categories, **generator_options)
    results: dict[str, dict[str, float]] = {}
    for category in categories:
        config = demo_config(category, **(overrides or {}))
        tick = time.perf_counter()
        detector = Detector(config, device=device).fit(data_root / category, progress=progress)
        evaluation = detector.evaluate(data_root / category, progress=progress)
        target = out / category
        target.mkdir(parents=True, exist_ok=True)
        detector.save(target / "model.safetensors")
        write_overlays(evaluation, target / "overlays", config)
        row = {k: evaluation.metrics[k] for k in REPORTED_METRICS}
        row["seconds"] = round(time.perf_counter() - tick, 2)
        results[category] = row
        log(
            f"{category:<8} pixel AUROC {row['pixel_auroc']:.4f}  image AUROC "
            f"{row['image_auroc']:.4f}  AUPRO@0.3 {row['aupro']:.4f}  ({row['seconds']:.0f} s)"
        )
    summary = {
        "categories": results,
        "mean": {k: _mean([r[k] for r in results.values()]) for k in REPORTED_METRICS},
        "config": {**DEMO_SETTINGS, **(overrides or {})},
        "seconds": round(time.perf_counter() - start, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "metrics.json")
    return summary
