"""A flow of your own on the pyramidflow_kernels ops (not PyramidFlow).

``TwoLevelFlow`` is a two-level Laplacian-pyramid flow with two affine couplings:
the fine band is transformed conditioned on the (upsampled) coarse band, then the coarse
band conditioned on the fine one, with the conditioner's output at the fine resolution
and read at every second pixel by the op. Each coupling mixes channels with an
*orthogonal* matrix (a ``torch.nn.utils.parametrizations.orthogonal`` layer, not
PyramidFlow's LU factors, |det| = 1) and volume-normalizes its log-scales: SVN (zero
mean per channel over batch and space) for the fine coupling, CVN (zero mean per pixel
over batch and channels) for the coarse one, whose every-second-pixel reading keeps a
per-pixel mean at zero but not a per-channel one. So the log-determinants of a batch sum
to zero and the batch's Gaussian negative log-likelihood is ``0.5 * mean(z^2)`` plus a
constant. ``--loss fourier`` trains with PyramidFlow's Siamese Fourier loss instead.

Ops used: ``pyramid_decompose`` / ``pyramid_compose``, ``affine_coupling`` /
``affine_coupling_inverse``, ``fourier_loss``, ``anomaly_map``. With ``backend=None``
they run Triton kernels on CUDA tensors and the torch reference on the CPU.

    python examples/custom_flow.py --steps 60

trains on generated striped textures, checks that the flow inverts, builds a latent
template and scores a clean and a blemished texture.
"""

from __future__ import annotations

import argparse
import math

import pyramidflow_kernels as pk
import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 2


