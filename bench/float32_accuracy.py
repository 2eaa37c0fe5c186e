"""Float32 gradient accuracy per preset geometry, against float64 of the same computation.

For every MVTec preset geometry (levels and volume normalization: L2 CVN, L4 CVN, L4 SVN,
L8 CVN, L8 SVN), both memory modes and several seeds: one model (C = 16, k = 7, S = 4,
B = 2, paper defaults otherwise), either at initialisation with its zero-initialised last
convolutions set to N(0, 0.01) (``init``) or after ``--train-steps`` float32 Adam steps
of the Fourier loss on random smooth images (``trained``). The gradients of a fixed random
linear + quadratic objective of the latents w.r.t. all parameters are computed in float32
and compared with float64 (``pyramidflow.numerics.float32_gradient_error``):

- ``matched``: against float64 that takes the float32 run's LeakyReLU branches;
- ``plain``: against the plain float64 run; it differs from ``matched`` only where a
  pre-activation within rounding of zero fell on the other side of the kink (``flips``).

Writes ``float32_accuracy.json`` and ``.md`` under ``--out``.

Run: ``python bench/float32_accuracy.py --size 128 --seeds 0 1 2``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from checkout import ensure_kernels_importable, run_metadata

ensure_kernels_importable()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pyramidflow import Config, PyramidFlow  # noqa: E402
from pyramidflow.model.numerics import float32_gradient_error  # noqa: E402

GEOMETRIES = [(2, "CVN"), (4, "CVN"), (4, "SVN"), (8, "CVN"), (8, "SVN")]


def smooth_images(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Normalized random images with structure at several scales."""
    images = torch.zeros(batch, 3, size, size)
    for cells in (4, 16, 64):
        noise = torch.randn(batch, 3, cells, cells, generator=gen)
        images += torch.nn.functional.interpolate(noise, size=(size, size), mode="bilinear")
    return images / 3.0


def make_model(levels: int, volume_norm: str, size: int, seed: int, state: str, steps: int):
    torch.manual_seed(seed)
    config = Config(
        levels=levels, volume_norm=volume_norm, image_size=(size, size), backend="torch",
        memory="store",
    )  # fmt: skip
    model = PyramidFlow(config).train()
    gen = torch.Generator().manual_seed(1000 + seed)
    if state == "init":
        for block in model.blocks:
            torch.nn.init.normal_(block.param_net[2].weight, std=0.01)
        return model, smooth_images(2, size, gen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.9), eps=1e-4, weight_decay=1e-5)
    for _ in range(steps):
        loss = model.loss(model(smooth_images(2, size, gen)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return model, smooth_images(2, size, gen)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1e} [{min(values):.1e}, {max(values):.1e}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--states", nargs="+", default=["init", "trained"])
    parser.add_argument("--memory", nargs="+", default=["store", "recompute"])
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    meta = run_metadata("cpu", argv)
    rows = []
    for levels, volume_norm in GEOMETRIES:
        for state in args.states:
            for seed in args.seeds:
                model, images = make_model(
                    levels, volume_norm, args.size, seed, state, args.train_steps
                )
                for memory in args.memory:
                    start = time.perf_counter()
                    error = float32_gradient_error(model, images, memory=memory)
                    rows.append({
                        "levels": levels, "volume_norm": volume_norm, "state": state,
                        "seed": seed, "memory": memory, "matched": error.overall,
                        "plain": error.overall_plain, "flips": error.kink_flips,
                        "worst_tensor": max(error.per_tensor.values()),
                    })  # fmt: skip
                    print(json.dumps(rows[-1]), f"{time.perf_counter() - start:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "float32_accuracy.json").write_text(
        json.dumps({**meta, "size": args.size, "rows": rows}, indent=1) + "\n"
    )
    lines = [
        f"Float32 gradients vs float64, {args.size} px, B = 2, C = 16, k = 7, S = 4; "
        f"median [min, max] over seeds {args.seeds}; {meta['device_name']}, torch "
        f"{meta['torch']}. `{meta['command']}`",
        "",
        "| geometry | state | memory | all params, same branches | all params, plain "
        "| worst tensor, same branches | kink flips |",
        "|---|---|---|---|---|---|---|",
    ]
    for levels, volume_norm in GEOMETRIES:
        for state in args.states:
            for memory in args.memory:
                group = [
                    r for r in rows
                    if (r["levels"], r["volume_norm"], r["state"], r["memory"])
                    == (levels, volume_norm, state, memory)
                ]  # fmt: skip
                lines.append(
                    f"| L{levels} {volume_norm} | {state} | {memory} "
                    f"| {summary([r['matched'] for r in group])} "
                    f"| {summary([r['plain'] for r in group])} "
                    f"| {summary([r['worst_tensor'] for r in group])} "
                    f"| {', '.join(str(r['flips']) for r in group)} |"
                )
    (args.out / "float32_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
