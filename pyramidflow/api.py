"""The Python API: fit on good images, save/load one file, predict, evaluate.

>>> det = Detector(Config(image_size=64, stacks=2, epochs=8)).fit("data/weave")
>>> det.save("weave.safetensors")
>>> Detector.load("weave.safetensors").predict("data/weave/test/scratch/000.png").score
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import preprocess
from .config import DEFAULT_MAX_PIXELS, Config
from .errors import DataError
from .io.checkpoint import (
    LEVEL_SCALE_KEY,
    SPREAD_PREFIX,
    CheckpointError,
    level_scale_from_extras,
    load_checkpoint,
    save_checkpoint,
    spread_from_extras,
)
from .io.datasets import Sample, open_category, training_images
from .io.images import read_array, read_mask
from .metrics import decision_threshold, evaluate_maps, f1_max
from .model.flow import PyramidFlow
from .model.scoring import anomaly_maps, uses_level_scale, uses_spread
from .progress import progress_bar
from .training.loop import resolve_augment, train
from .training.template import (
    compute_level_scale,
    compute_template,
    compute_template_and_spread,
)

ImageLike = str | os.PathLike[str] | np.ndarray
EpochCallback = Callable[[int, float, "dict[str, float] | None"], None]


@dataclass
class Prediction:
    """One image's result at the image's own resolution.

    ``anomaly_map``: float32 (H, W), higher is more anomalous. ``score``: the image score of
    the scoring recipe (the map's maximum at model resolution, or for ``fused`` /
    ``fused_peak`` the levels' fused maxima). ``mask``: bool (H, W), the map at or above
    the detector's :meth:`~Detector.map_threshold`; ``is_anomalous``: the score at or
    above its threshold (both ``None`` without one).
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
    samples: list[Sample]


#: Below this many images the threshold is called rough (train, report).
MIN_THRESHOLD_IMAGES = 10
HELD_OUT = "held-out good images"


class Detector:
    """A PyramidFlow model with its latent template, preprocessing and thresholds."""

    def __init__(self, config: Config | None = None, *, device: str | torch.device = "cpu"):
        self.config = config or Config()
        self.device = torch.device(device)
        self.model: PyramidFlow | None = None
        self.template: list[torch.Tensor] | None = None
        # the good images' standard deviation of every latent element (scoring "znorm",
        # "relative", "fused", "fused_peak") and mean maximum of every level's map
        # ("fused", and the peak's for "fused_peak")
        self.spread: list[torch.Tensor] | None = None
        self.level_scale: torch.Tensor | None = None
        self.threshold: float | None = None
        self.info: dict[str, Any] = {}

    # -- training -------------------------------------------------------------------------
    def fit(
        self,
        source: str | os.PathLike[str] | Iterable[np.ndarray] | torch.Tensor,
        *,
        progress: bool = False,
        checkpoint_path: str | os.PathLike[str] | None = None,
        resume: bool = False,
        checkpoint_every_steps: int | None = None,
        eval_data: str | os.PathLike[str] | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> Detector:
        """Train on good images, compute the template and the threshold.

        ``source``: an MVTec-layout category (uses train/good), a folder of images, an
        iterable of pixel arrays, or an already normalized tensor (N, C, H, W) at the model
        size. A ``holdout_fraction`` of the images (chosen by the seed) is not trained on:
        the threshold is the ``threshold_quantile`` of their image scores.

        ``checkpoint_path``: write the training state there after every epoch (and every
        ``checkpoint_every_steps`` steps); ``resume=True`` continues from it when it exists
        and ends with the weights of an uninterrupted run (see
        :func:`pyramidflow.training.loop.train`).
        ``eval_data``: an MVTec-layout category whose test split is evaluated after every
        epoch, in eval mode, without touching the training's RNG or VN statistics; the
        metrics go to ``info["epoch_metrics"]`` (epochs trained in this call only). They
        never choose the model: it is always the last epoch's.
        ``on_epoch(epoch, mean_loss, metrics_or_None)`` is called after every epoch.
        """
        if eval_data is not None:
            open_category(eval_data)  # fail before training, not after the first epoch
        if isinstance(source, torch.Tensor):
            images = self._checked_tensor(source)
        else:
            self.config, images = preprocess.fit_stack(
                self._training_items(source), self.config, progress=progress
            )
        self.config, stationarity = resolve_augment(self.config, images)
        n = images.shape[0]
        fit_part, held_out = self._split(n)
        train_images = images if len(fit_part) == n else images[fit_part]
        reference = images[held_out] if held_out else train_images
        del images  # the full stack is not needed beside its two parts
        torch.manual_seed(self.config.seed)
        self.model = model = PyramidFlow(self.config)
        self.template, self.spread, self.threshold = None, None, None
        self.level_scale = None
        epoch_metrics: list[dict[str, float]] = []

        def after_epoch(epoch: int, loss: float) -> None:
            metrics = None
            if eval_data is not None:
                metrics = self._evaluate_during_training(model, train_images, eval_data)
                epoch_metrics.append({"epoch": epoch + 1, "loss": loss, **metrics})
            if on_epoch is not None:
                on_epoch(epoch, loss, metrics)

        report = train(
            model,
            train_images,
            device=self.device,
            progress=progress,
            checkpoint_path=checkpoint_path,
            checkpoint_every_steps=checkpoint_every_steps,
            resume=resume,
            on_epoch=after_epoch if eval_data is not None or on_epoch is not None else None,
        )
        self._compute_template(model, train_images, progress)
        source_of_threshold = HELD_OUT if held_out else "training images"
        maps, scores = self.score_batch(reference)
        self.threshold, threshold_rule = decision_threshold(
            scores.numpy(), self.config.threshold_quantile
        )
        # masks and overlays compare map values, which are on the score's scale only when
        # the score is the map's maximum (not for "fused*"): the same rule over map maxima
        map_threshold, _ = decision_threshold(
            maps.flatten(1).amax(1).numpy(), self.config.threshold_quantile
        )
        self.info = {
            "training_images": int(len(fit_part)),
            "held_out_images": int(len(held_out)),
            "threshold": self.threshold,
            "map_threshold": map_threshold,
            "threshold_from": source_of_threshold,
            "threshold_images": int(len(reference)),
            "threshold_quantile": self.config.threshold_quantile,
            "threshold_rule": threshold_rule,
            "steps": report.steps,
            "epoch_losses": report.epoch_losses,
            "train_seconds": round(report.seconds, 3),
        }
        if stationarity is not None:
            # augment="auto": what decided it (docs/method.md section 7)
            self.info["augment_auto"] = {"stationarity_ratio": stationarity,
                                         "augment": self.config.augment}  # fmt: skip
        if report.start_epoch:
            self.info["resumed_at_epoch"] = report.start_epoch
        if eval_data is not None:
            self.info["epoch_metrics"] = epoch_metrics
            self.info["epoch_metrics_data"] = str(eval_data)
        return self

    def threshold_images(self) -> int | None:
        """How many images' scores the threshold is a quantile of (``None``: unknown, e.g.
        imported weights). Models saved before this was recorded: from the split sizes."""
        info = self.info
        if self.threshold is None:
            return None
        if "threshold_images" in info:
            return int(info["threshold_images"])
        key = "held_out_images" if info.get("threshold_from") == HELD_OUT else "training_images"
        return int(info[key]) if key in info else None

    def threshold_origin(self) -> str | None:
        """Where the threshold comes from, for people: ``"0.99 quantile of the scores of 3
        held-out good images"`` (``None`` when unknown)."""
        count = self.threshold_images()
        if count is None:
            return None
        quantile = self.info.get("threshold_quantile", self.config.threshold_quantile)
        source = self.info.get("threshold_from", "images")
        if self.info.get("threshold_rule") == "log-normal bound":
            return (
                f"{quantile:g} prediction bound of a log-normal fit to the scores of {count} "
                f"{source}"
            )
        return f"{quantile:g} quantile of the scores of {count} {source}"

    def threshold_warning(self) -> str | None:
        """One line when the threshold comes from fewer than :data:`MIN_THRESHOLD_IMAGES`
        images: a high quantile of so few scores is about their maximum and flags good
        images more often than the quantile promises."""
        count = self.threshold_images()
        if count is None or count >= MIN_THRESHOLD_IMAGES:
            return None
        return (
            f"the threshold comes from only {count} image(s) (fewer than "
            f"{MIN_THRESHOLD_IMAGES}): it is uncertain, expect good images to be flagged; train "
            "on more good images or hold out more of them (config holdout_fraction)"
        )

    def _compute_template(self, model: PyramidFlow, images: torch.Tensor, progress: bool) -> None:
        """The template, and the spread and level scale when the scoring recipe needs them."""
        self.spread, self.level_scale = None, None
        if uses_spread(self.config.scoring):
            self.template, self.spread = compute_template_and_spread(
                model, images, recipe=self.config.scoring, device=self.device, progress=progress
            )
        else:
            self.template = compute_template(model, images, device=self.device, progress=progress)
        if uses_level_scale(self.config.scoring):
            self.level_scale = compute_level_scale(
                model,
                images,
                self.template,
                self.spread,
                device=self.device,
                progress=progress,
                recipe=self.config.scoring,
            )

    def _evaluate_during_training(
        self, model: PyramidFlow, train_images: torch.Tensor, category: str | os.PathLike[str]
    ) -> dict[str, float]:
        """Test metrics of the model as it is now; the caller's RNG states, the model's
        training mode and its VN running means are as before."""
        was_training = model.training
        cuda = self.device.type == "cuda"
        devices = [self.device.index if self.device.index is not None else 0] if cuda else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                self._compute_template(model, train_images, progress=False)
                return self.evaluate(category).metrics
        finally:
            self.template, self.spread, self.level_scale = None, None, None
            model.train(was_training)

    def _checked_tensor(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.config.in_channels, *self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"a training tensor must be (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(images.shape)}"
            )
        return images.float()

    @staticmethod
    def _training_items(source: Any) -> list[Path] | list[np.ndarray]:
        """Image paths of a folder or category, or the given pixel arrays."""
        if isinstance(source, (str, os.PathLike)):
            return training_images(source)
        return [np.asarray(a) for a in source]

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
        extra = {f"{SPREAD_PREFIX}{level}": s for level, s in enumerate(self.spread or [])}
        if self.level_scale is not None:
            extra[LEVEL_SCALE_KEY] = self.level_scale
        return save_checkpoint(path, model, template, info=self.info, extra_tensors=extra)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Detector:
        """Read a file written by :meth:`save`. ``max_pixels`` is the pixel limit of the
        image files this detector reads (the caller's policy, not the file's)."""
        checkpoint = load_checkpoint(path)
        if checkpoint.template is None:
            raise CheckpointError(f"{path}: checkpoint has no latent template; train it first")
        try:
            config = checkpoint.config.replace(max_pixels=max_pixels)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        det = cls(config, device=device)
        det.model = checkpoint.model.to(det.device).eval()
        det.template = [t.to(det.device) for t in checkpoint.template]
        if uses_spread(det.config.scoring):
            det.spread = [s.to(det.device) for s in spread_from_extras(checkpoint, path)]
        if uses_level_scale(det.config.scoring):
            det.level_scale = level_scale_from_extras(checkpoint, path).to(det.device)
        det.info = checkpoint.info
        threshold = det.info.get("threshold")
        det.threshold = float(threshold) if threshold is not None else None
        return det

    def _ready(self) -> tuple[PyramidFlow, list[torch.Tensor]]:
        if self.model is None or self.template is None:
            raise RuntimeError("this detector is not trained: call fit() or Detector.load()")
        if uses_spread(self.config.scoring) and self.spread is None:
            raise RuntimeError(
                f"scoring {self.config.scoring!r} needs the latent spread of the good images: "
                "call fit()"
            )
        if uses_level_scale(self.config.scoring) and self.level_scale is None:
            raise RuntimeError(
                f"scoring {self.config.scoring!r} needs the level scale of the good images: "
                "call fit()"
            )
        return self.model, self.template

    # -- inference ------------------------------------------------------------------------
    def score_batch(
        self, images: torch.Tensor, *, batch_size: int = 8, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps (N, H, W) at model size and scores (N,) of a normalized batch."""
        model, template = self._ready()
        return anomaly_maps(
            model, template, images, spread=self.spread, recipe=self.config.scoring,
            level_scale=self.level_scale, batch_size=batch_size, device=self.device,
            progress=progress,
        )  # fmt: skip

    def _checked_batch(self, images: torch.Tensor) -> torch.Tensor:
        model, _ = self._ready()
        if images.dim() != 4:
            raise ValueError(
                f"a tensor batch must be (N, C, H, W), got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"a tensor batch must hold normalized floats, got {images.dtype}")
        model.check_input(images)  # here too: an empty batch never reaches the model
        return images.to(next(model.parameters()).dtype)

    @staticmethod
    def _check_finite(maps: torch.Tensor, scores: torch.Tensor, names: Sequence[str]) -> None:
        finite = torch.isfinite(maps).flatten(1).all(1) & torch.isfinite(scores)
        if not bool(finite.all()):
            bad = names[int((~finite).nonzero()[0, 0])]
            raise DataError(
                f"{bad}: the anomaly map is not finite (NaN/Inf values, or pixel values far "
                "outside the image type's range)"
            )

    def map_threshold(self) -> float | None:
        """The map value at and above which a pixel is flagged (masks, overlay colours): the
        threshold's rule applied to the maps' maxima of the same held-out images. It equals
        :attr:`threshold` when the recipe's score is the map's maximum (all but ``fused``
        and ``fused_peak``, and model files written before it existed)."""
        if self.threshold is None:
            return None
        value = self.info.get("map_threshold")
        return self.threshold if value is None else float(value)

    def _result(self, amap: np.ndarray, score: float, source: str) -> Prediction:
        map_threshold = self.map_threshold()
        if self.threshold is None or map_threshold is None:
            return Prediction(amap, score, source=source)
        return Prediction(amap, score, amap >= map_threshold, bool(score >= self.threshold), source)

    def predict(
        self, images: ImageLike | Sequence[ImageLike] | torch.Tensor, *, batch_size: int = 8
    ) -> Prediction | list[Prediction]:
        """Map, score and mask of an image file, a pixel array (bool/integer/float, HxW or
        HxWxC), a list of those, or a normalized float tensor batch (N, C, H, W).
        One input gives one :class:`Prediction`, a list or batch gives a list.

        Unusable images (unreadable, empty, wrong channel count, NaN/Inf pixels, values so
        far out of range that the map is not finite) raise :class:`DataError` naming the
        image; a badly shaped tensor raises ValueError, an item that is neither a path nor
        an array TypeError."""
        if isinstance(images, torch.Tensor):
            batch = self._checked_batch(images)
            maps, scores = self.score_batch(batch, batch_size=batch_size)
            names = [f"tensor item {i}" for i in range(len(maps))]
            self._check_finite(maps, scores, names)
            return [
                self._result(m.numpy(), float(s), "") for m, s in zip(maps, scores, strict=True)
            ]
        if isinstance(images, np.generic):  # a numpy scalar: a 0-d array, not an image
            images = np.asarray(images)
        single = isinstance(images, (str, os.PathLike, np.ndarray))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            inputs, shapes, names = [], [], []
            for i, item in enumerate(items[start : start + batch_size]):
                if isinstance(item, np.ndarray):
                    name = f"array {start + i}"
                    array = item
                elif isinstance(item, (str, os.PathLike)):
                    name = str(item)
                    array = read_array(item, self.config.max_pixels)
                else:
                    raise TypeError(
                        "predict takes image paths, numpy arrays, a list of those or a tensor "
                        f"batch; item {start + i} is a {type(item).__name__}"
                    )
                inputs.append(preprocess.prepare(array, self.config, name))
                shapes.append(array.shape[:2])
                names.append(name)
                del array  # only the model-size input is kept for the batch
            maps, scores = self.score_batch(torch.stack(inputs), batch_size=batch_size)
            self._check_finite(maps, scores, names)
            for amap, score, shape, name in zip(maps, scores, shapes, names, strict=True):
                full = preprocess.restore_map(amap, shape, self.config)
                results.append(self._result(full, float(score), name))
        return results[0] if single else results

    def evaluate(
        self, category: str | os.PathLike[str], *, batch_size: int = 8, progress: bool = False
    ) -> Evaluation:
        """Metrics on an MVTec-layout category's test split. With ``geometry="resize"``
        maps are compared at the model's resolution (masks resized, the paper's protocol);
        with ``"native"`` at the images' own resolution."""
        folder = open_category(category)
        samples = folder.test
        maps, scores, masks = [], [], []
        chunks = range(0, len(samples), batch_size)
        for start in progress_bar(chunks, "evaluating", enabled=progress):
            chunk = samples[start : start + batch_size]
            inputs, shapes = [], []
            for sample in chunk:  # one raw image at a time; the batch holds model inputs
                array = read_array(sample.path, self.config.max_pixels)
                inputs.append(preprocess.prepare(array, self.config, str(sample.path)))
                shapes.append(array.shape[:2])
                del array
            chunk_maps, chunk_scores = self.score_batch(torch.stack(inputs), batch_size=batch_size)
            del inputs
            for amap, score, shape, sample in zip(
                chunk_maps, chunk_scores, shapes, chunk, strict=True
            ):
                maps.append(
                    preprocess.restore_map(amap, shape, self.config)
                    if self.config.geometry == "native"
                    else amap.numpy()
                )
                scores.append(float(score))
                if sample.mask_path is None:
                    mask = np.zeros(maps[-1].shape, dtype=bool)
                else:
                    raw_mask = read_mask(sample.mask_path, self.config.max_pixels)
                    if raw_mask.shape[:2] != shape:  # before any resize hides it
                        raise DataError(
                            f"{sample.mask_path}: mask is {raw_mask.shape[0]}x"
                            f"{raw_mask.shape[1]} but its image {sample.path} is "
                            f"{shape[0]}x{shape[1]}"
                        )
                    mask = preprocess.model_mask(raw_mask, self.config)
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
