"""The training loop with resumable state (docs/method.md section 7)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import Config
from ..errors import TrainingError
from ..model.flow import PyramidFlow
from ..model.precision import backward_scope
from ..progress import counter_bar
from . import distributed
from .state import Position, TrainState, data_fingerprint, load_train_state, save_train_state

if TYPE_CHECKING:
    from tqdm import tqdm


@dataclass
class TrainReport:
    """What a training run did: mean loss per epoch, steps, wall time (all epochs, those
    before a resume included) and the epoch it started at (> 0 after a resume)."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    start_epoch: int = 0


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


def _loss(model: PyramidFlow, latents: list[torch.Tensor], pair_groups: int) -> torch.Tensor:
    """The Siamese loss; with ``pair_groups`` > 1 pairs are formed inside each of that many
    consecutive equal sub-batches and the loss is the mean of their losses."""
    if pair_groups == 1:
        return model.loss(latents)
    size = latents[0].shape[0] // pair_groups
    losses = [
        model.loss([z[g * size : (g + 1) * size] for z in latents]) for g in range(pair_groups)
    ]
    return torch.stack(losses).mean()


@dataclass
class _Run:
    """What the steps of one training run share; set up once by :func:`train`."""

    model: PyramidFlow
    images: torch.Tensor
    config: Config
    device: torch.device
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # shuffling and augmentation draws
    report: TrainReport
    pair_groups: int
    data_parallel: bool
    rank: int
    world: int
    path: Path | None
    fingerprint: str  # of the images, "" without a checkpoint path
    checkpoint_every: int
    checkpoint_every_steps: int | None
    started: float = 0.0  # perf_counter() at the start, less the seconds before a resume

    @cached_property
    def params(self) -> list[torch.nn.Parameter]:
        """The optimized parameters (loading an optimizer state keeps them)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def global_batch(self) -> int:
        """Images per step over all ranks."""
        return self.config.batch_size * self.world

    @property
    def n_batches(self) -> int:
        """Steps per epoch."""
        return self.images.shape[0] // self.global_batch


def _check_arguments(
    config: Config, checkpoint_every: int, checkpoint_every_steps: int | None, pair_groups: int
) -> None:
    """Raise :class:`ValueError` for a batch, checkpoint schedule or pair grouping that
    cannot work."""
    if config.batch_size < 2:
        raise ValueError("batch_size must be >= 2: the Siamese loss compares pairs in a batch")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 epoch, got {checkpoint_every}")
    if checkpoint_every_steps is not None and checkpoint_every_steps < 1:
        raise ValueError(f"checkpoint_every_steps must be >= 1 step, got {checkpoint_every_steps}")
    if pair_groups < 1 or config.batch_size % pair_groups or config.batch_size // pair_groups < 2:
        raise ValueError(
            f"pair_groups={pair_groups} must split batch_size={config.batch_size} into equal "
            "parts of at least 2 images"
        )


def _resolve_data_parallel(data_parallel: bool | None, pair_groups: int) -> bool:
    """Whether to train with DDP: by default when a process group of > 1 process is
    initialized; asking for it without one, or together with ``pair_groups``, is an error."""
    if data_parallel is None:
        data_parallel = distributed.is_active()
    elif data_parallel and not distributed.is_active():
        raise ValueError(
            "data_parallel=True needs an initialized process group of more than one process "
            "(pyramidflow.distributed.init_from_env under torchrun)"
        )
    if data_parallel and pair_groups != 1:
        raise ValueError("pair_groups is the single-process stand-in for ranks; not both")
    return data_parallel


def _check_enough_images(images: torch.Tensor, batch_size: int, world: int) -> None:
    """Raise :class:`ValueError` when the images do not fill one global batch."""
    if images.shape[0] < batch_size * world:
        raise ValueError(
            f"{images.shape[0]} training image(s) is fewer than one batch of {batch_size * world}"
            + (f" ({world} ranks x {batch_size})" if world > 1 else "")
        )


def _resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`; a bare "cuda" becomes the current CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resume_or_start(run: _Run, resume: bool) -> Position:
    """Where training starts: with ``resume`` and an existing checkpoint, where that run
    stopped (weights, optimizer, generator, RNG states and report restored); else at the
    beginning."""
    if resume:
        if run.path is None:
            raise ValueError("resume=True needs a checkpoint_path")
        if run.path.is_file():
            state = load_train_state(
                run.path, run.model, run.config,
                fingerprint=run.fingerprint, pair_groups=run.pair_groups, world_size=run.world,
            )  # fmt: skip
            state.restore(run.model, run.optimizer, run.generator)
            run.report.epoch_losses = list(state.epoch_losses)
            run.report.steps = state.steps
            run.report.seconds = state.seconds
            run.report.start_epoch = state.position.epoch
            run.model.to(run.device).train()
            return state.position
    return Position(0, 0, 0.0, run.generator.get_state())


def _steps_left(run: _Run, start: Position) -> int:
    """Optimizer steps from ``start`` to the end of the last epoch."""
    remaining = max(run.config.epochs - start.epoch, 0) * run.n_batches
    if start.epoch < run.config.epochs:
        remaining -= start.batch
    return remaining


def _network(run: _Run, cleanup: contextlib.ExitStack) -> torch.nn.Module:
    """The module to run forwards through: the model, or with data parallelism its DDP
    wrapper, with VN synchronized across ranks until ``cleanup`` closes."""
    if not run.data_parallel:
        return run.model
    net = torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
    )
    # VN's collectives get their own group, apart from DDP's gradient buckets
    vn_group = torch.distributed.new_group(backend=torch.distributed.get_backend())
    cleanup.callback(torch.distributed.destroy_process_group, vn_group)
    cleanup.enter_context(distributed.synchronized_vn(run.model, vn_group))
    return net


def _epoch_order(run: _Run, epoch: int, start: Position) -> tuple[list[torch.Tensor], Position]:
    """This epoch's index batches and where in them to begin: at the first, or, resuming in
    the middle of this epoch, at ``start`` (the order redrawn from its generator state, the
    generator going on with the saved draws)."""
    n = run.images.shape[0]
    if epoch == start.epoch and start.batch:
        now = run.generator.get_state()
        run.generator.set_state(start.epoch_start)
        batches = epoch_batches(n, run.global_batch, run.generator)
        run.generator.set_state(now)
        return batches, start
    epoch_start = run.generator.get_state()
    return epoch_batches(n, run.global_batch, run.generator), Position(epoch, 0, 0.0, epoch_start)


def check_finite(loss: float, grad_norm: float, epoch: int, step: int) -> None:
    """Raise :class:`TrainingError` for a non-finite loss or gradient norm."""
    if not math.isfinite(loss):
        raise TrainingError(
            f"loss became {loss} at epoch {epoch + 1}, step {step}; lower the learning rate "
            "or check the images for constant or broken files"
        )
    if not math.isfinite(grad_norm):
        raise TrainingError(
            f"gradient norm became {grad_norm} at epoch {epoch + 1}, step {step}; lower the "
            "learning rate"
        )


#: ``augment="auto"`` augments when the good images' mean image has less spatial structure
#: than this fraction (plus 2 / number of images) of how much a position varies over the
#: images: a stationary texture (ratio about 1 / number of images: the mean image is flat
#: up to sampling noise) rather than a registered object (ratio >> 1: measured 6-40).
TEXTURE_RATIO = 0.5


def stationarity_ratio(images: torch.Tensor) -> float:
    """Variance over positions of the mean image (over images and colours) divided by the
    mean over positions of each position's variance over the images; images (N, C, H, W)."""
    if images.shape[0] < 2:
        raise ValueError("deciding augment='auto' needs at least two good images")
    gray = images.double().mean(1)
    between = gray.mean(0).var(unbiased=False)
    within = gray.var(0, unbiased=False).mean()
    return float(between / within) if within > 0 else float("inf")


