"""Pure-torch references of the Fourier loss and the anomaly map (docs/method.md 7-8).

Both reduce channels before composing the pyramid: compose is linear, so
mean_c(Compose(d)) = Compose(mean_c(d)) and the pyramid runs on one channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .pyramid_reference import compose


def pair_indices(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of every pair i < j in a batch, in row-major order."""
    if batch < 2:
        raise ValueError(f"the Siamese loss needs a batch of at least 2 images, got {batch}")
    pairs = torch.triu_indices(batch, batch, offset=1, device=device)
    return pairs[0], pairs[1]


def rfft_column_weights(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """How many full-spectrum columns each rfft column stands for (1 or 2)."""
    weights = torch.full((width // 2 + 1,), 2.0, dtype=dtype, device=device)
    weights[0] = 1.0
    if width % 2 == 0:
        weights[-1] = 1.0
    return weights


def spectrum_abs_mean(maps: torch.Tensor) -> torch.Tensor:
    """mean over maps and frequencies of |FFT2(map)|, computed with rfft2. maps: (P, H, W)."""
    height, width = maps.shape[-2:]
    magnitude = torch.fft.rfft2(maps).abs()
    weights = rfft_column_weights(width, magnitude.dtype, magnitude.device)
    return (magnitude * weights).sum() / (maps.shape[0] * height * width)


def pair_difference_map(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """D per pair: mean over channels of Compose((z_i - z_j)^2), shape (P, H, W)."""
    first, second = pair_indices(latents[0].shape[0], latents[0].device)
    reduced = [((z[first] - z[second]) ** 2).mean(dim=1, keepdim=True) for z in latents]
    return compose(reduced)[:, 0]


def fourier_loss(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """Siamese Fourier loss: mean over pairs and frequencies of |FFT2(D)|."""
    return spectrum_abs_mean(pair_difference_map(latents))


def anomaly_map(
    latents: Sequence[torch.Tensor], template: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: mean over channels of Compose(|z - T|) (B, H, W), and its max (B,)."""
    reduced = [
        (z - t).abs().mean(dim=1, keepdim=True) for z, t in zip(latents, template, strict=True)
    ]
    amap = compose(reduced)[:, 0]
    return amap, amap.amax(dim=(-2, -1))
