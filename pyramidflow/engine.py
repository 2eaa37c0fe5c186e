"""Training loop, latent template and batched inference (method.md sections 7 and 8)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import Config
from .errors import TrainingError
from .model import PyramidFlow
from .progress import counter_bar, progress_bar


@dataclass
class TrainReport:
    """What a training run did: mean loss per epoch, steps, wall time."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def make_optimizer(model: PyramidFlow, config: Config) -> torch.optim.Adam:
    """Adam with the paper's settings over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Texture augmentation: per image, horizontal flip, vertical flip and (square images
    only) rot90, each with probability 0.5, drawn from ``generator``."""
    draws = torch.rand(batch.shape[0], 3, generator=generator) < 0.5
    square = batch.shape[-1] == batch.shape[-2]
    out = []
    for image, (hflip, vflip, rot) in zip(batch, draws.tolist(), strict=True):
        if hflip:
            image = image.flip(-1)
        if vflip:
            image = image.flip(-2)
        if rot and square:
            image = image.rot90(1, (-2, -1))
        out.append(image)
    return torch.stack(out)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch's index batches; the last incomplete batch is dropped."""
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train(
    model: PyramidFlow,
    images: torch.Tensor,
    config: Config | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainReport:
    """Train ``model`` on normalized good images (N, C, H, W) with the Siamese Fourier loss.

    Deterministic for a given ``config.seed`` (shuffling and augmentation use their own
    generator). Reports the last epoch: nothing here looks at test data.
    """
    config = config or model.config
    if config.batch_size < 2:
        raise ValueError("batch_size must be >= 2: the Siamese loss compares pairs in a batch")
    if images.shape[0] < config.batch_size:
        raise ValueError(
            f"{images.shape[0]} training image(s) is fewer than one batch of {config.batch_size}"
        )
    device = torch.device(device)
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(config.seed)
    report = TrainReport()
    start = time.perf_counter()
    n_batches = images.shape[0] // config.batch_size
    bar = counter_bar(config.epochs * n_batches, "training", enabled=progress)
    for epoch in range(config.epochs):
        total = 0.0
        for index in epoch_batches(images.shape[0], config.batch_size, generator):
            batch = images[index]
            if config.augment:
                batch = augment(batch, generator)
            loss = model.loss(model(batch.to(device, non_blocking=True)))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss became {value} at epoch {epoch + 1}, step {report.steps + 1}; lower "
                    "the learning rate or check the images for constant or broken files"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            total += value
            report.steps += 1
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4g}", refresh=False)
        report.epoch_losses.append(total / n_batches)
        if on_epoch is not None:
            on_epoch(epoch, report.epoch_losses[-1])
    bar.close()
    report.seconds = time.perf_counter() - start
    model.eval()
    return report


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


@torch.no_grad()
def compute_template(
    model: PyramidFlow,
    images: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[torch.Tensor]:
    """Mean latent of the training images in eval mode, summed in float64: L tensors
    (C, h_l, w_l), finest first, in the model's dtype."""
    if images.shape[0] == 0:
        raise ValueError("the template needs at least one training image")
    model.to(device).eval()
    sums: list[torch.Tensor] | None = None
    for part in progress_bar(_batches(images.shape[0], batch_size), "template", enabled=progress):
        latents = model(images[part].to(device))
        if sums is None:
            sums = [z.sum(0, dtype=torch.float64) for z in latents]
        else:
            for total, z in zip(sums, latents, strict=True):
                total += z.sum(0, dtype=torch.float64)
    assert sums is not None
    return [(total / images.shape[0]).to(images.dtype) for total in sums]


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
    model.to(device).eval()
    template = [t.to(device) for t in template]
    maps, scores = [], []
    for part in progress_bar(_batches(images.shape[0], batch_size), "scoring", enabled=progress):
        amap, score = model.anomaly_map(model(images[part].to(device)), template)
        maps.append(amap.float().cpu())
        scores.append(score.float().cpu())
    return torch.cat(maps), torch.cat(scores)