def resolve_augment(config: Config, images: torch.Tensor) -> tuple[Config, float | None]:
    """``config`` with ``augment="auto"`` decided from the good images (N, C, H, W): on for
    stationary textures (:func:`stationarity_ratio` below ``TEXTURE_RATIO + 2 / N``), off for
    registered objects; returns the ratio too (None when nothing was decided)."""
    if config.augment != "auto":
        return config, None
    ratio = stationarity_ratio(images)
    return config.replace(augment=ratio < TEXTURE_RATIO + 2 / images.shape[0]), ratio


def _train_step(run: _Run, net: torch.nn.Module, index: torch.Tensor, epoch: int) -> float:
    """One optimizer step on the images at ``index`` (this rank's share of them); returns
    the loss (the mean over ranks). Non-finite values raise before the step."""
    batch = run.images[index]
    if run.config.augment:
        batch = augment(batch, run.generator)
    if run.data_parallel:
        local = run.config.batch_size
        batch = batch[run.rank * local : (run.rank + 1) * local]
    # no name for the latents: in memory="recompute" the backward frees each one as soon
    # as it is replaced, unless something still refers to it
    loss = _loss(run.model, net(batch.to(run.device, non_blocking=True)), run.pair_groups)
    shown = loss.detach()
    if run.data_parallel:
        shown = distributed.all_reduce_mean(shown.clone())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.config.grad_clip)
    # the step's one host synchronization: loss and gradient norm together
    value, norm_value = torch.stack([shown.float(), norm.float()]).tolist()
    check_finite(value, norm_value, epoch, run.report.steps + 1)
    run.optimizer.step()
    return value


