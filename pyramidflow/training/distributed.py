"""Multi-process training with ``torchrun`` and DistributedDataParallel.

Usage, one process per device (``torchrun --nproc_per_node N train.py``)::

    from pyramidflow.training import distributed, loop, template
    device = distributed.init_from_env()          # gloo on CPU, nccl on CUDA
    loop.train(model, images, config, device=device, checkpoint_path="state.safetensors")
    mean = template.compute_template(model, images, device=device)
    distributed.shutdown()

Every rank holds the full (normalized) training tensor. ``config.batch_size`` is the
batch of one rank; a step draws a global batch of ``world_size * batch_size`` images
from the seeded generator, identically on every rank, and rank r trains on slice r.

What a run on R ranks equals (exact up to float rounding, tested): the single-process
``engine.train(..., pair_groups=R)`` with ``batch_size = R * b``, same seed and data:

- the global batch order and augmentation draws are that run's;
- volume normalization subtracts the mean over the whole global batch (the per-rank
  means are all-reduced, differentiably, so gradients see the other ranks' images),
  and the running means are updated with that global mean;
- Siamese pairs are formed inside each rank's local batch only; the loss is the mean
  over ranks of the per-rank Fourier losses (DDP averages the gradients), and the
  gradient clip and Adam step act on that averaged gradient, identically on all ranks.

It is *not* a single-process run with batch ``R * b`` and all pairs across it: a rank
never compares its images with another rank's. The template sums latents in float64
over each rank's share and all-reduces sums and counts. Checkpoints are written by
rank 0 only; every rank reads them on resume (the path must be on a shared disk).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..model.layers import CouplingBlock


def is_active() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_from_env(
    backend: str | None = None, *, timeout: timedelta = timedelta(minutes=10)
) -> torch.device:
    """Initialize the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and return this process's device: cuda:LOCAL_RANK
    with nccl when CUDA is available (or ``backend='nccl'``), else the CPU with gloo."""
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"distributed training needs {', '.join(missing)} in the environment: start the "
            "script with torchrun (e.g. torchrun --nproc_per_node 2 train.py)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    return device


def shutdown() -> None:
    """Destroy the default process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_active():
        dist.barrier()


class _AllReduceMean(torch.autograd.Function):
    """mean over ranks; its adjoint is again the mean over ranks of the incoming grads."""

    @staticmethod
    def forward(ctx, tensor, group):  # type: ignore[override]
        ctx.group = group
        out = tensor.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out / dist.get_world_size(group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def all_reduce_mean(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable mean of ``tensor`` over the ranks of ``group``: the gradient that
    reaches a rank's input is the mean of every rank's incoming gradient, so that with
    DDP's gradient averaging the result is the gradient of the mean of the ranks' losses."""
    return _AllReduceMean.apply(tensor, group)


@contextmanager
def synchronized_vn(model: nn.Module, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Inside the block, training-mode volume normalization of ``model`` uses the mean over
    all ranks' batches (equal batch sizes assumed) instead of this rank's own. Every rank
    must run the same forwards and backwards: each block issues collectives."""

    def sync(local_mean: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean(local_mean, group)

    blocks = [m for m in model.modules() if isinstance(m, CouplingBlock)]
    previous = [block.vn_sync for block in blocks]
    for block in blocks:
        block.vn_sync = sync
    try:
        yield
    finally:
        for block, before in zip(blocks, previous, strict=True):
            block.vn_sync = before


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """In-place sum over ranks of each tensor (no-op without a process group)."""
    if is_active():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on at least one (``device``: where the
    backend wants tensors, CUDA for nccl)."""
    if not is_active():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (sizes differ by at most one)."""
    size, rank_ = world_size(), rank()
    return slice(rank_ * n // size, (rank_ + 1) * n // size)
