"""Configuration: the paper's defaults and the MVTec AD per-category presets."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from pyramidflow_kernels import BACKENDS
from pyramidflow_kernels.coupling_reference import VN_DIMS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MVTEC_TEXTURES = frozenset({"carpet", "grid", "leather", "tile", "wood"})
MVTEC_SVN = frozenset({"carpet", "grid", "bottle", "transistor"})
MVTEC_LEVELS = {"metal_nut": 8, "carpet": 8, "transistor": 8, "screw": 2}

MEMORY_MODES = ("recompute", "store")
# precision of the parameter networks' convolutions (pyramidflow.model.precision)
CONV_PRECISIONS = ("fp32", "tf32", "bf16")
VOLUME_NORMS = tuple(VN_DIMS)  # ("CVN", "SVN"), as the coupling op knows them
MAX_LEVELS = 16  # 2^15 px per side at the least: beyond any image
#: Default pixel limit of the image readers: 2^28 = 16384 x 16384, checked on file headers.
DEFAULT_MAX_PIXELS = 2**28
_INTEGER_FIELDS = ("levels", "stacks", "channels", "kernel_size", "in_channels", "batch_size",
                   "epochs", "seed", "max_pixels")  # fmt: skip
_REAL_FIELDS = ("clamp", "holdout_fraction", "threshold_quantile", "lr", "eps",
                "weight_decay", "grad_clip")  # fmt: skip
GEOMETRIES = ("resize", "native")
# "paper": map = mean_c Compose(|z - T|), score = its max (the paper's recipe, bit for bit);
# "znorm": each latent's residual over the good images' standard deviation of it, the
# composed map smoothed (Gaussian, sigma 4 px per 256 px), score = its max (docs/method.md);
# "relative": znorm on latents standardized per image and channel, the map over its mean;
# "fused": relative's map, the image score fused over the pyramid levels (each level's
# own relative map's max over its mean on the good training images, averaged);
# "fused_peak": fused, or the unsmoothed relative map's peak over its good-image mean when
# that ratio is larger.
SCORINGS = ("paper", "znorm", "relative", "fused", "fused_peak")
NORMALIZATIONS = ("auto", "imagenet", "dataset", "fixed")


def _integer(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int within bounds, else ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _real(name: str, value: Any, minimum: float | None = None) -> float:
    """``value`` as a finite float, else ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _numbers(name: str, values: Any, kind: Any) -> tuple:
    """A tuple of validated numbers from a list or tuple (``kind`` is _integer or _real)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list of numbers, got {values!r}")
    if kind is _integer:
        return tuple(_integer(name, v, 1) for v in values)
    return tuple(_real(name, v) for v in values)


@dataclass
class Config:
    """Everything that defines a model, its preprocessing and its training.

    Defaults are the paper's (docs/method.md): 256 px, L = 4, S = 4, C = 16, k = 7, CVN,
    batch 2, Adam(2e-4, betas (0.5, 0.9), eps 1e-4, wd 1e-5), clip 1.0, 15 epochs.
    """

    levels: int = 4
    stacks: int = 4
    channels: int = 16
    kernel_size: int = 7
    volume_norm: str = "CVN"
    image_size: tuple[int, int] = (256, 256)
    in_channels: int = 3
    clamp: float = 2.0
    memory: str = "recompute"
    # MiB of transients per row band of a coupling block at high resolution (training and
    # inference; pyramidflow.model.tiling): None picks it from the device, 0 never tiles.
    # Same results either way (the bands compute the whole-image sums).
    memory_budget: int | None = None
    backend: str = "auto"
    # the parameter networks' convolutions: "fp32", "tf32" (CUDA only; fp32 elsewhere) or
    # "bf16" (autocast, CPU and CUDA); the coupling, VN, loss and template stay float32
    # (pyramidflow.model.precision)
    conv_precision: str = "fp32"
    # preprocessing: x = (pixel / max_value - mean) / std, per channel
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # "auto": ImageNet statistics for 8-bit RGB data, the training set's otherwise;
    # "fixed": keep mean/std as given. Resolved to "imagenet" or "dataset" by fitting.
    normalization: str = "auto"
    # "resize": images are resized to image_size; "native": trained and scored at their
    # own size, padded up to a multiple of 2^(levels-1) (image_size is the padded size).
    geometry: str = "resize"
    # thresholds without defective data: hold out this fraction of the good training
    # images and flag a pixel / image above this quantile of their scores
    holdout_fraction: float = 0.1
    threshold_quantile: float = 0.99
    # anomaly map and image score recipe, one of SCORINGS ("fused_peak": the best measured
    # on bench/accuracy_suite.py; "paper": the paper's, bit for bit)
    scoring: str = "fused_peak"
    # image files declaring more pixels than this are refused before decoding (a reading
    # policy, not part of the model: it may differ between training, resume and prediction)
    max_pixels: int = DEFAULT_MAX_PIXELS
    # training
    batch_size: int = 2
    epochs: int = 15
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    # texture augmentation (flips, quarter turns): True, False, or "auto" (decided from the
    # good images at fit time, see training.loop.resolve_augment; saved resolved)
    augment: bool | str = False
    seed: int = 0
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, numbers.Integral) and not isinstance(self.image_size, bool):
            self.image_size = (self.image_size, self.image_size)
        for name in _INTEGER_FIELDS:  # numpy integers and the like become plain ints
            setattr(self, name, _integer(name, getattr(self, name), -(2**63)))
        if self.memory_budget is not None:
            self.memory_budget = _integer("memory_budget", self.memory_budget, -(2**63))
        for name in _REAL_FIELDS:
            setattr(self, name, _real(name, getattr(self, name)))
        self.image_size = _numbers("image_size", self.image_size, _integer)  # type: ignore[assignment]
        self.mean = _numbers("mean", self.mean, _real)
        self.std = _numbers("std", self.std, _real)
        self.betas = _numbers("betas", self.betas, _real)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _integer("levels", self.levels, 2, MAX_LEVELS)
        for name in ("stacks", "channels", "in_channels", "batch_size", "epochs"):
            _integer(name, getattr(self, name), 1)
        _integer("seed", self.seed, 0)
        _integer("max_pixels", self.max_pixels, 1)
        if self.memory_budget is not None:
            _integer("memory_budget", self.memory_budget, 0)
        if _integer("kernel_size", self.kernel_size, 1) % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        for name in ("clamp", "lr", "eps", "grad_clip"):
            if _real(name, getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if _real("weight_decay", self.weight_decay) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two values in [0, 1), got {list(self.betas)}")
        if not isinstance(self.augment, bool) and self.augment != "auto":
            raise ValueError(f"augment must be true, false or 'auto', got {self.augment!r}")
        if self.category is not None and not isinstance(self.category, str):
            raise ValueError(f"category must be a name or null, got {self.category!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a JSON object, got {self.extra!r}")
        for name, allowed in (
            ("volume_norm", VOLUME_NORMS), ("memory", MEMORY_MODES),
            ("normalization", NORMALIZATIONS), ("geometry", GEOMETRIES), ("backend", BACKENDS),
            ("scoring", SCORINGS), ("conv_precision", CONV_PRECISIONS),
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if not 0.0 <= _real("holdout_fraction", self.holdout_fraction) < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if not 0.0 < _real("threshold_quantile", self.threshold_quantile) <= 1.0:
            raise ValueError(f"threshold_quantile must be in (0, 1], got {self.threshold_quantile}")
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be (height, width), got {list(self.image_size)}")
        step = 2 ** (self.levels - 1)
        if any(v % step or v < step for v in self.image_size):
            raise ValueError(
                f"image_size {self.image_size} must be positive multiples of 2^(levels-1) = "
                f"{step} for levels = {self.levels}"
            )
        if self.channels < self.in_channels:
            raise ValueError(
                f"channels ({self.channels}) must be >= in_channels ({self.in_channels}) for "
                "the semi-invertible input projection"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean and std need {self.in_channels} values (one per input channel), got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    @classmethod
    def for_category(cls, category: str, **overrides: Any) -> Config:
        """The paper's preset for an MVTec AD category (levels, VN, augmentation)."""
        if category not in MVTEC_CATEGORIES:
            raise ValueError(
                f"unknown MVTec AD category {category!r}; known: {', '.join(MVTEC_CATEGORIES)}"
            )
        preset: dict[str, Any] = {
            "levels": MVTEC_LEVELS.get(category, 4),
            "volume_norm": "SVN" if category in MVTEC_SVN else "CVN",
            "augment": category in MVTEC_TEXTURES,
            "category": category,
        }
        preset.update(overrides)
        return cls(**preset)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        """Build from a dict; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown config keys: {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