def _write_state(run: _Run, position: Position) -> None:
    """Write the training state at ``position``: rank 0 writes, every rank raises if that
    failed."""
    assert run.path is not None
    run.report.seconds = time.perf_counter() - run.started
    failure: BaseException | None = None
    if run.rank == 0:  # one writer; the others wait to hear whether it worked
        try:
            state = TrainState.capture(
                run.model, run.optimizer, run.generator,
                position=position, steps=run.report.steps, epoch_losses=run.report.epoch_losses,
                seconds=run.report.seconds, config=run.config, fingerprint=run.fingerprint,
                pair_groups=run.pair_groups, world_size=run.world,
            )  # fmt: skip
            save_train_state(run.path, state)
        except Exception as exc:
            failure = exc
    if run.data_parallel and distributed.any_rank(failure is not None, run.device):
        failure = failure or TrainingError(
            f"rank 0 could not write the training checkpoint {run.path}"
        )
    if failure is not None:
        raise failure


def _epoch_checkpoint_due(run: _Run, epoch: int) -> bool:
    """Whether the state is written after ``epoch``: every ``checkpoint_every`` epochs and
    after the last."""
    return run.path is not None and (
        (epoch + 1) % run.checkpoint_every == 0 or epoch + 1 == run.config.epochs
    )


def _maybe_checkpoint(run: _Run, position: Position, epoch_due: bool) -> None:
    """After a step: write the state every ``checkpoint_every_steps`` steps, unless the
    epoch's own checkpoint follows right after this, its last batch."""
    if (
        run.path is not None
        and run.checkpoint_every_steps is not None
        and run.report.steps % run.checkpoint_every_steps == 0
        and not (position.batch == run.n_batches and epoch_due)
    ):
        _write_state(run, position)


def _train_epoch(
    run: _Run,
    net: torch.nn.Module,
    epoch: int,
    start: Position,
    bar: tqdm,
    on_step: Callable[[int, float], None] | None,
) -> None:
    """Train ``epoch`` from its first batch, or from ``start`` when that lies inside it;
    then record its mean loss and write its checkpoint when due."""
    batches, begin = _epoch_order(run, epoch, start)
    epoch_due = _epoch_checkpoint_due(run, epoch)
    total = begin.loss_sum
    for batch_number, index in enumerate(batches[begin.batch :], start=begin.batch + 1):
        value = _train_step(run, net, index, epoch)
        total += value
        run.report.steps += 1
        bar.update()
        bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4g}", refresh=False)
        _maybe_checkpoint(run, Position(epoch, batch_number, total, begin.epoch_start), epoch_due)
        if on_step is not None:
            on_step(run.report.steps, value)
    run.report.epoch_losses.append(total / run.n_batches)
    if epoch_due:
        _write_state(run, Position(epoch + 1, 0, 0.0, run.generator.get_state()))


