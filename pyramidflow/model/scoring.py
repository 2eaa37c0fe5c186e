"""Anomaly maps and image scores of an image batch against a latent template."""

from __future__ import annotations

import torch

from ..progress import progress_bar
from .flow import PyramidFlow


def batch_slices(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def anomaly_maps(
    model: PyramidFlow,
    template: list[torch.Tensor],
    images: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (N, H, W) at the model's input size and image scores (N,), on the CPU."""
    if images.shape[0] == 0:
        return torch.zeros(0, *images.shape[-2:]), torch.zeros(0)
    model.to(device).eval()
    template = [t.to(device) for t in template]
    maps, scores = [], []
    for part in progress_bar(
        batch_slices(images.shape[0], batch_size), "scoring", enabled=progress
    ):
        amap, score = model.anomaly_map(model(images[part].to(device)), template)
        maps.append(amap.float().cpu())
        scores.append(score.float().cpu())
    return torch.cat(maps), torch.cat(scores)
