"""Anomaly maps and image scores of an image batch against a latent template.

Two recipes (``Config.scoring``, docs/method.md section 8):

- ``paper``: map = mean_c Compose(|z - T|) at the input size, score = max of the map;
- ``znorm``: every latent element's residual divided by the good images' standard
  deviation of that element, |z - T| / s (computed as |z / s - T / s|, so the same
  anomaly-map op runs), composed; the map smoothed by a Gaussian of sigma
  ``SMOOTHING_PX_PER_256 * H / 256`` px; score = max of the smoothed map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..progress import progress_bar
from .flow import PyramidFlow

#: Gaussian smoothing of the znorm map: sigma in pixels per 256 px of image height.
SMOOTHING_PX_PER_256 = 4.0


def batch_slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _gaussian_taps(sigma: float, length: int, like: torch.Tensor) -> torch.Tensor:
    """Normalized Gaussian taps, radius 3 sigma but less than ``length`` (reflect padding)."""
    radius = min(max(1, int(round(3 * sigma))), length - 1)
    taps = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (N, H, W) maps with reflected borders."""
    if sigma <= 0:
        return maps
    x = maps[:, None]
    row = _gaussian_taps(sigma, maps.shape[-1], maps)
    column = _gaussian_taps(sigma, maps.shape[-2], maps)
    pad_w, pad_h = row.numel() // 2, column.numel() // 2
    x = F.conv2d(F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect"), row.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad_h, pad_h), mode="reflect"), column.view(1, 1, -1, 1))
    return x[:, 0]


def smoothing_sigma(height: int) -> float:
    """The znorm map's smoothing in pixels for maps ``height`` pixels high."""
    return SMOOTHING_PX_PER_256 * height / 256


@torch.no_grad()
def score_latents(
    model: PyramidFlow,
    latents: Sequence[torch.Tensor],
    template: Sequence[torch.Tensor],
    spread: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (B, H, W) and image scores (B,) of one batch's latents, on their device.

    ``spread``: the good images' standard deviation of every latent element (L tensors
    like the template): given, the ``znorm`` recipe; None, the paper's."""
    if spread is None:
        return model.anomaly_map(latents, template)
    scale = [1.0 / s for s in spread]
    latents = [z * k for z, k in zip(latents, scale, strict=True)]
    template = [t * k for t, k in zip(template, scale, strict=True)]
    amap, _ = model.anomaly_map(latents, template)
    amap = gaussian_blur(amap, smoothing_sigma(amap.shape[-2]))
    return amap, amap.flatten(1).amax(1)


@torch.no_grad()
def anomaly_maps(
    model: PyramidFlow,
    template: list[torch.Tensor],
    images: torch.Tensor,
    *,
    spread: Sequence[torch.Tensor] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (N, H, W) at the model's input size and image scores (N,), on the CPU
    (:func:`score_latents` batch by batch)."""
    if images.shape[0] == 0:
        return torch.zeros(0, *images.shape[-2:]), torch.zeros(0)
    model.to(device).eval()
    template = [t.to(device) for t in template]
    spread = None if spread is None else [s.to(device) for s in spread]
    maps, scores = [], []
    for part in progress_bar(
        batch_slices(images.shape[0], batch_size), "scoring", enabled=progress
    ):
        amap, score = score_latents(model, model(images[part].to(device)), template, spread)
        maps.append(amap.float().cpu())
        scores.append(score.float().cpu())
    return torch.cat(maps), torch.cat(scores)
