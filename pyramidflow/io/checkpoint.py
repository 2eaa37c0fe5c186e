"""Checkpoints: one ``.safetensors`` file per model, enough on its own to predict.

Tensors: the model's state dict under ``model.``, the latent template as ``template.{l}``
(one C x h x w tensor per level, optional) and caller-named extras under ``extra.``.
Metadata (str -> str): ``format`` = ``pyramidflow``, ``format_version``, ``config`` (the
full :class:`Config` as JSON, preprocessing included) and ``info`` (JSON of a caller's dict:
thresholds, training summary, ...). Files are written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from ..config import Config
from ..errors import PyramidFlowError
from ..model.flow import PyramidFlow, level_sizes
from ..model.scoring import level_scale_size
from .atomic import atomic_write

FORMAT_NAME = "pyramidflow"
FORMAT_VERSION = 1
MODEL_PREFIX = "model."
TEMPLATE_PREFIX = "template."
EXTRA_PREFIX = "extra."
#: Extra tensors holding the znorm/relative/fused scoring recipes' spread, one per level.
SPREAD_PREFIX = "latent_spread."
#: Extra tensor holding the fused scoring recipe's level scale (L,).
LEVEL_SCALE_KEY = "level_score_scale"


class CheckpointError(PyramidFlowError, ValueError):
    """A checkpoint that cannot be written or read; the message names the file."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    model: PyramidFlow
    template: list[torch.Tensor] | None
    info: dict[str, Any]
    extra_tensors: dict[str, torch.Tensor]
    config: Config


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    # clone: safetensors refuses tensors that share memory (views of one template, ...)
    return tensor.detach().to("cpu").contiguous().clone()


def _template_tensors(
    template: Sequence[torch.Tensor], config: Config, path: Path
) -> dict[str, torch.Tensor]:
    sizes = level_sizes(config.image_size, config.levels)
    if len(template) != config.levels:
        raise CheckpointError(
            f"{path}: template has {len(template)} levels, the model has {config.levels}"
        )
    tensors = {}
    for level, (tensor, (h, w)) in enumerate(zip(template, sizes, strict=True)):
        if tensor.dim() == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        expected = (config.channels, h, w)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{path}: template level {level} has shape {tuple(tensor.shape)}, expected "
                f"{expected}"
            )
        tensors[f"{TEMPLATE_PREFIX}{level}"] = _cpu(tensor)
    return tensors


