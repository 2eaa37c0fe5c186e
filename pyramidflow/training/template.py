"""The latent template (the mean latent of the good training images) and the spread of
every latent element over them (for the ``znorm`` scoring recipe); all ranks agree."""

from __future__ import annotations

import torch

from ..model.flow import PyramidFlow, level_sizes
from ..model.scoring import batch_slices
from ..progress import progress_bar
from . import distributed

#: The spread is floored at this fraction of its level's mean variance, so that a latent
#: element that never varies on the good images cannot divide by (almost) zero.
SPREAD_FLOOR = 1e-3


@torch.no_grad()
def _latent_sums(
    model: PyramidFlow,
    images: torch.Tensor,
    *,
    squares: bool,
    batch_size: int,
    device: str | torch.device,
    progress: bool,
    data_parallel: bool | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor]:
    """Float64 sums (and sums of squares) of every latent element over ``images`` in eval
    mode, and the image count, all-reduced over the ranks when data-parallel."""
    if images.shape[0] == 0:
        raise ValueError("the template needs at least one training image")
    if data_parallel is None:
        data_parallel = distributed.is_active()
    model.to(device).eval()
    part_of = distributed.shard(images.shape[0]) if data_parallel else slice(None)
    mine = images[part_of]
    sizes = level_sizes(model.config.image_size, model.config.levels)

    def zeros() -> list[torch.Tensor]:
        return [
            torch.zeros(model.config.channels, h, w, dtype=torch.float64, device=device)
            for h, w in sizes
        ]

    sums, sums_sq = zeros(), (zeros() if squares else None)
    show = progress and (not data_parallel or distributed.rank() == 0)
    for part in progress_bar(batch_slices(mine.shape[0], batch_size), "template", enabled=show):
        latents = model(mine[part].to(device))
        for level, z in enumerate(latents):
            sums[level] += z.sum(0, dtype=torch.float64)
            if sums_sq is not None:
                sums_sq[level] += z.double().square().sum(0)
    count = torch.tensor([float(mine.shape[0])], dtype=torch.float64, device=device)
    if data_parallel:
        distributed.all_reduce_sum_([*sums, *(sums_sq or []), count])
    return sums, sums_sq, count


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
    sums, _, count = _latent_sums(
        model, images, squares=False, batch_size=batch_size, device=device,
        progress=progress, data_parallel=data_parallel,
    )  # fmt: skip
    return [(total / count).to(images.dtype) for total in sums]


def compute_template_and_spread(
    model: PyramidFlow,
    images: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
    data_parallel: bool | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The template (equal to :func:`compute_template`'s, bit for bit) and the standard
    deviation of every latent element over the images (population, float64 sums),
    floored at ``SPREAD_FLOOR`` times its level's mean variance."""
    sums, sums_sq, count = _latent_sums(
        model, images, squares=True, batch_size=batch_size, device=device,
        progress=progress, data_parallel=data_parallel,
    )  # fmt: skip
    template, spread = [], []
    for total, total_sq in zip(sums, sums_sq or [], strict=True):
        mean = total / count
        variance = (total_sq / count - mean.square()).clamp_min(0.0)
        variance = variance + SPREAD_FLOOR * variance.mean()
        template.append(mean.to(images.dtype))
        spread.append(variance.sqrt().to(images.dtype))
    return template, spread
