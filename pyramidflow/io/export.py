"""Export a trained model as an inference graph: ONNX (onnxruntime, TensorRT, ...) or a
``torch.export`` program (``.pt2``).

The graph maps a normalized image batch ``images`` (B, C, H, W), float32, at the model's
size, to ``anomaly_map`` (B, H, W) and ``score`` (B,), exactly what
:meth:`pyramidflow.Detector.score_batch` computes. Weights, VN running means and the latent
template are baked in as constants; the batch size is dynamic. Preprocessing (resize to
the model size, ``(pixel / max - mean) / std``) and thresholds stay outside the graph:
they are written next to it as metadata (ONNX ``metadata_props`` / the ``.pt2`` extra
file ``pyramidflow.json``), see :func:`deployment_metadata`.

>>> from pyramidflow.export import export_checkpoint
>>> export_checkpoint("grain.safetensors", "grain.onnx", "onnx")
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..errors import PyramidFlowError
from ..model.flow import PyramidFlow
from ..model.scoring import score_latents, uses_level_scale, uses_spread
from .checkpoint import (
    CheckpointError,
    level_scale_from_extras,
    load_checkpoint,
    spread_from_extras,
)

FORMATS = ("onnx", "pt2")
DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
METADATA_KEY = "pyramidflow"
EXAMPLE_BATCH = 2  # traced with B = 2 so that the batch dimension cannot specialise to 1
MAX_BATCH = 4096


class ExportError(PyramidFlowError):
    """A model that cannot be exported as asked (no template, unknown format, ...)."""


class AnomalyGraph(nn.Module):
    """The inference graph: normalized images (B, C, H, W) -> (maps (B, H, W), scores (B,)).

    Holds its own eval-mode, gradient-free float32 copy of the model on the CPU with the
    torch reference ops (Triton kernels do not export to ONNX), float32 convolutions
    whatever the model's ``conv_precision``, and the template as
    buffers, so that tracing sees no autograd branch, no Triton call and no state update.
    """

    def __init__(
        self,
        model: PyramidFlow,
        template: Sequence[torch.Tensor],
        spread: Sequence[torch.Tensor] | None = None,
        level_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        config = model.config
        if len(template) != config.levels:
            raise ExportError(f"template has {len(template)} levels, the model has {config.levels}")
        self.model = copy.deepcopy(model).float().cpu().eval().requires_grad_(False)
        self.model.set_backend("torch")
        self.model.set_conv_precision("fp32")  # an exported graph is float32 throughout
        self.levels = config.levels
        self.recipe = config.scoring
        if uses_spread(self.recipe) and spread is None:
            raise ExportError(f"scoring {self.recipe!r} needs the good images' spread")
        if uses_level_scale(self.recipe) and level_scale is None:
            raise ExportError(f"scoring {self.recipe!r} needs the good images' level scale")
        self.normalized = uses_spread(self.recipe)
        if uses_level_scale(self.recipe):
            scale = level_scale.detach().float().cpu().reshape(-1)  # type: ignore[union-attr]
            self.register_buffer("level_scale", scale)
        else:
            self.level_scale = None
        for level, tensor in enumerate(template):
            tensor = tensor.detach().float().cpu().reshape(1, *tensor.shape[-3:])
            self.register_buffer(f"template_{level}", tensor)
            if self.normalized:
                scale = spread[level].detach().float().cpu().reshape(tensor.shape)  # type: ignore[index]
                self.register_buffer(f"spread_{level}", scale)
        self.eval()

    def template(self) -> list[torch.Tensor]:
        """The latent template, L tensors (1, C, h_l, w_l), finest first."""
        return [getattr(self, f"template_{level}") for level in range(self.levels)]

    def spread(self) -> list[torch.Tensor] | None:
        """The good images' spread of every latent element (``znorm``/``relative``), or None."""
        if not self.normalized:
            return None
        return [getattr(self, f"spread_{level}") for level in range(self.levels)]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (B, H, W) and image scores (B,) of a normalized batch."""
        latents = self.model(images)
        return score_latents(
            self.model, latents, self.template(), self.spread(), self.recipe, self.level_scale
        )

    def example_input(self, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
        """A zero batch of the model's input shape, for tracing."""
        config = self.model.config
        return torch.zeros(batch, config.in_channels, *config.image_size)


