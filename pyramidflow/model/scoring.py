"""Anomaly maps and image scores of an image batch against a latent template.

Five recipes (``Config.scoring``, docs/method.md section 8):

- ``paper``: map = mean_c Compose(|z - T|) at the input size, score = max of the map;
- ``znorm``: every latent element's residual divided by the good images' standard
  deviation of that element, |z - T| / s (computed as |z / s - T / s|, so the same
  anomaly-map op runs), composed; the map smoothed by a Gaussian of sigma
  ``SMOOTHING_PX_PER_256 * H / 256`` px; score = max of the smoothed map;
- ``relative``: ``znorm`` on latents standardized per image and channel (each latent
  channel of each image to zero mean and unit standard deviation over its positions; T
  and s come from standardized latents too), the smoothed map divided by its own mean;
  score = max of that. Brightness, contrast and colour that vary from one good image to
  the next no longer raise the whole map;
- ``fused``: ``relative``'s map; the image score fuses the pyramid levels: each level's
  residual composed alone into a map (blurred, over its own mean, as ``relative``), its
  maximum divided by that level's mean maximum over the good training images
  (``level_scale``), averaged over the levels. A defect that only one scale sees is not
  drowned by the maximum of the summed map, and no level dominates by its typical size;
- ``fused_peak``: ``fused``'s map; image score = the larger of two ratios to the good
  training images' mean: ``fused``'s score and the peak of the unsmoothed ``relative`` map
  over its good-image mean (``level_scale`` holds the L level scales and that mean). The
  smoothing and the level averaging that make the map and ``fused`` robust blur out a few
  pixels of strong evidence (small specks, thin scratches at full resolution); the peak
  keeps them.
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


#: recipes that compare per-image standardized latents (``relative``'s map)
STANDARDIZED_RECIPES = ("relative", "fused", "fused_peak")
#: recipes whose image score fuses the levels' maxima (they need ``level_scale``)
LEVEL_FUSED_RECIPES = ("fused", "fused_peak")


def uses_spread(recipe: str) -> bool:
    """Whether a scoring recipe needs the good images' spread of every latent element."""
    if recipe not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {recipe!r}")
    return recipe != "paper"


def uses_level_scale(recipe: str) -> bool:
    """Whether a scoring recipe needs the good images' mean maximum of every level's map."""
    return uses_spread(recipe) and recipe in LEVEL_FUSED_RECIPES


def level_scale_size(recipe: str, levels: int) -> int:
    """Length of a recipe's level scale: one per level, plus the peak's for ``fused_peak``."""
    return levels + (recipe == "fused_peak")


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
    if recipe in STANDARDIZED_RECIPES:
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


def _over_mean(amap: torch.Tensor) -> torch.Tensor:
    return amap / amap.mean(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(amap.dtype).tiny)


def _relative_map(amap: torch.Tensor) -> torch.Tensor:
    """A composed map smoothed and divided by its own mean (the ``relative`` map)."""
    return _over_mean(gaussian_blur(amap, smoothing_sigma(amap.shape[-2])))


