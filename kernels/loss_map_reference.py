"""Pure-torch references of the Fourier loss and the anomaly map (docs/method.md 7-8).

Both reduce channels before composing the pyramid: compose is linear, so
mean_c(Compose(d)) = Compose(mean_c(d)) and the pyramid runs on one channel.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .pyramid_reference import compose


def pair_list(batch: int) -> list[tuple[int, int]]:
    """Every pair i < j in a batch, in row-major order (a Python list: no device read)."""
    if batch < 2:
        raise ValueError(f"the Siamese loss needs a batch of at least 2 images, got {batch}")
    return list(itertools.combinations(range(batch), 2))


def pair_indices(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of every pair i < j in a batch, in row-major order."""
    pair_list(batch)
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
    """Siamese Fourier loss: mean over pairs and frequencies of |FFT2(D)|.

    Differentiated by :class:`_LeanFourierLoss` (the same gradient, without autograd's
    latent-sized temporaries); the plain formula where the compiler traces the loss."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return spectrum_abs_mean(pair_difference_map(latents))
    return _LeanFourierLoss.apply(*latents)


def _pair_maps(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """mean_c (z_i - z_j)^2 per pair and level, (P, 1, h, w), one image's difference at a
    time (autograd's version holds z[first], z[second] and their difference per level)."""
    pairs = pair_list(latents[0].shape[0])
    reduced = []
    for z in latents:
        maps = z.new_empty(len(pairs), 1, *z.shape[-2:])
        for pair, (i, j) in enumerate(pairs):
            difference = torch.sub(z[i], z[j])
            torch.mean(difference.square_(), dim=0, keepdim=True, out=maps[pair])
        reduced.append(maps)
    return reduced


def _compose_adjoint(grad: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """The adjoint of :func:`compose` applied to ``grad`` (P, 1, H, W): one (P, 1, h, w) per
    level (compose is linear: its vector-Jacobian product, on one-channel maps)."""
    with torch.enable_grad():
        bands = [grad.new_zeros(grad.shape[0], 1, *size).requires_grad_(True) for size in sizes]
        return list(torch.autograd.grad(compose(bands), bands, grad))


class _LeanFourierLoss(torch.autograd.Function):
    """:func:`fourier_loss` with its latent gradients written directly: with g the adjoint
    compose of dloss/dD on level l, dloss/dz_i = 2 / C * sum over partners j of
    (z_i - z_j) * g_ij, so the only latent-sized tensors are the gradients themselves."""

    @staticmethod
    def forward(ctx, *latents):  # type: ignore[override]
        maps = compose(_pair_maps(latents))[:, 0]
        ctx.save_for_backward(*latents)
        ctx.maps = maps
        return spectrum_abs_mean(maps)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        latents = ctx.saved_tensors
        with torch.enable_grad():
            maps = ctx.maps.detach().requires_grad_(True)
            (grad_maps,) = torch.autograd.grad(spectrum_abs_mean(maps), maps, grad_loss)
        del ctx.maps
        sizes = [tuple(z.shape[-2:]) for z in latents]
        level_grads = _compose_adjoint(grad_maps[:, None], sizes)
        partners: dict[int, list[tuple[int, int]]] = {}
        for pair, (i, j) in enumerate(pair_list(latents[0].shape[0])):
            partners.setdefault(i, []).append((j, pair))
            partners.setdefault(j, []).append((i, pair))
        grads = []
        for z, g, needed in zip(latents, level_grads, ctx.needs_input_grad, strict=True):
            if not needed:
                grads.append(None)
                continue
            g = g * (2.0 / z.shape[1])
            grad = torch.empty_like(z)
            difference = None  # one image's buffer, only when an image has two partners
            for i in range(z.shape[0]):
                for n, (j, pair) in enumerate(partners[i]):
                    if n == 0:
                        torch.sub(z[i], z[j], out=grad[i]).mul_(g[pair])
                        continue
                    if difference is None:
                        difference = torch.empty_like(z[0])
                    torch.sub(z[i], z[j], out=difference)
                    grad[i].addcmul_(difference, g[pair])
            grads.append(grad)
        return tuple(grads)


def anomaly_map(
    latents: Sequence[torch.Tensor], template: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: mean over channels of Compose(|z - T|) (B, H, W), and its max (B,)."""
    reduced = [
        (z - t).abs().mean(dim=1, keepdim=True) for z, t in zip(latents, template, strict=True)
    ]
    amap = compose(reduced)[:, 0]
    return amap, amap.amax(dim=(-2, -1))
