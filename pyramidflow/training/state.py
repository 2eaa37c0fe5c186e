"""The resumable training state and its checkpoint file (docs/method.md section 7).

A training-state checkpoint is an ordinary model checkpoint (:mod:`..io.checkpoint`, so
written atomically) whose ``info`` says ``kind: training_state`` and holds the position,
the report so far, the optimizer's scalars and what the run must share with a resumed
one; the optimizer's tensors and the RNG states are extra tensors (``optimizer.<i>.<key>``,
``rng.generator``, ``rng.epoch_start``, ``rng.torch``, ``rng.cuda.<i>``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import TrainingError
from ..io.checkpoint import load_checkpoint, save_checkpoint
from ..model.flow import PyramidFlow

TRAINING_STATE = "training_state"
# Config fields a resume may change: they do not change what is computed (epochs only
# says where to stop; memory/memory_budget/backend/conv_precision change rounding, not the
# result; max_pixels is a reading policy).
_RESUMABLE_CHANGES = frozenset(
    {"epochs", "memory", "memory_budget", "backend", "conv_precision", "category", "extra",
     "max_pixels"}
)  # fmt: skip
_OPTIMIZER_PREFIX = "optimizer."


@dataclass(frozen=True, eq=False)
class Position:
    """Where training stands: ``epoch`` epochs completed, then ``batch`` batches of the
    next one (their losses summing to ``loss_sum``), whose order was drawn from the
    generator state ``epoch_start``."""

    epoch: int
    batch: int
    loss_sum: float
    epoch_start: torch.Tensor


@dataclass(frozen=True, eq=False)
class TrainState:
    """Everything a resumed run needs to continue exactly where a run stopped.

    ``model`` holds the weights and VN running means, ``optimizer`` is an optimizer
    ``state_dict()``, ``generator`` the shuffling/augmentation generator's state,
    ``torch_rng``/``cuda_rng`` the global RNG states; ``steps``, ``epoch_losses`` and
    ``seconds`` are the report so far. ``config`` (``Config.to_dict()``), ``fingerprint``
    (of the training images), ``pair_groups`` and ``world_size`` are what a resume must
    share with the run that wrote the state.
    """

    model: PyramidFlow
    optimizer: dict[str, Any]
    generator: torch.Tensor
    torch_rng: torch.Tensor
    cuda_rng: tuple[torch.Tensor, ...]
    position: Position
    steps: int
    epoch_losses: list[float]
    seconds: float
    config: dict[str, Any]
    fingerprint: str
    pair_groups: int
    world_size: int

    @classmethod
    def capture(
        cls,
        model: PyramidFlow,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        *,
        position: Position,
        steps: int,
        epoch_losses: list[float],
        seconds: float,
        config: Config,
        fingerprint: str,
        pair_groups: int,
        world_size: int,
    ) -> TrainState:
        """The state of a running training: the live objects' states (by reference, not
        copied: save it before training goes on) and the global RNG states."""
        cuda_rng: tuple[torch.Tensor, ...] = ()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda_rng = tuple(torch.cuda.get_rng_state_all())
        return cls(
            model=model,
            optimizer=optimizer.state_dict(),
            generator=generator.get_state(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=cuda_rng,
            position=position,
            steps=steps,
            epoch_losses=list(epoch_losses),
            seconds=seconds,
            config=config.to_dict(),
            fingerprint=fingerprint,
            pair_groups=pair_groups,
            world_size=world_size,
        )

    def restore(
        self, model: PyramidFlow, optimizer: torch.optim.Optimizer, generator: torch.Generator
    ) -> None:
        """Load the weights, optimizer and generator states into the live objects and set
        the global RNG states (the inverse of :meth:`capture`)."""
        model.load_state_dict(self.model.state_dict())
        optimizer.load_state_dict(self.optimizer)
        generator.set_state(self.generator)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng:
            torch.cuda.set_rng_state_all(list(self.cuda_rng))


def data_fingerprint(images: torch.Tensor) -> str:
    """Shape, dtype and a hash of the training images: a resume must see the same ones."""
    data = images.detach().to("cpu").contiguous()
    digest = hashlib.sha256(data.view(torch.uint8).reshape(-1).numpy())  # no copy
    return f"{tuple(data.shape)}:{data.dtype}:{digest.hexdigest()[:32]}"


def save_train_state(path: Path, state: TrainState) -> None:
    """Write ``state`` to ``path`` atomically; an OS error becomes a :class:`TrainingError`
    (the previous file, if any, is then intact)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state.optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER_PREFIX}{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.generator"] = state.generator
    tensors["rng.epoch_start"] = state.position.epoch_start
    tensors["rng.torch"] = state.torch_rng
    for i, cuda_state in enumerate(state.cuda_rng):
        tensors[f"rng.cuda.{i}"] = cuda_state
    info = {
        "kind": TRAINING_STATE,
        "epoch": state.position.epoch,
        "batch": state.position.batch,
        "epoch_loss_sum": state.position.loss_sum,
        "step": state.steps,
        "epoch_losses": state.epoch_losses,
        "seconds": state.seconds,
        "train_config": state.config,
        "optimizer_param_groups": state.optimizer["param_groups"],
        "optimizer_scalars": scalars,
        "images": state.fingerprint,
        "pair_groups": state.pair_groups,
        "world_size": state.world_size,
    }
    try:
        save_checkpoint(path, state.model, info=info, extra_tensors=tensors)
    except OSError as exc:
        raise TrainingError(
            f"could not write the training checkpoint {path} ({exc}); the previous one, if "
            "any, is intact"
        ) from exc


def _check_resumable(
    path: Path,
    info: dict[str, Any],
    config: Config,
    *,
    fingerprint: str,
    pair_groups: int,
    world_size: int,
) -> None:
    """Raise :class:`TrainingError` unless a run with ``config`` on the images with
    ``fingerprint`` and the same layout may resume from the state whose info is ``info``."""
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
            "only epochs, memory, memory_budget, backend, conv_precision and max_pixels may change"
        )
    if info["images"] != fingerprint:
        raise TrainingError(f"{path}: was trained on other images; cannot resume on these")
    if info.get("pair_groups", 1) != pair_groups or info.get("world_size", 1) != world_size:
        raise TrainingError(
            f"{path}: was written by a run with {info.get('world_size', 1)} process(es) and "
            f"pair_groups={info.get('pair_groups', 1)}; resume with the same layout"
        )


