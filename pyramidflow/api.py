"""The Python API: fit on good images, save/load one file, predict, evaluate.

>>> det = Detector(Config(image_size=64, stacks=2, epochs=8)).fit("data/weave")
>>> det.save("weave.safetensors")
>>> Detector.load("weave.safetensors").predict("data/weave/test/scratch/000.png").score
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data, engine, preprocess
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config
from .errors import DataError
from .metrics import evaluate_maps, f1_max
from .model import PyramidFlow
from .progress import progress_bar

ImageLike = str | os.PathLike[str] | np.ndarray


@dataclass
class Prediction:
    """One image's result at the image's own resolution.

    ``anomaly_map``: float32 (H, W), higher is more anomalous. ``score``: the maximum of the
    map at model resolution. ``mask``: bool (H, W), the map at or above the detector's
    threshold; ``is_anomalous``: the score at or above it (both ``None`` without one).
    """

    anomaly_map: np.ndarray
    score: float
    mask: np.ndarray | None = None
    is_anomalous: bool | None = None
    source: str = ""


@dataclass
class Evaluation:
    """Metrics of one MVTec-layout category plus the raw maps they came from."""

    metrics: dict[str, float]
    maps: np.ndarray
    masks: np.ndarray
    scores: np.ndarray
    samples: list[data.Sample]


class Detector:
    """A PyramidFlow model with its latent template, preprocessing and thresholds."""

    def __init__(self, config: Config | None = None, *, device: str | torch.device = "cpu"):
        self.config = config or Config()
        self.device = torch.device(device)
        self.model: PyramidFlow | None = None
        self.template: list[torch.Tensor] | None = None
        self.threshold: float | None = None
        self.info: dict[str, Any] = {}

    # -- training -------------------------------------------------------------------------
    def fit(
        self,
        source: str | os.PathLike[str] | Iterable[np.ndarray] | torch.Tensor,
        *,
        progress: bool = False,
    ) -> Detector:
        """Train on good images, compute the template and the threshold.

        ``source``: an MVTec-layout category (uses train/good), a folder of images, an
        iterable of pixel arrays, or an already normalized tensor (N, C, H, W) at the model
        size. A ``holdout_fraction`` of the images (chosen by the seed) is not trained on:
        the threshold is the ``threshold_quantile`` of their image scores.
        """
        if isinstance(source, torch.Tensor):
            images = self._checked_tensor(source)
        else:
            arrays, names = self._read_training(source, progress)
            self.config = preprocess.resolve(self.config, arrays, names)
            images = torch.stack(
                [
                    preprocess.prepare(a, self.config, n)
                    for a, n in progress_bar(
                        list(zip(arrays, names, strict=True)), "preparing", enabled=progress
                    )
                ]
            )
        fit_part, held_out = self._split(images.shape[0])
        torch.manual_seed(self.config.seed)
        self.model = PyramidFlow(self.config)
        train_images = images[fit_part]
        report = engine.train(self.model, train_images, device=self.device, progress=progress)
        self.template = engine.compute_template(
            self.model, train_images, device=self.device, progress=progress
        )
        source_of_threshold = "held-out good images" if len(held_out) else "training images"
        reference = images[held_out] if len(held_out) else train_images
        _, scores = self.score_batch(reference)
        self.threshold = float(np.quantile(scores.numpy(), self.config.threshold_quantile))
        self.info = {
            "training_images": int(len(fit_part)),
            "held_out_images": int(len(held_out)),
            "threshold": self.threshold,
            "threshold_from": source_of_threshold,
            "steps": report.steps,
            "epoch_losses": report.epoch_losses,
            "train_seconds": round(report.seconds, 3),
        }
        return self

    def _checked_tensor(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.config.in_channels, *self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"a training tensor must be (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}"
            )
        return images.float()

    def _read_training(self, source: Any, progress: bool) -> tuple[list[np.ndarray], list[str]]:
        if isinstance(source, (str, os.PathLike)):
            paths = data.training_images(source)
            arrays = [data.read_array(p) for p in progress_bar(paths, "reading", enabled=progress)]
            return arrays, [str(p) for p in paths]
        arrays = [np.asarray(a) for a in source]
        return arrays, [f"array {i}" for i in range(len(arrays))]

    def _split(self, n: int) -> tuple[list[int], list[int]]:
        """Indices to train on and to hold out for the threshold (seeded, at least two full
        batches stay for training; nothing is held out from tiny sets)."""
        held = int(round(n * self.config.holdout_fraction))
        held = max(0, min(held, n - 2 * self.config.batch_size))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed))
        return sorted(order[held:].tolist()), sorted(order[:held].tolist())

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write model, template, config, preprocessing and threshold to one file."""
        model, template = self._ready()
        return save_checkpoint(path, model, template, info=self.info)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Detector:
        """Read a file written by :meth:`save`."""
        checkpoint = load_checkpoint(path)
        if checkpoint.template is None:
            raise CheckpointError(f"{path}: checkpoint has no latent template; train it first")
        det = cls(checkpoint.config, device=device)
        det.model = checkpoint.model.to(det.device).eval()
        det.template = [t.to(det.device) for t in checkpoint.template]
        det.info = checkpoint.info
        threshold = det.info.get("threshold")
        det.threshold = float(threshold) if threshold is not None else None
        return det

    def _ready(self) -> tuple[PyramidFlow, list[torch.Tensor]]:
        if self.model is None or self.template is None:
            raise RuntimeError("this detector is not trained: call fit() or Detector.load()")
        return self.model, self.template

    # -- inference ------------------------------------------------------------------------
    def score_batch(
        self, images: torch.Tensor, *, batch_size: int = 8, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (N, H, W) at model size and scores (N,) of a normalized batch."""
        model, template = self._ready()
        return engine.anomaly_maps(
            model, template, images, batch_size=batch_size, device=self.device, progress=progress
        )

    def _result(self, amap: np.ndarray, score: float, source: str) -> Prediction:
        if self.threshold is None:
            return Prediction(amap, score, source=source)
        return Prediction(
            amap, score, amap >= self.threshold, bool(score >= self.threshold), source
        )

    def predict(
        self, images: ImageLike | Sequence[ImageLike] | torch.Tensor, *, batch_size: int = 8
    ) -> Prediction | list[Prediction]:
        """Map, score and mask of an image file, a pixel array (uint8/uint16/float, HxW or
        HxWxC), a list of those, or a normalized tensor batch (N, C, H, W).
        One input gives one :class:`Prediction`, a list or batch gives a list."""
        if isinstance(images, torch.Tensor):
            maps, scores = self.score_batch(images, batch_size=batch_size)
            return [
                self._result(m.numpy(), float(s), "") for m, s in zip(maps, scores, strict=True)
            ]
        single = isinstance(images, (str, os.PathLike, np.ndarray))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            arrays, names = [], []
            for i, item in enumerate(items[start : start + batch_size]):
                if isinstance(item, np.ndarray):
                    arrays.append(item)
                    names.append(f"array {start + i}")
                else:
                    arrays.append(data.read_array(item))
                    names.append(str(item))
            batch = torch.stack(
                [preprocess.prepare(a, self.config, n) for a, n in zip(arrays, names, strict=True)]
            )
            maps, scores = self.score_batch(batch, batch_size=batch_size)
            for amap, score, array, name in zip(maps, scores, arrays, names, strict=True):
                full = preprocess.restore_map(amap, array.shape[:2], self.config)
                results.append(self._result(full, float(score), name))
        return results[0] if single else results

    def evaluate(
        self, category: str | os.PathLike[str], *, batch_size: int = 8, progress: bool = False
    ) -> Evaluation:
        """Metrics on an MVTec-layout category's test split. With ``geometry="resize"``
        maps are compared at the model's resolution (masks resized, the paper's protocol);
        with ``"native"`` at the images' own resolution."""
        folder = data.open_category(category)
        samples = folder.test
        maps, scores, masks = [], [], []
        for sample in progress_bar(samples, "evaluating", enabled=progress):
            array = data.read_array(sample.path)
            amap, score = self.score_batch(
                preprocess.prepare(array, self.config, str(sample.path))[None]
            )
            maps.append(
                preprocess.restore_map(amap[0], array.shape[:2], self.config)
                if self.config.geometry == "native"
                else amap[0].numpy()
            )
            scores.append(float(score[0]))
            if sample.mask_path is None:
                mask = np.zeros(maps[-1].shape, dtype=bool)
            else:
                mask = preprocess.model_mask(data.read_mask(sample.mask_path), self.config)
                if mask.shape != maps[-1].shape:
                    raise DataError(
                        f"{sample.mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but its "
                        f"image {sample.path} is {array.shape[0]}x{array.shape[1]}"
                    )
            masks.append(mask)
        map_stack, mask_stack = np.stack(maps), np.stack(masks)
        score_array = np.asarray(scores, dtype=np.float32)
        metrics = evaluate_maps(map_stack, mask_stack, score_array)
        labels = np.array([s.is_defective for s in samples])
        if labels.any() and not labels.all():
            metrics["image_f1_threshold"] = f1_max(score_array, labels)[1]
        if self.threshold is not None:
            metrics["threshold"] = self.threshold
            metrics["good_flagged"] = (
                float((score_array[~labels] >= self.threshold).mean())
                if (~labels).any()
                else float("nan")
            )
            metrics["defective_flagged"] = (
                float((score_array[labels] >= self.threshold).mean())
                if labels.any()
                else float("nan")
            )
        return Evaluation(metrics, map_stack, mask_stack, score_array, samples)