def save_checkpoint(
    path: str | os.PathLike[str],
    model: PyramidFlow,
    template: Sequence[torch.Tensor] | None = None,
    info: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (weights, VN statistics, config), the optional latent template,
    a JSON-able ``info`` dict and named extra tensors to one ``.safetensors`` file.

    Atomic: the data goes to a temporary file in the same folder, is flushed to disk and
    then renamed onto ``path``; on failure an existing ``path`` is left untouched.
    """
    path = Path(path)
    config = model.config
    tensors = {f"{MODEL_PREFIX}{k}": _cpu(v) for k, v in model.state_dict().items()}
    if template is not None:
        tensors.update(_template_tensors(template, config, path))
    for name, tensor in (extra_tensors or {}).items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: extra tensors must map names to tensors ({name!r})")
        tensors[f"{EXTRA_PREFIX}{name}"] = _cpu(tensor)
    try:
        info_json = json.dumps(dict(info or {}), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: info must be JSON-serialisable ({exc})") from None
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": config.to_json(),
        "info": info_json,
    }
    payload = safetensors.torch.save(tensors, metadata=metadata)

    return atomic_write(path, lambda handle: handle.write(payload))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?) ({_first_line(exc)})"
        ) from None
    return metadata, tensors


def _check_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    if metadata.get("format") != FORMAT_NAME:
        found = metadata.get("format")
        what = f"format {found!r}" if found is not None else "no 'format' metadata"
        raise CheckpointError(f"{path}: not a pyramidflow checkpoint ({what})")
    version_text = metadata.get("format_version", "")
    try:
        version = int(version_text)
    except ValueError:
        raise CheckpointError(f"{path}: bad format_version {version_text!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format {version} by a newer pyramidflow; this "
            f"version reads format <= {FORMAT_VERSION}: upgrade pyramidflow"
        )


def _model_from_state(path: Path, config: Config, state: dict[str, torch.Tensor]) -> PyramidFlow:
    # The stored config is checked against the stored weights on the meta device first (no
    # memory): a damaged or hostile config must not allocate before it is refused.
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            expected = PyramidFlow(config).state_dict()
    except Exception as exc:
        raise CheckpointError(
            f"{path}: the stored config does not describe a buildable model ({_first_line(exc)})"
        ) from None
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {missing[0]!r}" + (f" (+{len(missing) - 1})" * (len(missing) > 1))
            )
        if unexpected:
            parts.append(
                f"unexpected {unexpected[0]!r}"
                + (f" (+{len(unexpected) - 1})" * (len(unexpected) > 1))
            )
        raise CheckpointError(f"{path}: weights do not match the stored config: {', '.join(parts)}")
    for key, wanted in expected.items():
        if state[key].shape != wanted.shape:
            raise CheckpointError(
                f"{path}: weight {key!r} has shape {tuple(state[key].shape)}, the stored config "
                f"needs {tuple(wanted.shape)}"
            )
    with torch.random.fork_rng(devices=[]):  # building draws random inits: keep the caller's
        model = PyramidFlow(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; the model is in eval mode and
    reproduces the saved model's outputs exactly on the same device."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    metadata, tensors = _read(path)
    _check_metadata(path, metadata)
    try:
        values = json.loads(metadata.get("config", ""))
        if isinstance(values, dict):
            # files written before scoring recipes existed were scored the paper's way
            values.setdefault("scoring", "paper")
        config = Config.from_dict(values)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad config in checkpoint: {_first_line(exc)}") from None
    try:
        info = json.loads(metadata.get("info", "{}"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: bad info metadata: {_first_line(exc)}") from None

    state, template_levels, extras = {}, {}, {}
    for key, tensor in tensors.items():
        if key.startswith(MODEL_PREFIX):
            state[key[len(MODEL_PREFIX) :]] = tensor
        elif key.startswith(TEMPLATE_PREFIX) and key[len(TEMPLATE_PREFIX) :].isdigit():
            template_levels[int(key[len(TEMPLATE_PREFIX) :])] = tensor
        elif key.startswith(EXTRA_PREFIX):
            extras[key[len(EXTRA_PREFIX) :]] = tensor
        else:
            raise CheckpointError(f"{path}: unexpected tensor {key!r}")
    template = None
    if template_levels:
        if sorted(template_levels) != list(range(config.levels)):
            raise CheckpointError(
                f"{path}: template levels {sorted(template_levels)} do not match the model's "
                f"{config.levels} levels"
            )
        template = [template_levels[level] for level in range(config.levels)]

    model = _model_from_state(path, config, state)
    device = torch.device(map_location)
    if device.type != "cpu":
        model = model.to(device)
        template = None if template is None else [t.to(device) for t in template]
        extras = {name: t.to(device) for name, t in extras.items()}
    return Checkpoint(
        model=model, template=template, info=info, extra_tensors=extras, config=model.config
    )


def spread_from_extras(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> list[torch.Tensor]:
    """The spread of the ``znorm``, ``relative`` and ``fused`` scoring recipes (the good images'
    standard deviation of every latent element) from a checkpoint's extra tensors, checked
    against the template."""
    if checkpoint.template is None:
        raise CheckpointError(f"{path}: checkpoint has no latent template; train it first")
    spread = []
    for level, mean in enumerate(checkpoint.template):
        tensor = checkpoint.extra_tensors.get(f"{SPREAD_PREFIX}{level}")
        if tensor is None:
            raise CheckpointError(
                f"{path}: scoring {checkpoint.config.scoring!r} needs {SPREAD_PREFIX}{level}, "
                "which the file lacks; "
                "retrain, or set the config's scoring to 'paper'"
            )
        usable = bool(torch.isfinite(tensor).all() & (tensor > 0).all())
        if tensor.shape != mean.shape or not usable:
            raise CheckpointError(
                f"{path}: {SPREAD_PREFIX}{level} must be positive and finite with the template's "
                f"shape {tuple(mean.shape)}"
            )
        spread.append(tensor)
    return spread


def level_scale_from_extras(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> torch.Tensor:
    """The ``fused`` / ``fused_peak`` scoring recipe's level scale (the good images' mean
    maximum of every level's map, (L,), and for ``fused_peak`` that of the unsmoothed
    relative map last) from a checkpoint's extra tensors, checked against the model."""
    tensor = checkpoint.extra_tensors.get(LEVEL_SCALE_KEY)
    if tensor is None:
        raise CheckpointError(
            f"{path}: scoring {checkpoint.config.scoring!r} needs {LEVEL_SCALE_KEY}, which the "
            "file lacks; retrain, or set the config's scoring to 'relative' or 'paper'"
        )
    levels = checkpoint.config.levels
    size = level_scale_size(checkpoint.config.scoring, levels)
    usable = bool(torch.isfinite(tensor).all() & (tensor > 0).all())
    if tuple(tensor.shape) != (size,) or not usable:
        what = "one per level" if size == levels else "one per level and the peak's"
        raise CheckpointError(
            f"{path}: {LEVEL_SCALE_KEY} must be {size} positive finite numbers ({what}) for "
            f"scoring {checkpoint.config.scoring!r}"
        )
    return tensor
