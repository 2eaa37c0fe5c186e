"""The built-in demo: generate the synthetic categories, train, evaluate, write results.

The demo is sized to finish in a few minutes on two CPU cores: 64 x 64 px, L = 4, S = 2,
C = 16, k = 7, 8 epochs over 40 good images per category (the paper's model uses 256 px,
S = 4 and 15 epochs; see README). Texture categories use the paper's texture
augmentation; the object category none.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import preprocess
from .api import Detector, Evaluation
from .benchmark import CategoryJob, run_categories
from .config import Config
from .io.images import read_array, to_channels
from .synthetic import DEMO_CATEGORIES, TEXTURE_CATEGORIES, generate_demo_dataset
from .viz import heat_overlay

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


def demo_config(category: str, **overrides: Any) -> Config:
    """The demo's config for one synthetic category."""
    settings = {**DEMO_SETTINGS, "augment": category in TEXTURE_CATEGORIES, "category": category}
    settings.update(overrides)
    return Config(**settings)


def write_overlays(evaluation: Evaluation, folder: Path) -> None:
    """One PNG per test image: the image tinted with its anomaly heatmap where the map is
    high (:func:`~pyramidflow.viz.heat_overlay`), at the map's resolution (the one metrics
    were computed at), all on one colour scale per category so that images can be compared.
    Each image is read once, for the background."""
    folder.mkdir(parents=True, exist_ok=True)
    vmin, vmax = np.percentile(evaluation.maps, [1.0, 99.9])
    for sample, amap in zip(evaluation.samples, evaluation.maps, strict=True):
        array = read_array(sample.path)
        colour = preprocess.array_channels(array) == 3
        pixels = to_channels(array, 3 if colour else 1, str(sample.path))
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        background = preprocess.resize(tensor, amap.shape)[0].permute(1, 2, 0).numpy()
        picture = heat_overlay(background, amap, vmin, vmax)
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
    generator_options = {"size": DEMO_DATA_SIZE, **(dataset_options or {})}
    generate_demo_dataset(data_root, categories=categories, **generator_options)
    jobs = [
        CategoryJob(
            category,
            data_root / category,
            demo_config(category, **(overrides or {})),
            out / category / "model.safetensors",
        )
        for category in categories
    ]

    def overlays(job: CategoryJob, detector: Detector, evaluation: Evaluation) -> None:
        write_overlays(evaluation, out / job.name / "overlays")

    return run_categories(
        jobs,
        out / "metrics.json",
        retrain=True,
        info={"config": {**DEMO_SETTINGS, **(overrides or {})}},
        device=device,
        progress=progress,
        log=log,
        after=overlays,
    )
