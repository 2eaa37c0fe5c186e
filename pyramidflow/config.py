"""Configuration: the paper's defaults and the MVTec AD per-category presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

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
GEOMETRIES = ("resize", "native")
NORMALIZATIONS = ("auto", "imagenet", "dataset", "fixed")


@dataclass
class Config:
    """Everything that defines a model, its preprocessing and its training.

    Defaults are the paper's (method.md): 256 px, L = 4, S = 4, C = 16, k = 7, CVN,
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
    backend: str = "auto"
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
    # training
    batch_size: int = 2
    epochs: int = 15
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-4
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    augment: bool = False
    seed: int = 0
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(int(v) for v in self.image_size)  # type: ignore[assignment]
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.betas = tuple(float(v) for v in self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")
        for name in ("stacks", "channels", "in_channels", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.volume_norm not in ("CVN", "SVN"):
            raise ValueError(f"volume_norm must be 'CVN' or 'SVN', got {self.volume_norm!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise ValueError(f"threshold_quantile must be in (0, 1], got {self.threshold_quantile}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be auto, torch or triton, got {self.backend!r}")
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be (height, width), got {self.image_size}")
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
