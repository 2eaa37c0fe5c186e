"""The training loop with resumable state (docs/method.md section 7)."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import TrainingError
from ..io.checkpoint import load_checkpoint, save_checkpoint
from ..model.flow import PyramidFlow
from ..progress import counter_bar
from . import distributed as dist_tools


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


def _fingerprint(images: torch.Tensor) -> str:
    data = images.detach().to("cpu").contiguous()
    digest = hashlib.sha256(data.view(torch.uint8).reshape(-1).numpy())  # no copy
    return f"{tuple(data.shape)}:{data.dtype}:{digest.hexdigest()[:32]}"


@dataclass
class _Position:
    """Where training stands: ``epoch`` epochs completed, then ``batch`` batches of the
    next one (summing to ``loss_sum``), whose order was drawn from the generator state
    ``epoch_start``."""

    epoch: int
    batch: int
    loss_sum: float
    epoch_start: torch.Tensor


# Config fields a resume may change: they do not change what is computed (epochs only
# says where to stop; memory/backend change rounding, not the result).
_RESUMABLE_CHANGES = frozenset({"epochs", "memory", "backend", "category", "extra"})
TRAINING_STATE = "training_state"


def _save_state(
    path: Path,
    model: PyramidFlow,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: Config,
    report: TrainReport,
    position: _Position,
    fingerprint: str,
    pair_groups: int,
    world: int,
) -> None:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.epoch_start"] = position.epoch_start
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = cuda_state
    info = {
        "kind": TRAINING_STATE,
        "epoch": position.epoch,
        "batch": position.batch,
        "epoch_loss_sum": position.loss_sum,
        "step": report.steps,
        "epoch_losses": report.epoch_losses,
        "seconds": report.seconds,
        "train_config": config.to_dict(),
        "optimizer_param_groups": state["param_groups"],
        "optimizer_scalars": scalars,
        "images": fingerprint,
        "pair_groups": pair_groups,
        "world_size": world,
    }
    try:
        save_checkpoint(path, model, info=info, extra_tensors=tensors)
    except OSError as exc:
        raise TrainingError(
            f"could not write the training checkpoint {path} ({exc}); the previous one, if "
            "any, is intact"
        ) from exc


def _load_state(
    path: Path,
    model: PyramidFlow,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: Config,
    report: TrainReport,
    fingerprint: str,
    pair_groups: int,
    world: int,
) -> _Position:
    """Restore a training state; returns where it stopped."""
    saved = load_checkpoint(path)
    info = saved.info
    if info.get("kind") != TRAINING_STATE:
        raise TrainingError(f"{path}: not a training-state checkpoint; cannot resume from it")
    stored = info["train_config"]
    current = config.to_dict()
    changed = sorted(
        k for k in set(stored) | set(current)
        if k not in _RESUMABLE_CHANGES and stored.get(k) != current.get(k)
    )  # fmt: skip
    if changed:
        raise TrainingError(
            f"{path}: cannot resume with a different config ({', '.join(changed)} changed); "
            "only epochs, memory and backend may change"
        )
    if info["images"] != fingerprint:
        raise TrainingError(f"{path}: was trained on other images; cannot resume on these")
    if info.get("pair_groups", 1) != pair_groups or info.get("world_size", 1) != world:
        raise TrainingError(
            f"{path}: was written by a run with {info.get('world_size', 1)} process(es) and "
            f"pair_groups={info.get('pair_groups', 1)}; resume with the same layout"
        )
    expected = model.state_dict()
    weights = saved.model.state_dict()
    if set(weights) != set(expected) or any(
        weights[k].shape != expected[k].shape for k in expected
    ):
        raise TrainingError(f"{path}: weights do not fit this model's architecture")
    model.load_state_dict(weights)
    groups = info["optimizer_param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optim_state: dict[int, dict[str, Any]] = {}
    for name, tensor in saved.extra_tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            optim_state.setdefault(int(index), {})[key] = tensor
    for index, values in info["optimizer_scalars"].items():
        optim_state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    generator.set_state(saved.extra_tensors["rng.generator"])
    torch.set_rng_state(saved.extra_tensors["rng.torch"])
    cuda_states = [
        saved.extra_tensors[f"rng.cuda.{i}"]
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if f"rng.cuda.{i}" in saved.extra_tensors
    ]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    report.epoch_losses = list(info["epoch_losses"])
    report.steps = int(info["step"])
    report.seconds = float(info["seconds"])
    report.start_epoch = int(info["epoch"])
    epoch_start = saved.extra_tensors.get("rng.epoch_start", saved.extra_tensors["rng.generator"])
    return _Position(
        report.start_epoch,
        int(info.get("batch", 0)),
        float(info.get("epoch_loss_sum", 0.0)),
        epoch_start,
    )


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
    distributed: bool | None = None,
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
    ``distributed`` (default: whether a process group of > 1 process is initialized)
    trains with DistributedDataParallel; ``config.batch_size`` is then per rank.
    """
    config = config or model.config
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
    if distributed is None:
        distributed = dist_tools.is_active()
    elif distributed and not dist_tools.is_active():
        raise ValueError(
            "distributed=True needs an initialized process group of more than one process "
            "(pyramidflow.distributed.init_from_env under torchrun)"
        )
    world = dist_tools.world_size() if distributed else 1
    rank = dist_tools.rank() if distributed else 0
    if distributed and pair_groups != 1:
        raise ValueError("pair_groups is the single-process stand-in for ranks; not both")
    local_size = config.batch_size
    global_size = local_size * world
    if images.shape[0] < global_size:
        raise ValueError(
            f"{images.shape[0]} training image(s) is fewer than one batch of {global_size}"
            + (f" ({world} ranks x {local_size})" if world > 1 else "")
        )
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(config.seed)
    report = TrainReport()
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    fingerprint = _fingerprint(images) if path is not None else ""
    resumed: _Position | None = None
    if resume:
        if path is None:
            raise ValueError("resume=True needs a checkpoint_path")
        if path.is_file():
            resumed = _load_state(
                path, model, optimizer, generator, config, report, fingerprint, pair_groups, world
            )
            model.to(device).train()
    first_epoch = resumed.epoch if resumed is not None else 0
    net: torch.nn.Module = model
    cleanup = contextlib.ExitStack()
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        # VN's collectives get their own group, apart from DDP's gradient buckets
        vn_group = torch.distributed.new_group(backend=torch.distributed.get_backend())
        cleanup.callback(torch.distributed.destroy_process_group, vn_group)
        cleanup.enter_context(dist_tools.synchronized_vn(model, vn_group))
    start = time.perf_counter() - report.seconds
    n_batches = images.shape[0] // global_size
    remaining = max(config.epochs - first_epoch, 0) * n_batches
    if resumed is not None and first_epoch < config.epochs:
        remaining -= resumed.batch
    bar = counter_bar(remaining, "training", enabled=progress and rank == 0)

    def write_state(position: _Position) -> None:
        assert path is not None
        report.seconds = time.perf_counter() - start
        failure: BaseException | None = None
        if rank == 0:  # one writer; the others wait to hear whether it worked
            try:
                _save_state(
                    path, model, optimizer, generator, config, report, position,
                    fingerprint, pair_groups, world,
                )  # fmt: skip
            except Exception as exc:
                failure = exc
        if distributed and dist_tools.any_rank(failure is not None, device):
            failure = failure or TrainingError(
                f"rank 0 could not write the training checkpoint {path}"
            )
        if failure is not None:
            raise failure

    with cleanup:
        for epoch in range(first_epoch, config.epochs):
            skip, total = 0, 0.0
            epoch_start = generator.get_state()
            if resumed is not None and epoch == resumed.epoch and resumed.batch:
                # mid-epoch: redraw this epoch's order, then go on with the saved draws
                skip, total, epoch_start = resumed.batch, resumed.loss_sum, resumed.epoch_start
                now = generator.get_state()
                generator.set_state(epoch_start)
                batches = epoch_batches(images.shape[0], global_size, generator)
                generator.set_state(now)
            else:
                batches = epoch_batches(images.shape[0], global_size, generator)
            epoch_due = path is not None and (
                (epoch + 1) % checkpoint_every == 0 or epoch + 1 == config.epochs
            )
            for batch_number, index in enumerate(batches[skip:], start=skip + 1):
                batch = images[index]
                if config.augment:
                    batch = augment(batch, generator)
                if distributed:
                    batch = batch[rank * local_size : (rank + 1) * local_size]
                # no name for the latents: in memory="recompute" the backward frees each
                # one as soon as it is replaced, unless something still refers to it
                loss = _loss(model, net(batch.to(device, non_blocking=True)), pair_groups)
                shown = loss.detach()
                if distributed:
                    shown = dist_tools.all_reduce_mean(shown.clone())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                # the step's one host synchronization: loss and gradient norm together
                value, norm_value = torch.stack([shown.float(), norm.float()]).tolist()
                if not math.isfinite(value):
                    raise TrainingError(
                        f"loss became {value} at epoch {epoch + 1}, step {report.steps + 1}; "
                        "lower the learning rate or check the images for constant or broken "
                        "files"
                    )
                if not math.isfinite(norm_value):
                    raise TrainingError(
                        f"gradient norm became {norm_value} at epoch {epoch + 1}, step "
                        f"{report.steps + 1}; lower the learning rate"
                    )
                optimizer.step()
                total += value
                report.steps += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4g}", refresh=False)
                if (
                    path is not None
                    and checkpoint_every_steps is not None
                    and report.steps % checkpoint_every_steps == 0
                    and not (batch_number == n_batches and epoch_due)
                ):
                    write_state(_Position(epoch, batch_number, total, epoch_start))
                if on_step is not None:
                    on_step(report.steps, value)
            report.epoch_losses.append(total / n_batches)
            if epoch_due:
                write_state(_Position(epoch + 1, 0, 0.0, generator.get_state()))
            if on_epoch is not None:
                on_epoch(epoch, report.epoch_losses[-1])
                model.train()
    bar.close()
    report.seconds = time.perf_counter() - start
    model.eval()
    return report
