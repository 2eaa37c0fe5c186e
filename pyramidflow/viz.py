"""Pictures of results: colour heatmaps and overlays as uint8 RGB arrays."""

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
    """(H, W) values -> (H, W, 3) uint8 colours, ``vmin`` dark, ``vmax`` bright."""
    span = max(float(vmax) - float(vmin), 1e-12)
    t = np.clip((np.asarray(values, dtype=np.float32) - vmin) / span, 0.0, 1.0)
    pos = t * (len(_ANCHORS) - 1)
    low = np.floor(pos).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    frac = (pos - low)[..., None]
    rgb = _ANCHORS[low] * (1.0 - frac) + _ANCHORS[low + 1] * frac
    return rgb.round().astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an image (H, W[, C], float in [0, 1] or uint8) with a uint8 heatmap."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = img[..., :3].astype(np.float32)
    return (img * (1.0 - alpha) + heat.astype(np.float32) * alpha).round().astype(np.uint8)
