"""Byte-count model of the PyramidFlow ops and of every Triton kernel: the memory floor.

Every op is memory bound on a GPU, so its floor is (bytes read once + bytes written
once) / bandwidth. This module is the single place where those byte counts are written
down; ``bench/bench_ops_pyramid_loss.py`` and ``bench/bench_ops_coupling.py`` use the
same formulas (their ``bytes_moved`` give the same numbers, see
``tests/test_gpu_build.py``), ``bench/gpu_build_check.py`` puts the per-kernel counts in
its table and ``bench/gpu_check.py`` turns measured times into GB/s and % of the floor.

Notation, for latents / inputs of B x C x H x W elements with L pyramid levels, all
float32 (``element_bytes`` = 4) unless a shape says otherwise:

- A = B C H W (elements of the finest level), a = H W (one plane);
- S = sum_{i < L-1} 4^-i (the levels that get composed or decomposed),
  T = sum_{i < L} 4^-i (all levels);
- P = B (B - 1) / 2 (image pairs of the Siamese loss);
- F = H (W / 2 + 1) x 2 (floats of one rfft2 half spectrum, interleaved re, im).

Op counts (``op_bytes``; the Triton path, each tensor read once and written once, halo
re-reads assumed to hit the cache):

- ``pyramid_decompose`` forward: per level, down reads g and writes g/4; the band reads
  g and g/4 and writes the band: 3.5 A S. Backward (the max-pool routing kernel, then
  the blur in torch): counted at the same 3.5 A S floor.
- ``pyramid_compose`` forward: read the coarse level (1/4) and the band, write the
  result: 2.25 A S. Backward (the adjoint): read a level's gradient, write the coarser
  one: 1.25 A S.
- ``fourier_loss`` forward: the pair kernel reads the latents (A T) and writes P a T;
  compose on P planes (2.25 P a S); rfft2 reads P a and writes ~P a; the magnitude
  kernel reads ~P a: A T + P a (T + 2.25 S + 3). Backward: rfft2 recomputed (2 P a),
  gradient kernel (2 P a), irfft2 and its halving (4 P a), adjoint compose
  (1.25 P a S), pair backward reads the latents and the P a T gradient and writes the
  latent gradients: 2 A T + P a (T + 1.25 S + 8).
- ``anomaly_map`` forward: read latents (A T) and template (A T / B), write B a T;
  compose on B planes (2.25 B a S); the per-row maxima (B a / 64) are left out.
- ``affine_coupling`` (B x C x H x W target, parameters at the target resolution,
  k = 1; the C x C weight and the VN means are left out): forward, eval: read x (C)
  and h = [s_raw, t] (2C), write z (C): 4 C planes per image; forward, training: the VN
  batch mean needs a first pass over s_raw: 5 C; backward, eval: read grad z, x, h
  (4C), write grad x, grad h (3C): 7 C; backward, training: grad s is written raw and
  corrected by a second pass (read grad s and s_raw, write): 10 C. The inverse moves
  the same bytes as the forward.

Kernel counts (``kernel_bytes``; one launch, on the finest level of the shape, with the
small partial-sum buffers the kernel writes included) are listed in ``KERNELS``.

At the default benchmark shape (1024 x 1024, C = 16, B = 2, L = 4, float32):
decompose fwd 617 MB, bwd 617 MB; compose fwd 396 MB, bwd 220 MB; fourier loss fwd
209 MB, bwd 403 MB; anomaly map fwd 303 MB; coupling fwd 537 MB (eval) / 671 MB
(training), bwd 940 MB (eval) / 1342 MB (training). ``python bench/byte_model.py``
prints every count with its floor at the H200's measured copy bandwidth (4.3 TB/s).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

H200_COPY_BANDWIDTH = 4.3e12  # B/s: device-to-device copy (read + write) measured on an H200
FLOAT32_BYTES = 4

__all__ = [
    "BENCH_SHAPE",
    "H200_COPY_BANDWIDTH",
    "KERNELS",
    "OPS",
    "SMALL_SHAPE",
    "KernelInfo",
    "Shape",
    "floor_seconds",
    "kernel_bytes",
    "op_bytes",
]


@dataclass(frozen=True)
class Shape:
    """B x C x H x W latents (finest level) with ``levels`` pyramid levels."""

    batch: int = 2
    channels: int = 16
    height: int = 1024
    width: int = 1024
    levels: int = 4
    element_bytes: int = FLOAT32_BYTES

    @property
    def elements(self) -> int:
        """A = B C H W."""
        return self.batch * self.channels * self.height * self.width

    @property
    def plane(self) -> int:
        """a = H W."""
        return self.height * self.width

    @property
    def pairs(self) -> int:
        """P = B (B - 1) / 2."""
        return self.batch * (self.batch - 1) // 2

    @property
    def spectrum(self) -> int:
        """F = floats of one rfft2 half spectrum (re, im interleaved)."""
        return self.height * (self.width // 2 + 1) * 2

    def level_sums(self) -> tuple[float, float]:
        """(S, T): sums of 4^-i over the composed levels and over all levels."""
        composed = sum(4.0**-i for i in range(self.levels - 1))
        everything = sum(4.0**-i for i in range(self.levels))
        return composed, everything

    def label(self) -> str:
        return f"B={self.batch} C={self.channels} {self.height}x{self.width} L={self.levels}"


BENCH_SHAPE = Shape()
SMALL_SHAPE = Shape(batch=1, channels=3, height=24, width=40, levels=4)

OPS = ("pyramid_decompose", "pyramid_compose", "fourier_loss", "anomaly_map", "affine_coupling")
_ALIASES = {"decompose": "pyramid_decompose", "compose": "pyramid_compose"}
_DIRECTIONS = ("forward", "backward")


def op_bytes(
    op: str,
    shape: Shape = BENCH_SHAPE,
    direction: str = "forward",
    *,
    training: bool = True,
) -> int:
    """Bytes read + written by one call of ``op`` (module docstring for each formula).

    ``op``: one of ``OPS`` (``decompose`` / ``compose`` also accepted); ``direction``:
    ``forward`` or ``backward``; ``training`` only matters for ``affine_coupling``
    (the VN batch-mean passes), whose ``shape`` is the target level (``levels`` unused).
    """
    op = _ALIASES.get(op, op)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    big_a, a, pairs, batch = shape.elements, shape.plane, shape.pairs, shape.batch
    s, t = shape.level_sums()
    if op == "affine_coupling":
        per_plane = {("forward", False): 4, ("forward", True): 5}
        per_plane |= {("backward", False): 7, ("backward", True): 10}
        return per_plane[(direction, bool(training))] * big_a * shape.element_bytes
    table: dict[tuple[str, str], float] = {
        ("pyramid_decompose", "forward"): 3.5 * big_a * s,
        ("pyramid_decompose", "backward"): 3.5 * big_a * s,
        ("pyramid_compose", "forward"): 2.25 * big_a * s,
        ("pyramid_compose", "backward"): 1.25 * big_a * s,
        ("fourier_loss", "forward"): big_a * t + pairs * a * (t + 2.25 * s + 3.0),
        ("fourier_loss", "backward"): 2.0 * big_a * t + pairs * a * (t + 1.25 * s + 8.0),
        ("anomaly_map", "forward"): big_a * t * (1.0 + 1.0 / batch) + batch * a * (t + 2.25 * s),
    }
    if (op, direction) not in table:
        raise ValueError(f"no byte count for {op} {direction} (ops: {', '.join(OPS)})")
    return int(table[(op, direction)] * shape.element_bytes)


@dataclass(frozen=True)
class KernelInfo:
    """A Triton kernel (one ``@triton.jit`` entry point in one mode): the op it serves,
    what it fuses, and its elements moved for one launch on the finest level."""

    function: str
    op: str
    fuses: str
    elements: Callable[[Shape], float]
    formula: str


def _planes(shape: Shape) -> int:
    """N = B C planes of the finest level, as elements: A."""
    return shape.elements


KERNELS: dict[str, KernelInfo] = {
    "down": KernelInfo(
        "_window_kernel", "pyramid_decompose", "5x5 blur + 2x2 max-pool",
        lambda s: 1.25 * _planes(s), "read A, write A/4",
    ),
    "down_route": KernelInfo(
        "_window_kernel", "pyramid_decompose backward", "blur + max-pool argmax + routing",
        lambda s: 2.25 * _planes(s), "read A and grad A/4, write A",
    ),
    "band": KernelInfo(
        "_up_kernel", "pyramid_decompose", "2x upsample + blur + subtract",
        lambda s: 2.25 * _planes(s), "read A/4 and A, write A",
    ),
    "up_add": KernelInfo(
        "_up_kernel", "pyramid_compose", "2x upsample + blur + add",
        lambda s: 2.25 * _planes(s), "read A/4 and A, write A",
    ),
    "up_adjoint": KernelInfo(
        "_window_kernel", "pyramid_compose backward", "adjoint of upsample + blur (6x6)",
        lambda s: 1.25 * _planes(s), "read A, write A/4",
    ),
    "up_only": KernelInfo(
        "_up_kernel", "pyramid up_adjoint backward", "2x upsample + blur",
        lambda s: 1.25 * _planes(s), "read A/4, write A",
    ),
    "up_max": KernelInfo(
        "_up_kernel", "anomaly_map", "upsample + blur + add + row max",
        lambda s: 2.25 * s.batch * s.plane + s.batch * s.plane / 64,
        "read B a/4 and B a, write B a and B a/64 maxima",
    ),
    "vn_sum": KernelInfo(
        "_vn_sum_kernel", "affine_coupling (training)", "soft clamp + VN batch sum",
        lambda s: s.elements + s.batch * s.plane, "read s_raw (A), write B a partials (CVN)",
    ),
    "coupling_fwd": KernelInfo(
        "_coupling_fwd_kernel", "affine_coupling", "clamp + VN + exp + affine + 1x1 mix",
        lambda s: 4 * s.elements, "read x, s_raw, t (3A), write z (A)",
    ),
    "coupling_inv": KernelInfo(
        "_coupling_inv_kernel", "affine_coupling_inverse", "1x1 unmix + clamp + VN + affine",
        lambda s: 4 * s.elements, "read z, s_raw, t (3A), write x (A)",
    ),
    "coupling_bwd": KernelInfo(
        "_coupling_bwd_kernel", "affine_coupling backward", "recompute y + grads x, h, W",
        lambda s: 7 * s.elements + s.batch * s.plane,
        "read x, h, grad z (4A), write grad x, grad h (3A), B a VN partials",
    ),
    "coupling_inv_bwd": KernelInfo(
        "_coupling_inv_bwd_kernel", "affine_coupling_inverse backward",
        "recompute x + grads z, h, W^-1",
        lambda s: 7 * s.elements + s.batch * s.plane,
        "read z, h, grad x (4A), write grad z, grad h (3A), B a VN partials",
    ),
    "coupling_recompute": KernelInfo(
        "_coupling_recompute_kernel", "affine_coupling_recompute",
        "inverse + recompute y + grads x, h, W (+ CVN batch mean)",
        lambda s: 9 * s.elements + s.batch * s.plane,
        "read z, h, grad z (4A) and every image's s for the CVN mean (A; the B-1 repeats "
        "from the cache), write x, grad x, grad h (4A), B a VN partials",
    ),
    "vn_grad": KernelInfo(
        "_vn_grad_kernel", "affine_coupling backward (training)",
        "VN batch-mean correction + clamp'",
        lambda s: 3 * s.elements + s.plane, "read grad s, s_raw (2A) and a, write grad s (A)",
    ),
    "pair_sq_diff": KernelInfo(
        "_pair_sq_diff_kernel", "fourier_loss", "all-pairs (z_i - z_j)^2 channel mean",
        lambda s: s.elements + s.pairs * s.plane, "read A, write P a",
    ),
    "pair_sq_diff_grad": KernelInfo(
        "_pair_sq_diff_grad_kernel", "fourier_loss backward", "all-pairs gradient scatter",
        lambda s: 2 * s.elements + s.pairs * s.plane, "read A and P a, write A",
    ),
    "spectrum_abs": KernelInfo(
        "_spectrum_abs_kernel", "fourier_loss", "|F| x conjugate weight + partial sum",
        lambda s: s.pairs * s.spectrum, "read P F (partials tiny)",
    ),
    "spectrum_abs_grad": KernelInfo(
        "_spectrum_abs_grad_kernel", "fourier_loss backward", "F / |F| x weight x grad",
        lambda s: 2 * s.pairs * s.spectrum, "read P F, write P F",
    ),
    "abs_diff_mean": KernelInfo(
        "_abs_diff_mean_kernel", "anomaly_map", "|z - T| channel mean",
        lambda s: s.elements + s.elements / s.batch + s.batch * s.plane,
        "read A and template A/B, write B a",
    ),
}  # fmt: skip


def kernel_bytes(kernel: str, shape: Shape = BENCH_SHAPE) -> int:
    """Bytes read + written by one launch of ``kernel`` (a ``KERNELS`` key) on the finest
    level of ``shape``."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    return int(KERNELS[kernel].elements(shape) * shape.element_bytes)


