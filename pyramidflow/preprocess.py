"""From pixel arrays to model inputs and back: channels, normalization, geometry.

``fit`` resolves the data-dependent parts of a config once, from the training images:
grayscale data get a 1-channel model, 8-bit RGB data the paper's ImageNet statistics and
everything else (16-bit, float, gray) the statistics of the training set; with
``geometry="native"`` the model size is the images' own size padded up to a multiple of
2^(levels-1). The resolved config is stored in the checkpoint, so prediction repeats
exactly what training did.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import IMAGENET_MEAN, IMAGENET_STD, Config
from .errors import DataError
from .io.images import read_array, resize_mask, to_channels
from .progress import progress_bar

_MIN_STD = 1e-3  # a constant channel must not divide by zero


def array_channels(array: np.ndarray) -> int:
    """Colour channels of an (H, W[, C]) pixel array, alpha not counted."""
    if array.ndim == 2:
        return 1
    return {1: 1, 2: 1, 3: 3, 4: 3}.get(array.shape[2], array.shape[2])


def padded_size(height: int, width: int, levels: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of 2^(levels-1)."""
    step = 2 ** (levels - 1)
    return (math.ceil(height / step) * step, math.ceil(width / step) * step)


def resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of (B, C, H, W) to ``size``."""
    size = (int(size[0]), int(size[1]))
    if tuple(pixels.shape[-2:]) == size:
        return pixels
    shrink = size[0] < pixels.shape[-2] or size[1] < pixels.shape[-1]
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def normalize(pixels: torch.Tensor, config: Config) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> the model's input ``(x - mean) / std``."""
    mean = torch.tensor(config.mean, dtype=pixels.dtype, device=pixels.device)
    std = torch.tensor(config.std, dtype=pixels.dtype, device=pixels.device)
    return (pixels - mean[:, None, None]) / std[:, None, None]


def _unit_tensor(array: np.ndarray, channels: int, source: str) -> torch.Tensor:
    pixels = to_channels(array, channels, source)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def to_geometry(pixels: torch.Tensor, config: Config, source: str) -> torch.Tensor:
    """(1, C, h, w) in [0, 1] -> (1, C, H, W) at the model size: resized, or padded by edge
    replication (``geometry="native"``)."""
    if config.geometry == "resize":
        return resize(pixels, config.image_size)
    height, width = pixels.shape[-2:]
    target_h, target_w = config.image_size
    if height > target_h or width > target_w:
        raise DataError(
            f"{source}: image is {height}x{width} but this native-size model was trained at "
            f"{target_h}x{target_w}; use images of that size or a geometry='resize' model"
        )
    if (height, width) == (target_h, target_w):
        return pixels
    return F.pad(pixels, (0, target_w - width, 0, target_h - height), mode="replicate")


def prepare(array: np.ndarray, config: Config, source: str = "image") -> torch.Tensor:
    """One pixel array -> the normalized model input (C, H, W)."""
    pixels = _unit_tensor(array, config.in_channels, source)
    smallest = 2 ** (config.levels - 1)
    if min(pixels.shape[-2:]) < smallest:
        raise DataError(
            f"{source}: image is {pixels.shape[-2]}x{pixels.shape[-1]}, smaller than the "
            f"{smallest} pixels per side that {config.levels} pyramid levels need"
        )
    pixels = to_geometry(pixels, config, source)
    return normalize(pixels, config)[0].contiguous()


def restore_map(amap: torch.Tensor, original: tuple[int, int], config: Config) -> np.ndarray:
    """A (H, W) map at model size -> float32 (h, w) at the image's own size: bilinear
    resize, or crop of the padding (``geometry="native"``)."""
    if config.geometry == "native":
        return amap[: original[0], : original[1]].numpy().astype(np.float32, copy=True)
    if tuple(amap.shape) == tuple(original):
        return amap.numpy().astype(np.float32, copy=True)
    resized = F.interpolate(amap[None, None], size=original, mode="bilinear", align_corners=False)
    return resized[0, 0].numpy().astype(np.float32, copy=True)


def model_mask(mask: np.ndarray, config: Config) -> np.ndarray:
    """A ground-truth mask in the geometry maps are evaluated in: resized to the model size
    (``resize``, the paper's protocol), or as it is (``native``: maps are cropped)."""
    if config.geometry == "resize":
        return resize_mask(mask, config.image_size)
    return mask


def resolve(config: Config, arrays: Sequence[np.ndarray], names: Sequence[str]) -> Config:
    """The config with channels, model size and normalization fixed from training arrays."""
    if not arrays:
        raise DataError("no training images given")
    changes: dict = {}
    first = arrays[0]
    channels = config.in_channels
    if config.normalization != "fixed":
        channels = array_channels(first)
        if channels not in (1, 3):
            raise DataError(f"{names[0]}: {channels}-channel images are not supported")
        changes["in_channels"] = channels
    if config.geometry == "native":
        sizes = {a.shape[:2] for a in arrays}
        if len(sizes) > 1:
            odd = next(
                n for a, n in zip(arrays, names, strict=True) if a.shape[:2] != first.shape[:2]
            )
            raise DataError(
                f"{odd}: native-size training needs images of one size; {names[0]} is "
                f"{first.shape[0]}x{first.shape[1]}, this one differs"
            )
        changes["image_size"] = padded_size(*first.shape[:2], config.levels)
    mode = config.normalization
    if mode == "auto":
        mode = "imagenet" if channels == 3 and first.dtype == np.uint8 else "dataset"
    if mode == "imagenet":
        if channels != 3:
            raise DataError("ImageNet normalization needs RGB images; use 'dataset'")
        changes.update(mean=IMAGENET_MEAN, std=IMAGENET_STD, normalization="imagenet")
    elif mode == "dataset":
        geometry_config = config.replace(
            in_channels=channels,
            mean=(0.0,) * channels,
            std=(1.0,) * channels,
            **({"image_size": changes["image_size"]} if "image_size" in changes else {}),
        )
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros(channels, dtype=torch.float64)
        count = 0
        for array, name in zip(arrays, names, strict=True):
            pixels = to_geometry(_unit_tensor(array, channels, name), geometry_config, name)
            flat = pixels[0].reshape(channels, -1).double()
            total += flat.sum(1)
            squares += (flat * flat).sum(1)
            count += flat.shape[1]
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(_MIN_STD)
        changes.update(mean=tuple(mean.tolist()), std=tuple(std.tolist()), normalization="dataset")
    return config.replace(**changes)


def load_stack(
    items: Iterable[str | os.PathLike[str] | np.ndarray], config: Config, *, progress: bool = False
) -> torch.Tensor:
    """Read images (paths or arrays) and prepare them as the model expects
    (:func:`prepare`) into one (N, C, H, W) float32 tensor."""
    items = list(items)
    if not items:
        raise DataError("no training images given")
    out = torch.empty(len(items), config.in_channels, *config.image_size)
    for i, item in enumerate(progress_bar(items, "reading images", enabled=progress)):
        if isinstance(item, np.ndarray):
            out[i] = prepare(item, config, f"array {i}")
        else:
            out[i] = prepare(read_array(item), config, str(item))
    return out