def _normalized_residuals(
    latents: Sequence[torch.Tensor],
    template: Sequence[torch.Tensor],
    spread: Sequence[torch.Tensor],
    recipe: str,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(latents / s, T / s) of the recipe's latents, so that the anomaly-map op composes
    |z - T| / s."""
    scale = [1.0 / s for s in spread]
    latents = [z * k for z, k in zip(recipe_latents(latents, recipe), scale, strict=True)]
    return latents, [t * k for t, k in zip(template, scale, strict=True)]


def level_maxima(
    model: PyramidFlow,
    latents: Sequence[torch.Tensor],
    template: Sequence[torch.Tensor],
    spread: Sequence[torch.Tensor],
    recipe: str = "fused",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ``fused`` map (B, H, W), maxima (B, n)): every level's normalized residual
    composed alone (the other levels zero), each such map made relative and its maximum
    taken; the map is the relative map of their sum (the composition is linear).
    ``fused_peak``: n = L + 1, the last the maximum of the unsmoothed relative map.

    The anomaly map composes the channel means |z - T| / s of the levels, so each level's
    one-channel residual is computed once, one level at a time and in place, and composed
    with zeros elsewhere: the same maps as composing the normalized latents with the other
    levels zeroed, without a zero latent pyramid per level (at 2048 px a batch of 3 held
    about 3 GB more that way)."""
    residuals = []
    for z, t, s in zip(latents, template, spread, strict=True):
        scale = 1.0 / s
        normalized = recipe_latents([z], "fused")[0]
        normalized = normalized.mul_(scale) if normalized is not z else normalized * scale
        residuals.append(normalized.sub_(t * scale).abs_().mean(dim=1, keepdim=True))
        del normalized
    total, maxima = None, []
    zero_template = [torch.zeros_like(r[:1]) for r in residuals]
    for level in range(len(residuals)):
        only = [r if i == level else torch.zeros_like(r) for i, r in enumerate(residuals)]
        amap, _ = model.anomaly_map(only, zero_template)
        total = amap if total is None else total + amap
        maxima.append(_relative_map(amap).flatten(1).amax(1))
    if recipe == "fused_peak":
        maxima.append(_over_mean(total).flatten(1).amax(1))
    return _relative_map(total), torch.stack(maxima, 1)


def fused_score(maxima: torch.Tensor, level_scale: torch.Tensor, recipe: str) -> torch.Tensor:
    """Image scores (B,) from :func:`level_maxima`'s maxima and the good images' means of
    them: the mean of the level ratios (``fused``), or the larger of that and the peak's
    ratio (``fused_peak``)."""
    ratios = maxima / level_scale.to(maxima)
    if recipe == "fused_peak":
        return torch.maximum(ratios[:, :-1].mean(1), ratios[:, -1])
    return ratios.mean(1)


@torch.no_grad()
def score_latents(
    model: PyramidFlow,
    latents: Sequence[torch.Tensor],
    template: Sequence[torch.Tensor],
    spread: Sequence[torch.Tensor] | None = None,
    recipe: str | None = None,
    level_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (B, H, W) and image scores (B,) of one batch's latents, on their device.

    ``recipe``: one of ``SCORINGS`` (default: ``znorm`` with a spread, ``paper``
    without); ``template`` and ``spread`` are the recipe's (from :func:`recipe_latents` of
    the good images); ``level_scale`` (L,): ``fused``'s mean level maxima of the good
    images (:func:`level_maxima`)."""
    if recipe is None:
        recipe = "paper" if spread is None else "znorm"
    if not uses_spread(recipe):
        return model.anomaly_map(latents, template)
    if spread is None:
        raise ValueError(f"scoring {recipe!r} needs the good images' spread")
    if uses_level_scale(recipe):
        if level_scale is None:
            raise ValueError(f"scoring {recipe!r} needs the good images' level scale")
        amap, maxima = level_maxima(model, latents, template, spread, recipe)
        return amap, fused_score(maxima, level_scale, recipe)
    latents, template = _normalized_residuals(latents, template, spread, recipe)
    amap, _ = model.anomaly_map(latents, template)
    if recipe == "relative":
        amap = _relative_map(amap)
    else:
        amap = gaussian_blur(amap, smoothing_sigma(amap.shape[-2]))
    return amap, amap.flatten(1).amax(1)


@torch.no_grad()
def anomaly_maps(
    model: PyramidFlow,
    template: list[torch.Tensor],
    images: torch.Tensor,
    *,
    spread: Sequence[torch.Tensor] | None = None,
    recipe: str | None = None,
    level_scale: torch.Tensor | None = None,
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
        amap, score = score_latents(model, latents, template, spread, recipe, level_scale)
        maps.append(amap.float().cpu())
        scores.append(score.float().cpu())
    return torch.cat(maps), torch.cat(scores)