def floor_seconds(nbytes: float, bandwidth: float = H200_COPY_BANDWIDTH) -> float:
    """Time to move ``nbytes`` at ``bandwidth`` B/s: the floor of a memory-bound kernel."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    return nbytes / bandwidth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth", type=float, default=H200_COPY_BANDWIDTH, help="B/s")
    args = parser.parse_args(argv)
    shape = BENCH_SHAPE
    print(f"ops at {shape.label()}, float32; floor at {args.bandwidth / 1e12:.2f} TB/s")
    for op in OPS:
        modes = (True, False) if op == "affine_coupling" else (True,)
        for direction in _DIRECTIONS:
            for training in modes:
                try:
                    moved = op_bytes(op, shape, direction, training=training)
                except ValueError:
                    continue
                tag = ("train" if training else "eval") if op == "affine_coupling" else ""
                floor = floor_seconds(moved, args.bandwidth) * 1e6
                print(f"  {op:18s} {direction:8s} {tag:5s} {moved / 1e6:8.0f} MB {floor:8.1f} us")
    print("kernels, one launch on the finest level:")
    for name, info in KERNELS.items():
        moved = kernel_bytes(name, shape)
        floor = floor_seconds(moved, args.bandwidth) * 1e6
        print(f"  {name:18s} {moved / 1e6:8.0f} MB {floor:8.1f} us  {info.formula}")


if __name__ == "__main__":
    main()
