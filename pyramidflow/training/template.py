"""The latent template: the mean latent of the good training images (all ranks agree)."""

from __future__ import annotations

import torch

from ..model.flow import PyramidFlow, level_sizes
from ..model.scoring import batch_slices
from ..progress import progress_bar
from . import distributed


@torch.no_grad()
def compute_template(
    model: PyramidFlow,
    images: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
    data_parallel: bool | None = None,
) -> list[torch.Tensor]:
    """Mean latent of the training images in eval mode, summed in float64: L tensors
    (C, h_l, w_l), finest first, in the model's dtype.

    ``data_parallel`` (default: whether a process group of > 1 process is initialized): every
    rank passes all images, encodes its contiguous share and the float64 sums and counts
    are all-reduced, so every rank returns the same template."""
    if images.shape[0] == 0:
        raise ValueError("the template needs at least one training image")
    if data_parallel is None:
        data_parallel = distributed.is_active()
    model.to(device).eval()
    part_of = distributed.shard(images.shape[0]) if data_parallel else slice(None)
    mine = images[part_of]
    sizes = level_sizes(model.config.image_size, model.config.levels)
    sums = [
        torch.zeros(model.config.channels, h, w, dtype=torch.float64, device=device)
        for h, w in sizes
    ]
    show = progress and (not data_parallel or distributed.rank() == 0)
    for part in progress_bar(batch_slices(mine.shape[0], batch_size), "template", enabled=show):
        latents = model(mine[part].to(device))
        for total, z in zip(sums, latents, strict=True):
            total += z.sum(0, dtype=torch.float64)
    count = torch.tensor([float(mine.shape[0])], dtype=torch.float64, device=device)
    if data_parallel:
        distributed.all_reduce_sum_([*sums, count])
    return [(total / count).to(images.dtype) for total in sums]
