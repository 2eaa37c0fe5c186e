"""The latent template (the mean latent of the good training images), the spread of
every latent element over them (for the ``znorm``, ``relative`` and ``fused`` scoring
recipes) and the mean level maxima (``fused``); all ranks agree."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..config import Config
from ..model.flow import PyramidFlow, level_sizes
from ..model.scoring import batch_slices, level_maxima, level_scale_size, recipe_latents
from ..progress import progress_bar
from . import distributed

#: The spread is floored at this fraction of its level's mean variance, so that a latent
#: element that never varies on the good images cannot divide by (almost) zero.
SPREAD_FLOOR = 1e-3


class LatentMoments:
    """Float64 sums of every latent element (and of its square, for the spread) over the
    batches given to :meth:`add`, and how many images they held; finished by
    :meth:`template` or :meth:`template_and_spread`. Streams batches from any source (a
    tensor's slices, a data loader) without keeping the images."""

    def __init__(self, config: Config, *, squares: bool, device: str | torch.device) -> None:
        sizes = level_sizes(config.image_size, config.levels)
        self.sums = [
            torch.zeros(config.channels, h, w, dtype=torch.float64, device=device) for h, w in sizes
        ]
        self.sums_sq = [torch.zeros_like(s) for s in self.sums] if squares else None
        self.count = torch.zeros(1, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, latents: Sequence[torch.Tensor]) -> None:
        """Accumulate one batch's latents (L tensors (B, C, h_l, w_l))."""
        for level, z in enumerate(latents):
            self.sums[level] += z.sum(0, dtype=torch.float64)
            if self.sums_sq is not None:
                # image by image, squared in place: one float64 copy of one image's level
                # at a time (a batch's float64 squares were the template pass's peak,
                # 3.2 GB for 3 images at 2048 px)
                for image in z:
                    self.sums_sq[level] += image.double().square_()
        self.count += latents[0].shape[0]

    def all_reduce(self) -> None:
        """Sum the accumulators over the ranks of the process group."""
        distributed.all_reduce_sum_([*self.sums, *(self.sums_sq or []), self.count])

    def _check_count(self) -> None:
        if not self.count.item():
            raise ValueError("the template needs at least one training image")

    def template(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The mean latent, L tensors (C, h_l, w_l) in ``dtype``."""
        self._check_count()
        return [(total / self.count).to(dtype) for total in self.sums]

    def template_and_spread(
        self, dtype: torch.dtype
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The mean latent and the standard deviation of every latent element (population),
        floored at ``SPREAD_FLOOR`` times its level's mean variance, in ``dtype``."""
        if self.sums_sq is None:
            raise ValueError("the spread needs the squares: LatentMoments(..., squares=True)")
        self._check_count()
        template, spread = [], []
        for total, total_sq in zip(self.sums, self.sums_sq, strict=True):
            mean = total / self.count
            variance = (total_sq / self.count - mean.square()).clamp_min(0.0)
            variance = variance + SPREAD_FLOOR * variance.mean()
            template.append(mean.to(dtype))
            spread.append(variance.sqrt().to(dtype))
        return template, spread


@torch.no_grad()
def _latent_moments(
    model: PyramidFlow,
    images: torch.Tensor,
    *,
    squares: bool,
    recipe: str,
    batch_size: int,
    device: str | torch.device,
    progress: bool,
    data_parallel: bool | None,
) -> LatentMoments:
    """The moments of the scoring recipe's latents of ``images`` in eval mode, all-reduced
    over the ranks when data-parallel (every rank passes all images and encodes its
    contiguous share)."""
    if images.shape[0] == 0:
        raise ValueError("the template needs at least one training image")
    if data_parallel is None:
        data_parallel = distributed.is_active()
    model.to(device).eval()
    part_of = distributed.shard(images.shape[0]) if data_parallel else slice(None)
    mine = images[part_of]
    moments = LatentMoments(model.config, squares=squares, device=device)
    show = progress and (not data_parallel or distributed.rank() == 0)
    for part in progress_bar(batch_slices(mine.shape[0], batch_size), "template", enabled=show):
        moments.add(recipe_latents(model(mine[part].to(device)), recipe))
    if data_parallel:
        moments.all_reduce()
    return moments


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
    return _latent_moments(
        model, images, squares=False, recipe="paper", batch_size=batch_size, device=device,
        progress=progress, data_parallel=data_parallel,
    ).template(images.dtype)  # fmt: skip


def compute_template_and_spread(
    model: PyramidFlow,
    images: torch.Tensor,
    *,
    recipe: str = "znorm",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
    data_parallel: bool | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The template and the standard deviation of every latent element over the images
    (population, float64 sums), floored at ``SPREAD_FLOOR`` times its level's mean
    variance, of the scoring ``recipe``'s latents (:func:`recipe_latents`: for ``znorm``
    the latents themselves, and the template equals :func:`compute_template`'s bit for
    bit)."""
    return _latent_moments(
        model, images, squares=True, recipe=recipe, batch_size=batch_size, device=device,
        progress=progress, data_parallel=data_parallel,
    ).template_and_spread(images.dtype)  # fmt: skip


@torch.no_grad()
def sum_level_maxima(
    model: PyramidFlow,
    batches: Iterable[torch.Tensor],
    template: Sequence[torch.Tensor],
    spread: Sequence[torch.Tensor],
    recipe: str = "fused",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 (sum over the images of the recipe's maxima (L, or L + 1 for
    ``fused_peak``), image count (1,)) of image batches on the model's device
    (:func:`~pyramidflow.model.scoring.level_maxima`)."""
    device = template[0].device
    size = level_scale_size(recipe, len(template))
    total = torch.zeros(size, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for images in batches:
        _, maxima = level_maxima(model, model(images), template, spread, recipe)
        total += maxima.sum(0, dtype=torch.float64)
        count += maxima.shape[0]
    return total, count


def compute_level_scale(
    model: PyramidFlow,
    images: torch.Tensor,
    template: Sequence[torch.Tensor],
    spread: Sequence[torch.Tensor],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
    data_parallel: bool | None = None,
    recipe: str = "fused",
) -> torch.Tensor:
    """The ``fused`` recipe's level scale (L,): every level's map maximum averaged over the
    images in float64, in the images' dtype (``fused_peak``: (L + 1,), the unsmoothed
    relative map's maximum last); data-parallel as :func:`compute_template`."""
    if images.shape[0] == 0:
        raise ValueError("the level scale needs at least one training image")
    if data_parallel is None:
        data_parallel = distributed.is_active()
    model.to(device).eval()
    mine = images[distributed.shard(images.shape[0]) if data_parallel else slice(None)]
    show = progress and (not data_parallel or distributed.rank() == 0)
    slices = progress_bar(batch_slices(mine.shape[0], batch_size), "levels", enabled=show)
    total, count = sum_level_maxima(
        model,
        (mine[part].to(device) for part in slices),
        [t.to(device) for t in template],
        [s.to(device) for s in spread],
        recipe,
    )
    if data_parallel:
        distributed.all_reduce_sum_([total, count])
    return (total / count).to(images.dtype)
