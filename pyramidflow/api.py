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
import torch.nn.functional as F

from . import data, engine
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .metrics import evaluate_maps
from .model import PyramidFlow

ImageLike = str | os.PathLike[str] | np.ndarray


@dataclass
class Prediction:
    """One image's result: ``anomaly_map`` (H, W) float32 at the image's own resolution
    (higher is more anomalous) and ``score``, the maximum of the map at model resolution."""

    anomaly_map: np.ndarray
    score: float
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
    """A PyramidFlow model with its latent template and preprocessing."""

    def __init__(self, config: Config | None = None, *, device: str | torch.device = "cpu"):
        self.config = config or Config()
        self.device = torch.device(device)
        self.model: PyramidFlow | None = None
        self.template: list[torch.Tensor] | None = None
        self.info: dict[str, Any] = {}

    # -- training -------------------------------------------------------------------------
    def fit(
        self,
        source: str | os.PathLike[str] | Iterable[np.ndarray] | torch.Tensor,
        *,
        progress: bool = False,
    ) -> Detector:
        """Train on good images and compute the template. ``source``: an MVTec-layout
        category (uses train/good), a folder of images, an iterable of pixel arrays, or a
        normalized tensor (N, C, H, W) at the model size."""
        images = self._training_tensor(source, progress)
        torch.manual_seed(self.config.seed)
        self.model = PyramidFlow(self.config)
        report = engine.train(self.model, images, device=self.device, progress=progress)
        self.template = engine.compute_template(
            self.model, images, device=self.device, progress=progress
        )
        self.info = {
            "training_images": int(images.shape[0]),
            "steps": report.steps,
            "epoch_losses": report.epoch_losses,
            "train_seconds": round(report.seconds, 3),
        }
        return self

    def _training_tensor(self, source: Any, progress: bool) -> torch.Tensor:
        if isinstance(source, torch.Tensor):
            expected = (self.config.in_channels, *self.config.image_size)
            if source.dim() != 4 or tuple(source.shape[1:]) != expected:
                raise ValueError(
                    f"a training tensor must be (N, {expected[0]}, {expected[1]}, {expected[2]})"
                    f", got {tuple(source.shape)}"
                )
            return source.float()
        if isinstance(source, (str, os.PathLike)):
            return data.load_stack(data.training_images(source), self.config, progress=progress)
        return data.load_stack(list(source), self.config, progress=progress)

    # -- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write model, template, config and preprocessing to one ``.safetensors`` file."""
        model, template = self._ready()
        return save_checkpoint(path, model, template, info=self.info)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Detector:
        """Read a file written by :meth:`save`."""
        checkpoint = load_checkpoint(path)
        if checkpoint.template is None:
            raise ValueError(f"{path}: checkpoint has no latent template; train it with fit()")
        det = cls(checkpoint.config, device=device)
        det.model = checkpoint.model.to(det.device).eval()
        det.template = [t.to(det.device) for t in checkpoint.template]
        det.info = checkpoint.info
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

    def predict(
        self, images: ImageLike | Sequence[ImageLike] | torch.Tensor, *, batch_size: int = 8
    ) -> Prediction | list[Prediction]:
        """Anomaly map and score of an image file, a pixel array (uint8/uint16/float,
        HxW or HxWxC), a list of those, or a normalized tensor batch (N, C, H, W).
        One input gives one :class:`Prediction`, a list or batch gives a list."""
        if isinstance(images, torch.Tensor):
            maps, scores = self.score_batch(images, batch_size=batch_size)
            return [Prediction(m.numpy(), float(s)) for m, s in zip(maps, scores, strict=True)]
        single = isinstance(images, (str, os.PathLike, np.ndarray))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            arrays, names = [], []
            for i, item in enumerate(chunk):
                if isinstance(item, np.ndarray):
                    arrays.append(item)
                    names.append(f"array {start + i}")
                else:
                    arrays.append(data.read_array(item))
                    names.append(str(item))
            batch = torch.stack(
                [data.prepare(a, self.config, n) for a, n in zip(arrays, names, strict=True)]
            )
            maps, scores = self.score_batch(batch, batch_size=batch_size)
            for amap, score, array, name in zip(maps, scores, arrays, names, strict=True):
                full = upsample_map(amap, array.shape[:2])
                results.append(Prediction(full, float(score), name))
        return results[0] if single else results

    def evaluate(
        self, category: str | os.PathLike[str], *, batch_size: int = 8, progress: bool = False
    ) -> Evaluation:
        """Metrics on an MVTec-layout category's test split at the model's resolution
        (masks are resized to it, as in the paper's protocol)."""
        folder = data.open_category(category)
        images = data.load_stack([s.path for s in folder.test], self.config, progress=progress)
        maps, scores = self.score_batch(images, batch_size=batch_size, progress=progress)
        size = self.config.image_size
        masks = np.stack(
            [
                data.resize_mask(data.read_mask(s.mask_path), size)
                if s.mask_path is not None
                else np.zeros(size, dtype=bool)
                for s in folder.test
            ]
        )
        metrics = evaluate_maps(maps.numpy(), masks, scores.numpy())
        return Evaluation(metrics, maps.numpy(), masks, scores.numpy(), folder.test)


def upsample_map(amap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map bilinearly resized to ``size`` (H, W) as float32 numpy."""
    if tuple(amap.shape) == tuple(size):
        return amap.numpy().astype(np.float32, copy=False)
    resized = F.interpolate(amap[None, None], size=size, mode="bilinear", align_corners=False)
    return resized[0, 0].numpy().astype(np.float32, copy=False)