def textures(n: int, size: int, generator: torch.Generator, defect: bool = False) -> torch.Tensor:
    """(n, 3, size, size) striped textures with random phase, small angle jitter and noise;
    with ``defect`` a bright 6 x 6 blemish at a random place."""
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = []
    for _ in range(n):
        angle = 0.6 + 0.1 * torch.randn((), generator=generator)
        phase = 2 * math.pi * torch.rand((), generator=generator)
        wave = torch.sin(0.8 * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
        image = torch.stack([wave, 0.5 * wave, -wave]) + 0.1 * torch.randn(
            3, size, size, generator=generator
        )
        if defect:
            top, left = torch.randint(4, size - 10, (2,), generator=generator).tolist()
            image[:, top : top + 6, left : left + 6] += 2.5
        out.append(image)
    return torch.stack(out)


class Coupling(nn.Module):
    """Affine coupling of one band given a conditioning band, orthogonal channel mixing,
    volume normalization with a running mean for eval mode."""

    def __init__(
        self, channels: int, hidden: int, volume_norm: str, param_hw: tuple[int, int]
    ) -> None:
        super().__init__()
        self.volume_norm = volume_norm
        self.conditioner = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, 2 * channels, 3, padding=1),
        )
        nn.init.zeros_(self.conditioner[2].weight)  # starts as the identity map
        nn.init.zeros_(self.conditioner[2].bias)
        self.mixing = nn.utils.parametrizations.orthogonal(nn.Linear(channels, channels, False))
        # the VN mean: one per channel (SVN) or one per pixel of the conditioner output (CVN)
        shape = (1, channels, 1, 1) if volume_norm == "SVN" else (1, 1, *param_hw)
        self.register_buffer("running_mean", torch.zeros(shape))
        self.momentum = 0.1

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        z, mean = pk.affine_coupling(
            x, self.conditioner(condition), self.mixing.weight, self.running_mean,
            volume_norm=self.volume_norm, training=self.training,
        )  # fmt: skip
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
        return z

    def inverse(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return pk.affine_coupling_inverse(
            z, self.conditioner(condition), self.mixing.weight, self.running_mean,
            volume_norm=self.volume_norm, training=self.training,
        )  # fmt: skip


class TwoLevelFlow(nn.Module):
    """Images (B, C, H, W) -> two latent bands [(B, C, H, W), (B, C, H/2, W/2)]."""

    def __init__(self, size: int, channels: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.fine_from_coarse = Coupling(channels, hidden, "SVN", (size, size))
        self.coarse_from_fine = Coupling(channels, hidden, "CVN", (size, size))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.couple(pk.pyramid_decompose(images, LEVELS))

    def inverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        return pk.pyramid_compose(self.uncouple(latents))

    def couple(self, bands: list[torch.Tensor]) -> list[torch.Tensor]:
        """The flow proper: pyramid bands -> latents."""
        fine, coarse = bands
        # fine band given the coarse band, nearest-upsampled to the fine resolution
        fine = self.fine_from_coarse(fine, F.interpolate(coarse, size=fine.shape[-2:]))
        # coarse band given the (new) fine band: parameters at fine resolution, the op
        # reads every second pixel
        coarse = self.coarse_from_fine(coarse, fine)
        return [fine, coarse]

    def uncouple(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inverse of :meth:`couple`."""
        fine, coarse = latents
        coarse = self.coarse_from_fine.inverse(coarse, fine)
        fine = self.fine_from_coarse.inverse(fine, F.interpolate(coarse, size=fine.shape[-2:]))
        return [fine, coarse]


def gaussian_nll(latents: list[torch.Tensor]) -> torch.Tensor:
    """Per-dimension negative log-likelihood under N(0, I). The flow is volume preserving
    over a batch (orthogonal mixing, volume-normalized log-scales), so no log-det term."""
    squares = sum(z.pow(2).sum() for z in latents)
    dims = sum(z.numel() for z in latents)
    return 0.5 * squares / dims + 0.5 * math.log(2 * math.pi)


def inversion_error(flow: TwoLevelFlow, images: torch.Tensor) -> float:
    """max |inverse(forward(x)) - x| / max |x| with the flow's current mode."""
    with torch.no_grad():
        restored = flow.inverse(flow(images))
    return float((restored - images).abs().max() / images.abs().max())


def main(
    steps: int = 60,
    size: int = 32,
    batch: int = 4,
    loss: str = "nll",
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, float | list[float]]:
    """Train on generated textures, check invertibility, score clean vs blemished images.
    Returns the numbers it prints."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    flow = TwoLevelFlow(size)
    optimizer = torch.optim.Adam(flow.parameters(), lr=2e-3)
    objective = gaussian_nll if loss == "nll" else pk.fourier_loss
    train = textures(8 * batch, size, generator)
    losses = []
    flow.train()
    for step in range(steps):
        index = torch.randint(0, train.shape[0], (batch,), generator=generator)
        value = objective(flow(train[index]))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
        if verbose and (step % max(1, steps // 5) == 0 or step == steps - 1):
            print(f"step {step:4d}  {loss} loss {value.item():.4f}")

    probe = textures(batch, size, generator)
    train_error = inversion_error(flow, probe)  # batch statistics
    flow.eval()
    eval_error = inversion_error(flow, probe)  # running statistics
    with torch.no_grad():
        latents = [flow(train[i : i + batch]) for i in range(0, train.shape[0], batch)]
        template = [torch.cat(parts).mean(0) for parts in zip(*latents, strict=True)]
        clean_maps, clean_scores = pk.anomaly_map(flow(textures(4, size, generator)), template)
        bad_maps, bad_scores = pk.anomaly_map(
            flow(textures(4, size, generator, defect=True)), template
        )
    result: dict[str, float | list[float]] = {
        "losses": losses,
        "inversion_error_train": train_error,
        "inversion_error_eval": eval_error,
        "clean_score_max": float(clean_scores.max()),
        "defect_score_min": float(bad_scores.min()),
        "map_shape": list(clean_maps.shape),
    }
    if verbose:
        print(f"inversion error (train / eval mode): {train_error:.2e} / {eval_error:.2e}")
        print(
            f"image scores: clean <= {result['clean_score_max']:.3f}, "
            f"blemished >= {result['defect_score_min']:.3f}"
        )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    parser.add_argument("--size", type=int, default=32, help="image size (even)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (>= 2)")
    parser.add_argument("--loss", choices=("nll", "fourier"), default="nll")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.size, args.batch, args.loss, args.seed)
