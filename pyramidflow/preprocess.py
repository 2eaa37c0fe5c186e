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
from collections.abc import Iterable, Iterator

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


#: Bytes of float32 pixels converted at a time: large images are never held as floats.
_STRIP_BYTES = 32 * 2**20


def _strip_rows(width: int, channels: int) -> int:
    return max(1, _STRIP_BYTES // (4 * max(1, width) * max(1, channels)))


def _channel_plan(array: np.ndarray, channels: int) -> tuple[int, bool]:
    """(channels to convert, repeat gray afterwards): a gray image for an RGB model is
    converted and resized as one channel and repeated at the model size (the same values)."""
    if array.ndim in (2, 3) and array_channels(array) == 1 and channels == 3:
        return 1, True
    return channels, False


def _unit_tensor(array: np.ndarray, channels: int, source: str) -> torch.Tensor:
    pixels = to_channels(array, channels, source)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def _unit_strips(array: np.ndarray, channels: int, source: str) -> Iterator[torch.Tensor]:
    """(1, channels, rows, W) float32 strips in [0, 1] of a pixel array, top to bottom."""
    rows = _strip_rows(array.shape[1] if array.ndim >= 2 else 1, channels)
    for start in range(0, max(1, array.shape[0]), rows):
        yield _unit_tensor(array[start : start + rows], channels, source)


def _check_smallest(height: int, width: int, config: Config, source: str) -> None:
    smallest = 2 ** (config.levels - 1)
    if min(height, width) < smallest:
        raise DataError(
            f"{source}: image is {height}x{width}, smaller than the {smallest} pixels per side "
            f"that {config.levels} pyramid levels need"
        )


def _shrink_strips(strips: Iterable[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """The antialiased bilinear resize of an image given as (1, C, rows, W) row strips:
    first along the width strip by strip, then along the height. This is how torch's
    separable antialiased resize computes it (bit for bit the same result as one call on
    the whole image), without the full-resolution float copy."""
    narrow = torch.cat(
        [
            F.interpolate(
                strip, size=(strip.shape[-2], size[1]), mode="bilinear", align_corners=False,
                antialias=True,
            )
            for strip in strips
        ],
        dim=2,
    )  # fmt: skip
    return resize(narrow, size)


def _resized_unit(
    array: np.ndarray, channels: int, size: tuple[int, int], source: str
) -> torch.Tensor:
    """The bilinear (antialiased when shrinking) resize of a pixel array's unit values,
    converted one row strip at a time."""
    height, width = array.shape[:2]
    size = (int(size[0]), int(size[1]))
    if size[0] >= height and size[1] >= width:  # the image is not larger: nothing to save
        return resize(_unit_tensor(array, channels, source), size)
    return _shrink_strips(_unit_strips(array, channels, source), size)


def shrink_array(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A pixel array's values (any type, (H, W) or (H, W, C)) resized to ``size`` as
    float32 (antialiased bilinear), converted one row strip at a time."""
    pixels = np.asarray(array)
    gray = pixels.ndim == 2
    if gray:
        pixels = pixels[:, :, None]
    rows = _strip_rows(pixels.shape[1], pixels.shape[2])
    strips = (
        torch.from_numpy(pixels[start : start + rows].astype(np.float32)).permute(2, 0, 1)[None]
        for start in range(0, pixels.shape[0], rows)
    )
    out = _shrink_strips(strips, (int(size[0]), int(size[1])))[0].permute(1, 2, 0).numpy()
    return out[:, :, 0] if gray else out


def _replicate_pad(pixels: torch.Tensor, height: int, width: int) -> None:
    """Fill ``pixels[..., height:, :]`` and ``[..., :, width:]`` in place by repeating the
    last row and column (``F.pad(mode="replicate")`` without a second copy)."""
    pixels[..., :height, width:] = pixels[..., :height, width - 1 : width]
    pixels[..., height:, :] = pixels[..., height - 1 : height, :]


def _native_unit(
    array: np.ndarray, channels: int, config: Config, source: str, out: torch.Tensor | None
) -> torch.Tensor:
    """A native-geometry model's input in [0, 1]: the image padded by edge replication to
    the model size, converted strip by strip into ``out`` (or a new tensor)."""
    height, width = array.shape[:2]
    target_h, target_w = config.image_size
    if height > target_h or width > target_w:
        raise DataError(
            f"{source}: image is {height}x{width} but this native-size model was trained at "
            f"{target_h}x{target_w}; use images of that size or a geometry='resize' model"
        )
    if out is None:
        out = torch.empty(channels, target_h, target_w)
    row = 0
    for strip in _unit_strips(array, channels, source):
        out[:, row : row + strip.shape[2], :width] = strip[0]
        row += strip.shape[2]
    _replicate_pad(out, height, width)
    return out


def unit_input(
    array: np.ndarray,
    config: Config,
    source: str = "image",
    *,
    channels: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pixel array -> (C, H, W) float32 in [0, 1] at the model size (before the model's
    normalization). Converted in row strips: besides the raw array, a large image costs
    one strip of floats (``resize``) or the model-size input itself (``native``).
    ``channels`` defaults to the config's; ``out`` (native only) is filled in place."""
    channels = config.in_channels if channels is None else channels
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise DataError(f"{source}: expected (H, W) or (H, W, C) pixels, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{source}: image is empty ({array.shape[0]}x{array.shape[1]} pixels)")
    _check_smallest(array.shape[0], array.shape[1], config, source)
    convert, repeat = _channel_plan(array, channels)
    if config.geometry == "native":
        if repeat:  # rare: gray images for an RGB native model
            pixels = _native_unit(array, 1, config, source, None)
            result = pixels.expand(channels, -1, -1)
            if out is None:
                return result.contiguous()
            out.copy_(result)
            return out
        return _native_unit(array, channels, config, source, out)
    pixels = _resized_unit(array, convert, config.image_size, source)[0]
    if repeat:
        pixels = pixels.expand(channels, -1, -1)
    if out is None:
        return pixels.contiguous()
    out.copy_(pixels)
    return out


def _normalize_inplace(pixels: torch.Tensor, config: Config) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> the model's input ``(x - mean) / std``, in place."""
    for c, (mean, std) in enumerate(zip(config.mean, config.std, strict=True)):
        pixels[c].sub_(mean).div_(std)
    return pixels


def prepare(array: np.ndarray, config: Config, source: str = "image") -> torch.Tensor:
    """One pixel array -> the normalized model input (C, H, W) (:func:`unit_input`, then
    ``(x - mean) / std``)."""
    return _normalize_inplace(unit_input(array, config, source), config)


def _linear_taps(
    size_in: int, size_out: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 of output positions ``start:stop`` of a
    linear resize from ``size_in`` to ``size_out`` (torch's ``align_corners=False`` rule:
    source = (out + 0.5) * in / out - 0.5, clamped at 0), in float64."""
    scale = size_in / size_out
    source = np.maximum((np.arange(start, stop, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    first = np.floor(source).astype(np.int64)
    second = np.minimum(first + 1, size_in - 1)
    return first, second, source - first


def map_strips(
    amap: torch.Tensor, original: tuple[int, int], config: Config, rows: int = 256
) -> Iterator[np.ndarray]:
    """The map of :func:`restore_map` as float32 row strips of at most ``rows`` rows, top to
    bottom, computed from the model-size map one strip at a time (bilinear, or the crop of
    the padding for ``geometry="native"``): a full-resolution map never has to be held."""
    height, width = int(original[0]), int(original[1])
    small = amap.detach().cpu()
    if config.geometry == "native":
        for start in range(0, height, rows):
            yield small[start : min(start + rows, height), :width].numpy().astype(np.float32)
        return
    values = small.double().numpy()
    if tuple(values.shape) == (height, width):
        for start in range(0, height, rows):
            yield values[start : start + rows].astype(np.float32)
        return
    first, second, weight = _linear_taps(values.shape[1], width, 0, width)
    wide = values[:, first] * (1.0 - weight) + values[:, second] * weight  # (h, width)
    for start in range(0, height, rows):
        top, bottom, lower = _linear_taps(values.shape[0], height, start, min(start + rows, height))
        lower = lower[:, None]
        yield (wide[top] * (1.0 - lower) + wide[bottom] * lower).astype(np.float32)


def restore_map(amap: torch.Tensor, original: tuple[int, int], config: Config) -> np.ndarray:
    """A (H, W) map at model size -> float32 (h, w) at the image's own size: bilinear
    resize, or crop of the padding (``geometry="native"``); built strip by strip into one
    float32 array (:func:`map_strips`)."""
    out = np.empty((int(original[0]), int(original[1])), dtype=np.float32)
    row = 0
    for strip in map_strips(amap, original, config):
        out[row : row + strip.shape[0]] = strip
        row += strip.shape[0]
    return out


def reduced_map(
    amap: torch.Tensor, original: tuple[int, int], size: tuple[int, int], config: Config
) -> np.ndarray:
    """A reduced view (``size``, e.g. for an overlay) of the map :func:`restore_map` gives
    at ``original``: bilinear from the model-size map, or (``geometry="native"``) the
    cropped map shrunk with antialiasing."""
    if config.geometry != "native":
        return restore_map(amap, size, config)
    cropped = amap.detach().cpu()[: original[0], : original[1]].float()
    return resize(cropped[None, None], size)[0, 0].numpy().copy()


def model_mask(mask: np.ndarray, config: Config) -> np.ndarray:
    """A ground-truth mask in the geometry maps are evaluated in: resized to the model size
    (``resize``, the paper's protocol), or as it is (``native``: maps are cropped)."""
    if config.geometry == "resize":
        return resize_mask(mask, config.image_size)
    return mask


def _item_name(item: str | os.PathLike[str] | np.ndarray, index: int) -> str:
    return f"array {index}" if isinstance(item, np.ndarray) else str(item)


def _item_pixels(item: str | os.PathLike[str] | np.ndarray, config: Config) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return item
    return read_array(item, config.max_pixels)


def fit_stack(
    items: Iterable[str | os.PathLike[str] | np.ndarray], config: Config, *, progress: bool = False
) -> tuple[Config, torch.Tensor]:
    """Training images (paths or arrays) -> (the config with channels, model size and
    normalization fixed from them, their normalized (N, C, H, W) stack).

    Each file is read once and converted at once (:func:`unit_input`): peak memory is the
    stack plus one raw image, whatever the images' size. The first image decides the
    channels (and with ``geometry="native"`` the model size); ``"dataset"`` statistics are
    the mean and standard deviation of the stack's pixels (float64 sums)."""
    items = list(items)
    if not items:
        raise DataError("no training images given")
    first_name = _item_name(items[0], 0)
    first = np.asarray(_item_pixels(items[0], config))
    changes: dict = {}
    channels = config.in_channels
    if config.normalization != "fixed":
        channels = array_channels(first)
        if channels not in (1, 3):
            raise DataError(f"{first_name}: {channels}-channel images are not supported")
        changes["in_channels"] = channels
    if config.geometry == "native":
        if first.ndim < 2:
            raise DataError(f"{first_name}: expected (H, W) or (H, W, C) pixels")
        changes["image_size"] = padded_size(*first.shape[:2], config.levels)
    mode = config.normalization
    if mode == "auto":
        mode = "imagenet" if channels == 3 and first.dtype == np.uint8 else "dataset"
    if mode == "imagenet":
        if channels != 3:
            raise DataError("ImageNet normalization needs RGB images; use 'dataset'")
        changes.update(mean=IMAGENET_MEAN, std=IMAGENET_STD, normalization="imagenet")
    geometry_config = config.replace(
        in_channels=channels,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        **({"image_size": changes["image_size"]} if "image_size" in changes else {}),
    )
    stack = torch.empty(len(items), channels, *geometry_config.image_size)
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for i in progress_bar(range(len(items)), "reading images", enabled=progress):
        name = _item_name(items[i], i)
        array = first if i == 0 else np.asarray(_item_pixels(items[i], config))
        if config.geometry == "native" and array.shape[:2] != first.shape[:2]:
            raise DataError(
                f"{name}: native-size training needs images of one size; {first_name} is "
                f"{first.shape[0]}x{first.shape[1]}, this one differs"
            )
        unit_input(array, geometry_config, name, out=stack[i])
        del array
        if mode == "dataset":
            flat = stack[i].reshape(channels, -1).double()
            total += flat.sum(1)
            squares += (flat * flat).sum(1)
    del first
    if mode == "dataset":
        count = stack[0, 0].numel() * len(items)
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(_MIN_STD)
        changes.update(mean=tuple(mean.tolist()), std=tuple(std.tolist()), normalization="dataset")
    resolved = config.replace(**changes)
    for image in stack:
        _normalize_inplace(image, resolved)
    return resolved, stack


def load_stack(
    items: Iterable[str | os.PathLike[str] | np.ndarray], config: Config, *, progress: bool = False
) -> torch.Tensor:
    """Read images (paths, read with ``config.max_pixels``, or arrays) and prepare them as
    the model expects (:func:`prepare`) into one (N, C, H, W) float32 tensor, one image
    at a time."""
    items = list(items)
    if not items:
        raise DataError("no training images given")
    out = torch.empty(len(items), config.in_channels, *config.image_size)
    for i, item in enumerate(progress_bar(items, "reading images", enabled=progress)):
        pixels = _item_pixels(item, config)
        unit_input(pixels, config, _item_name(item, i), out=out[i])
        del pixels
        _normalize_inplace(out[i], config)
    return out