def _check_architecture(path: Path, saved: PyramidFlow, model: PyramidFlow) -> None:
    """Raise :class:`TrainingError` unless ``saved``'s weights fit ``model``."""
    expected = model.state_dict()
    weights = saved.state_dict()
    if set(weights) != set(expected) or any(
        weights[k].shape != expected[k].shape for k in expected
    ):
        raise TrainingError(f"{path}: weights do not fit this model's architecture")


def _optimizer_state(info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The optimizer ``state_dict()`` that :func:`save_train_state` split into ``info``
    (param groups, scalars) and extra tensors."""
    groups = info["optimizer_param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):  # JSON has no tuples
            group["betas"] = tuple(group["betas"])
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith(_OPTIMIZER_PREFIX):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    for index, values in info["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": groups}


def load_train_state(
    path: Path,
    model: PyramidFlow,
    config: Config,
    *,
    fingerprint: str,
    pair_groups: int,
    world_size: int,
) -> TrainState:
    """Read the training state at ``path`` after checking that this run (``model``,
    ``config``, images with ``fingerprint``, layout) may resume from it; files written
    before positions within an epoch were saved resume at the epoch's start."""
    saved = load_checkpoint(path)
    info = saved.info
    _check_resumable(
        path, info, config, fingerprint=fingerprint, pair_groups=pair_groups, world_size=world_size
    )
    _check_architecture(path, saved.model, model)
    tensors = saved.extra_tensors
    device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda_rng = tuple(
        tensors[f"rng.cuda.{i}"] for i in range(device_count) if f"rng.cuda.{i}" in tensors
    )
    position = Position(
        int(info["epoch"]),
        int(info.get("batch", 0)),
        float(info.get("epoch_loss_sum", 0.0)),
        tensors.get("rng.epoch_start", tensors["rng.generator"]),
    )
    return TrainState(
        model=saved.model,
        optimizer=_optimizer_state(info, tensors),
        generator=tensors["rng.generator"],
        torch_rng=tensors["rng.torch"],
        cuda_rng=cuda_rng,
        position=position,
        steps=int(info["step"]),
        epoch_losses=list(info["epoch_losses"]),
        seconds=float(info["seconds"]),
        config=info["train_config"],
        fingerprint=info["images"],
        pair_groups=info.get("pair_groups", 1),
        world_size=info.get("world_size", 1),
    )
