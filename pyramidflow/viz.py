"""Pictures of results: colour heatmaps, overlays and masks as uint8 arrays."""

from __future__ import annotations

import numpy as np

# Anchor colours of a perceptually ordered dark-blue -> yellow map (sampled "inferno"-like).
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) values -> (H, W, 3) uint8 colours, ``vmin`` dark, ``vmax`` bright.

    Non-finite values are shown as ``vmax`` (a NaN in a map is worth looking at)."""
    span = max(float(vmax) - float(vmin), 1e-12)
    values = np.asarray(values, dtype=np.float32)
    t = np.clip((values - vmin) / span, 0.0, 1.0)
    t = np.where(np.isfinite(t), t, 1.0)
    pos = t * (len(_ANCHORS) - 1)
    low = np.floor(pos).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    frac = (pos - low)[..., None]
    rgb = _ANCHORS[low] * (1.0 - frac) + _ANCHORS[low + 1] * frac
    return rgb.round().astype(np.uint8)


def heat_range(amap: np.ndarray, threshold: float | None) -> tuple[float, float]:
    """The colour scale of one map's heatmap.

    With a threshold the scale is fixed, ``[0, 2 * threshold]``: the threshold sits mid-scale
    and a good image looks equally calm in every overlay. Without one it is the map's own
    ``[0, 99.9th percentile]``, so every image uses the full colour range.
    """
    if threshold is not None and np.isfinite(threshold) and threshold > 0:
        return 0.0, 2.0 * float(threshold)
    finite = np.asarray(amap, dtype=np.float32)
    finite = finite[np.isfinite(finite)]
    top = float(np.percentile(finite, 99.9)) if finite.size else 1.0
    return 0.0, max(top, 1e-12)


def to_display(pixels: np.ndarray) -> np.ndarray:
    """Any pixel array (H, W[, C]; uint8, uint16, float, ...) -> uint8 RGB (H, W, 3).

    8-bit images are shown as they are; other types are contrast-stretched between their
    0.5th and 99.5th percentiles (12-bit data in 16-bit files would look black otherwise).
    Alpha is dropped, gray is repeated; images with other channel counts show channel 0.
    """
    array = np.asarray(pixels)
    if array.ndim == 3:
        channels = array.shape[2]
        if channels in (2, 4):
            array = array[..., : channels - 1]  # drop alpha
        elif channels not in (1, 3):
            array = array[..., :1]
        if array.shape[2] == 1:
            array = array[..., 0]
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        values = array.astype(np.float32)
        finite = values[np.isfinite(values)]
        low, high = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
        span = max(float(high) - float(low), 1e-12)
        scaled = np.nan_to_num((values - low) / span, nan=0.0, posinf=1.0, neginf=0.0)
        array = (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float | np.ndarray = 0.5) -> np.ndarray:
    """Blend an image (H, W[, C], float in [0, 1] or uint8) with a uint8 heatmap, at one
    opacity ``alpha`` or one per pixel ((H, W), e.g. :func:`heat_opacity`); where it is 0 the
    image is unchanged."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = img[..., :3].astype(np.float32)
    weight = np.asarray(alpha, dtype=np.float32)
    if weight.ndim == 2:
        weight = weight[..., None]
    return (img * (1.0 - weight) + heat.astype(np.float32) * weight).round().astype(np.uint8)


#: Strongest tint of an overlay (at the threshold and above): the part still shows through.
MAX_OPACITY = 0.7


def heat_opacity(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Per-pixel opacity of the heatmap over the image, (H, W) float32: 0 (the image as it
    is) up to a quarter of the colour scale, rising linearly to :data:`MAX_OPACITY` at its
    middle and staying there. With a threshold the scale is ``[0, 2 * threshold]``
    (:func:`heat_range`), so normal regions stay untinted below half the threshold and
    pixels at the threshold get the full tint. Non-finite values get the full tint."""
    span = max(float(vmax) - float(vmin), 1e-12)
    position = (np.asarray(values, dtype=np.float32) - float(vmin)) / span
    ramp = np.clip((position - 0.25) / 0.25, 0.0, 1.0)
    ramp = np.where(np.isfinite(ramp), ramp, 1.0)
    return (ramp * MAX_OPACITY).astype(np.float32)


def heat_overlay(image: np.ndarray, values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """The image with its map's heat colours (:func:`colorize`) where the map is high,
    untouched where it is low (:func:`heat_opacity`): uint8 RGB (H, W, 3)."""
    return overlay(image, colorize(values, vmin, vmax), heat_opacity(values, vmin, vmax))


def mask_image(mask: np.ndarray) -> np.ndarray:
    """A boolean (H, W) mask -> uint8 (H, W): 255 where true, 0 elsewhere."""
    return np.where(np.asarray(mask, dtype=bool), np.uint8(255), np.uint8(0))
