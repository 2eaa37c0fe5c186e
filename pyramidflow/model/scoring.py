"""Anomaly maps and image scores of an image batch against a latent template.

Three recipes (``Config.scoring``, docs/method.md section 8):

- ``paper``: map = mean_c Compose(|z - T|) at the input size, score = max of the map;
- ``znorm``: every latent element's residual divided by the good images' standard
  deviation of that element, |z - T| / s (computed as |z / s - T / s|, so the same
  anomaly-map op runs), composed; the map smoothed by a Gaussian of sigma
  ``SMOOTHING_PX_PER_256 * H / 256`` px; score = max of the smoothed map;
- ``relative``: ``znorm`` on latents standardized per image and channel (each latent
  channel of each image to zero mean and unit standard deviation over its positions; T
  and s come from standardized latents too), the smoothed map divided by its own mean;
  score = max of that. Brightness, contrast and colour that vary from one good image to
  the next no longer raise the whole map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import SCORINGS
from ..progress import progress_bar
from .flow import PyramidFlow

#: Gaussian smoothing of the znorm and relative maps: sigma in pixels per 256 px of height.
SMOOTHING_PX_PER_256 = 4.0
#: Floor of a latent channel's per-image standard deviation in the ``relative`` recipe
#: (latents are of order one), so that a constant channel cannot divide by zero.
STANDARDIZE_FLOOR = 1e-4


def uses_spread(recipe: str) -> bool:
    """Whether a scoring recipe needs the good images' spread of every latent element."""
    if recipe not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {recipe!r}")
    return recipe != "paper"


def standardize_per_image(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Every latent channel of every image shifted and scaled to zero mean and unit
    (population) standard deviation over its positions: L tensors (B, C, h_l, w_l)."""
    out = []
    for z in latents:
        std, mean = torch.std_mean(z, dim=(-2, -1), correction=0, keepdim=True)
        out.append((z - mean) / std.clamp_min(STANDARDIZE_FLOOR))
    return out


def recipe_latents(latents: Sequence[torch.Tensor], recipe: str) -> list[torch.Tensor]:
    """The latents a recipe compares with its template (and from which the template and
    spread of that recipe are computed)."""
    if recipe == "relative":
        return standardize_per_image(latents)
    return list(latents)


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
    recipe: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (B, H, W) and image scores (B,) of one batch's latents, on their device.

    ``recipe``: ``paper``, ``znorm`` or ``relative`` (default: ``znorm`` with a spread,
    ``paper`` without); ``template`` and ``spread`` are the recipe's (from
    :func:`recipe_latents` of the good images)."""
    if recipe is None:
        recipe = "paper" if spread is None else "znorm"
    if not uses_spread(recipe):
        return model.anomaly_map(latents, template)
    if spread is None:
        raise ValueError(f"scoring {recipe!r} needs the good images' spread")
    scale = [1.0 / s for s in spread]
    latents = [z * k for z, k in zip(recipe_latents(latents, recipe), scale, strict=True)]
    template = [t * k for t, k in zip(template, scale, strict=True)]
    amap, _ = model.anomaly_map(latents, template)
    amap = gaussian_blur(amap, smoothing_sigma(amap.shape[-2]))
    if recipe == "relative":
        amap = amap / amap.mean(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(amap.dtype).tiny)
    return amap, amap.flatten(1).amax(1)


@torch.no_grad()
def anomaly_maps(
    model: PyramidFlow,
    template: list[torch.Tensor],
    images: torch.Tensor,
    *,
    spread: Sequence[torch.Tensor] | None = None,
    recipe: str | None = None,
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
        latents = model(images[part].to(device))
        amap, score = score_latents(model, latents, template, spread, recipe)
        maps.append(amap.float().cpu())
        scores.append(score.float().cpu())
    return torch.cat(maps), torch.cat(scores)
