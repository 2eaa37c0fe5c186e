"""The PyramidFlow model: frozen projection, invertible pyramid, coupling flow."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pyramidflow_kernels as ops
import torch
from torch import nn

from ..config import Config
from .invertible import InvertibleSequence
from .layers import CouplingBlock, InputProjection, block_plan
from .tiling import decompose_channel_chunk, decompose_in_place, row_bands


def level_sizes(image_size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """(h, w) of every pyramid level, finest first."""
    return [(image_size[0] >> i, image_size[1] >> i) for i in range(levels)]


class PyramidFlow(nn.Module):
    """PyramidFlow (Lei et al., CVPR 2023). ``model(x)`` maps a normalized image batch
    (B, in_channels, H, W) to L latent tensors (B, C, H/2^l, W/2^l), finest first."""

    def __init__(self, config: Config, *, strided_down: bool = True) -> None:
        super().__init__()
        self.config = dataclasses.replace(config)  # own copy: set_backend must not leak
        self.inconv = InputProjection(config.in_channels, config.channels)
        sizes = level_sizes(config.image_size, config.levels)
        blocks = []
        for _ in range(config.stacks):
            for kind, start in block_plan(config.levels):
                param_level = start + 1 if kind == "dual" else start
                blocks.append(
                    CouplingBlock(
                        kind, start, config.channels, config.kernel_size, config.volume_norm,
                        sizes[param_level], clamp=config.clamp, strided_down=strided_down,
                        backend=config.backend, conv_precision=config.conv_precision,
                    )
                )  # fmt: skip
        self.flow = InvertibleSequence(blocks)
        self.flow.memory_budget = config.memory_budget

    @property
    def blocks(self) -> nn.ModuleList:
        """The coupling blocks in application order."""
        return self.flow.blocks

    def set_backend(self, backend: str) -> None:
        """Switch every op of this model to ``auto``, ``torch`` or ``triton``."""
        self.config.backend = backend
        self.config.validate()
        for block in self.blocks:
            block.backend = backend

    def set_conv_precision(self, precision: str) -> None:
        """Run the parameter networks' convolutions in ``fp32``, ``tf32`` or ``bf16``
        (pyramidflow.model.precision); the weights stay float32."""
        self.config.conv_precision = precision
        self.config.validate()
        for block in self.blocks:
            block.conv_precision = precision

    def set_memory_budget(self, budget_mb: int | None) -> None:
        """MiB per row band of the flow's blocks (None: automatic, 0: never tile)."""
        self.config.memory_budget = budget_mb
        self.config.validate()
        self.flow.memory_budget = budget_mb

    def tiling_summary(self, batch: int | None = None) -> dict[str, object]:
        """The band budget in effect and, per block that is tiled at the configured image
        size, its number of row bands (a plan, computed from shapes only)."""
        cfg = self.config
        param = next(p for p in self.parameters())
        budget = self.flow.budget_mb(param.device)
        levels = [
            torch.empty((), dtype=param.dtype, device=param.device).expand(
                batch or cfg.batch_size, cfg.channels, h, w
            )
            for h, w in level_sizes(cfg.image_size, cfg.levels)
        ]  # fmt: skip
        plan = {}
        for index, block in enumerate(self.blocks):
            bands = row_bands(block, levels, budget)
            if bands is not None:
                plan[f"{index} {block.kind}({block.start})"] = len(bands)
        return {"budget_mb": budget, "tiled_blocks": plan}

    def check_input(self, images: torch.Tensor) -> None:
        """Raise ValueError for a batch this model cannot take."""
        cfg = self.config
        if images.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        if images.shape[1] != cfg.in_channels:
            raise ValueError(
                f"model takes {cfg.in_channels}-channel images, got {images.shape[1]} channels"
            )
        height, width = images.shape[-2:]
        if cfg.volume_norm == "CVN" and (height, width) != tuple(cfg.image_size):
            raise ValueError(
                f"this CVN model keeps per-pixel statistics for {cfg.image_size[0]}x"
                f"{cfg.image_size[1]} inputs and cannot run at {height}x{width}; resize the "
                "images or train at this size"
            )
        step = 2 ** (cfg.levels - 1)
        if height % step or width % step:
            raise ValueError(
                f"image size {height}x{width} must be divisible by 2^(levels-1) = {step}"
            )

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Projected features decomposed into L bands (no gradient: the input is frozen)."""
        self.check_input(images)
        with torch.no_grad():
            features = self.inconv(images)
            chunk = decompose_channel_chunk(features, self.flow.budget_mb(features.device))
            if chunk is None:
                return ops.pyramid_decompose(
                    features, self.config.levels, backend=self.config.backend
                )
            return decompose_in_place(features, self.config.levels, chunk, self.config.backend)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Latents of a normalized image batch, finest first."""
        return self.flow(self.pyramid(images), memory=self.config.memory)

    def inverse(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Reconstruct the projected features (B, C, H, W) from latents."""
        return ops.pyramid_compose(self.flow.inverse(latents), backend=self.config.backend)

    def reconstruct_images(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Least-squares reconstruction of the normalized images from latents."""
        return self.inconv.inverse(self.inverse(latents))

    def loss(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        """Siamese Fourier loss of a batch's latents."""
        return ops.fourier_loss(latents, backend=self.config.backend)

    def anomaly_map(
        self, latents: Sequence[torch.Tensor], template: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), scores (B,)) against a latent template."""
        return ops.anomaly_map(latents, template, backend=self.config.backend)