def deployment_metadata(config: Config, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a deployment needs besides the graph: input layout, preprocessing, threshold."""
    info = info or {}
    return {
        "format": "pyramidflow-export",
        "input": INPUT_NAME,
        "outputs": list(OUTPUT_NAMES),
        "image_size": list(config.image_size),
        "in_channels": config.in_channels,
        "mean": list(config.mean),
        "std": list(config.std),
        "geometry": config.geometry,
        "threshold": info.get("threshold"),
        "config": config.to_dict(),
    }


def _dynamic_shapes(dynamic_batch: bool) -> tuple[dict[int, Any]] | None:
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def _prepare_output(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def export_program(
    model: PyramidFlow,
    template: Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    info: dict[str, Any] | None = None,
    spread: Sequence[torch.Tensor] | None = None,
    level_scale: torch.Tensor | None = None,
) -> Path:
    """Write the inference graph as a ``torch.export`` program (``.pt2``).

    Load it with ``torch.export.load(path).module()`` and call it on a normalized batch:
    it returns ``(anomaly_map, score)``. The deployment metadata is stored as the extra
    file ``pyramidflow.json`` (``torch.export.load(path, extra_files={...})``).
    """
    path = _prepare_output(path)
    graph = AnomalyGraph(model, template, spread, level_scale)
    batch = EXAMPLE_BATCH if dynamic_batch else 1
    with torch.no_grad():
        program = torch.export.export(
            graph, (graph.example_input(batch),), dynamic_shapes=_dynamic_shapes(dynamic_batch)
        )
    metadata = json.dumps(deployment_metadata(model.config, info), sort_keys=True)
    torch.export.save(program, str(path), extra_files={f"{METADATA_KEY}.json": metadata})
    return path


def export_onnx(
    model: PyramidFlow,
    template: Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    info: dict[str, Any] | None = None,
    spread: Sequence[torch.Tensor] | None = None,
    level_scale: torch.Tensor | None = None,
) -> Path:
    """Write the inference graph as one ONNX file (input ``images``, outputs
    ``anomaly_map`` and ``score``; batch dimension named ``batch`` when dynamic).

    Uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``),
    which needs the ``onnx`` and ``onnxscript`` packages. The deployment metadata is the
    JSON string ``metadata_props["pyramidflow"]``.
    """
    path = _prepare_output(path)
    graph = AnomalyGraph(model, template, spread, level_scale)
    batch = EXAMPLE_BATCH if dynamic_batch else 1
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                graph,
                (graph.example_input(batch),),
                dynamo=True,
                dynamic_shapes=_dynamic_shapes(dynamic_batch),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                verbose=False,
            )
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the onnx and onnxscript packages ({exc}); "
            "pip install onnx onnxscript"
        ) from None
    if program is None:  # pragma: no cover - only the legacy exporter returns None
        raise ExportError("torch.onnx.export returned no program")
    metadata = json.dumps(deployment_metadata(model.config, info), sort_keys=True)
    program.model.metadata_props[METADATA_KEY] = metadata
    program.save(str(path), external_data=False)
    return path


def export_checkpoint(
    checkpoint_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    fmt: str,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> Path:
    """Export a ``.safetensors`` model written by ``train`` / :meth:`Detector.save` as
    ``fmt`` ``"onnx"`` or ``"pt2"``; the checkpoint must hold a latent template."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint.template is None:
        raise CheckpointError(
            f"{checkpoint_path}: checkpoint has no latent template; train it first"
        )
    spread, level_scale = None, None
    if uses_spread(checkpoint.config.scoring):
        spread = spread_from_extras(checkpoint, checkpoint_path)
    if uses_level_scale(checkpoint.config.scoring):
        level_scale = level_scale_from_extras(checkpoint, checkpoint_path)
    if fmt == "onnx":
        return export_onnx(
            checkpoint.model, checkpoint.template, out_path, opset=opset,
            dynamic_batch=dynamic_batch, info=checkpoint.info, spread=spread,
            level_scale=level_scale,
        )  # fmt: skip
    return export_program(
        checkpoint.model, checkpoint.template, out_path, dynamic_batch=dynamic_batch,
        info=checkpoint.info, spread=spread, level_scale=level_scale,
    )  # fmt: skip


# -- command line -------------------------------------------------------------------------
