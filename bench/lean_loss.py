"""Fourier loss forward + backward on the reference path: the lean backward against autograd.

``pyramidflow_kernels.loss_map_reference.fourier_loss`` writes the latents' gradients
directly (``_LeanFourierLoss``); the plain formula (``spectrum_abs_mean(pair_difference_map
(latents))``) is what autograd differentiated before. For each size this times both on the
same random latents (B = 2, C = 16, L = 4), alternating, as CPU time of this process
(``time.process_time``, one torch thread by default: robust to other jobs on a shared
machine), and reports the medians and the median ratio lean / plain, with the largest
relative difference of their gradients.

Run: ``python bench/lean_loss.py --sizes 256 1024``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from checkout import ensure_kernels_importable  # noqa: E402

ensure_kernels_importable()
from pyramidflow_kernels import loss_map_reference as reference  # noqa: E402
from pyramidflow_kernels.testing import relative_error  # noqa: E402


def plain_loss(latents: list[torch.Tensor]) -> torch.Tensor:
    return reference.spectrum_abs_mean(reference.pair_difference_map(latents))


def time_size(size: int, repeats: int) -> dict[str, float]:
    """Median CPU seconds of forward + backward of both, and their gradients' difference."""
    gen = torch.Generator().manual_seed(0)
    latents = [
        torch.randn(2, 16, size >> i, size >> i, generator=gen).requires_grad_(True)
        for i in range(4)
    ]  # fmt: skip
    times: dict[str, list[float]] = {"lean": [], "plain": []}
    grads = {}
    for index in range(repeats + 1):
        for name, loss_fn in (("lean", reference.fourier_loss), ("plain", plain_loss)):
            start = time.process_time()
            grads[name] = torch.autograd.grad(loss_fn(latents), latents)
            if index > 0:
                times[name].append(time.process_time() - start)
    ratios = [a / b for a, b in zip(times["lean"], times["plain"], strict=True)]
    return {
        "size": size,
        "lean_cpu_s": statistics.median(times["lean"]),
        "plain_cpu_s": statistics.median(times["plain"]),
        "ratio_lean_over_plain": statistics.median(ratios),
        "gradient_relative_difference": relative_error(list(grads["lean"]), list(grads["plain"])),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for size in args.sizes:
        row = time_size(size, args.repeats)
        print(
            f"{size:5d} px  lean {row['lean_cpu_s']:.3f} s  plain {row['plain_cpu_s']:.3f} s  "
            f"ratio {row['ratio_lean_over_plain']:.3f}  gradients differ by "
            f"{row['gradient_relative_difference']:.1e} (float32)",
            flush=True,
        )


if __name__ == "__main__":
    main()