def train(
    model: PyramidFlow,
    images: torch.Tensor,
    config: Config | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 1,
    checkpoint_every_steps: int | None = None,
    resume: bool = False,
    pair_groups: int = 1,
    data_parallel: bool | None = None,
) -> TrainReport:
    """Train ``model`` on normalized good images (N, C, H, W) with the Siamese Fourier loss.

    Deterministic for a given ``config.seed`` (shuffling and augmentation use their own
    generator). Reports the last epoch: nothing here looks at test data.

    ``checkpoint_path``: after every ``checkpoint_every`` epochs, after the last, and (with
    ``checkpoint_every_steps``) also after every that many optimizer steps, mid-epoch
    included, the whole training state (weights, VN running means, Adam state, epoch,
    position in the epoch, step, generator and torch RNG states, config) is written there
    atomically. ``resume=True`` continues from that file when it exists (from scratch
    otherwise) and reaches the same weights as an uninterrupted run; ``config.epochs`` may
    be raised to train on. A non-finite loss or gradient raises :class:`TrainingError`
    before the optimizer step and leaves the last checkpoint untouched.
    ``on_step(step, loss)`` is called after every optimizer step (1-based global step),
    ``on_epoch(epoch, mean_loss)`` after every epoch (0-based) and its checkpoint; the model
    is put back in training mode after ``on_epoch`` returns.

    ``pair_groups`` > 1 forms Siamese pairs only inside that many consecutive equal parts
    of each batch (the loss is the mean of theirs; VN statistics span the whole batch):
    the single-process equivalent of a distributed run (see :mod:`.distributed`).
    ``data_parallel`` (default: whether a process group of > 1 process is initialized)
    trains with DistributedDataParallel; ``config.batch_size`` is then per rank.
    """
    config, _ = resolve_augment(config or model.config, images)
    _check_arguments(config, checkpoint_every, checkpoint_every_steps, pair_groups)
    data_parallel = _resolve_data_parallel(data_parallel, pair_groups)
    world = distributed.world_size() if data_parallel else 1
    _check_enough_images(images, config.batch_size, world)
    device = _resolve_device(device)
    model.to(device).train()
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    run = _Run(
        model=model, images=images, config=config, device=device,
        optimizer=make_optimizer(model, config),
        generator=torch.Generator().manual_seed(config.seed), report=TrainReport(),
        pair_groups=pair_groups, data_parallel=data_parallel,
        rank=distributed.rank() if data_parallel else 0, world=world, path=path,
        fingerprint=data_fingerprint(images) if path is not None else "",
        checkpoint_every=checkpoint_every, checkpoint_every_steps=checkpoint_every_steps,
    )  # fmt: skip
    start = _resume_or_start(run, resume)
    with contextlib.ExitStack() as cleanup:
        # store mode's backward runs the convolutions' gradients here, outside the model
        cleanup.enter_context(backward_scope(model.config.conv_precision, device))
        net = _network(run, cleanup)
        run.started = time.perf_counter() - run.report.seconds
        bar = counter_bar(_steps_left(run, start), "training", enabled=progress and run.rank == 0)
        for epoch in range(start.epoch, config.epochs):
            _train_epoch(run, net, epoch, start, bar, on_step)
            if on_epoch is not None:
                on_epoch(epoch, run.report.epoch_losses[-1])
                model.train()
    bar.close()
    run.report.seconds = time.perf_counter() - run.started
    model.eval()
    return run.report
