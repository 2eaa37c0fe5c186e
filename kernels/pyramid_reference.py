"""Pure-torch reference of the invertible Laplacian pyramid (docs/method.md section 2).

G is the 5x5 binomial blur ([1,4,6,4,1] outer itself / 256) with zero padding 2,
Down(x) = maxpool2x2(G(x)), Up(x) = G(pixel-replicate(x)). Everything acts per channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

BINOMIAL_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)


def _taps(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(BINOMIAL_TAPS, dtype=x.dtype, device=x.device) / 16.0


def blur(x: torch.Tensor) -> torch.Tensor:
    """5x5 binomial blur of (B, C, H, W), zero padded, same size (separable)."""
    channels, taps = x.shape[1], _taps(x)
    # Depthwise (groups = C) rather than C = 1 planes: oneDNN pads a 1-channel input to
    # its 16-channel blocked layout, a temporary 16x the input (2 GiB for a 16-channel
    # 1024 px batch of 2); the results are identical.
    row = taps.view(1, 1, 1, 5).expand(channels, 1, 1, 5).contiguous()
    x = F.conv2d(x, row, padding=(0, 2), groups=channels)
    return F.conv2d(x, row.view(channels, 1, 5, 1), padding=(2, 0), groups=channels)


def down(x: torch.Tensor) -> torch.Tensor:
    """Blur then 2x2 max pooling with stride 2."""
    return F.max_pool2d(blur(x), kernel_size=2, stride=2)


def up(x: torch.Tensor) -> torch.Tensor:
    """Pixel replication to twice the size, then blur."""
    return blur(x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1))


def check_pyramid_input(x: torch.Tensor, levels: int) -> None:
    """Raise a clear ValueError unless x is (B, C, H, W) with H, W divisible by 2^(L-1)."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    step = 2 ** (levels - 1)
    if x.shape[-2] % step or x.shape[-1] % step:
        raise ValueError(
            f"height and width must be divisible by 2^(levels-1) = {step} for {levels} "
            f"levels, got {x.shape[-2]}x{x.shape[-1]}"
        )


def decompose(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Split x into ``levels`` bands, finest first; the last band is the coarse Gaussian."""
    check_pyramid_input(x, levels)
    gaussians = [x]
    for _ in range(levels - 1):
        gaussians.append(down(gaussians[-1]))
    bands = [g - up(g_next) for g, g_next in zip(gaussians[:-1], gaussians[1:], strict=True)]
    bands.append(gaussians[-1])
    return bands


def compose(bands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact inverse of :func:`decompose`: r = band[L-1]; r = Up(r) + band[i] downwards."""
    result = bands[-1]
    for band in reversed(bands[:-1]):
        result = up(result) + band
    return result
