"""Measured transient of one row band's recompute backward, against the band-size estimate.

The band planner (``pyramidflow.model.tiling``) cuts a block into bands whose backward
transient fits ``Config.memory_budget``, using :func:`~pyramidflow.model.tiling.
band_transient_bytes`, a count of the tensors live at the band's peak. This script measures
that transient: in a fresh process (``MALLOC_MMAP_THRESHOLD_=131072``, so freed buffers
leave the process and RSS follows what is live), for every block of one stack that the
planner tiles at the given size, it runs ``tiling.backward_block`` on one interior band of
R target rows, with every level and gradient pre-allocated and owned (the band writes in
place: no whole-level buffer is allocated), and records the peak RSS above the RSS before
(VmHWM reset through /proc/self/clear_refs). Reported per block and R: measured MB,
estimated MB and their ratio; the estimate should be at or slightly above the measurement.

Run: ``python bench/band_transient.py --size 1024 --rows 32 128`` (writes
``results/band_transient_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from checkout import run_metadata  # noqa: E402
from memory_phases import MMAP_THRESHOLD, PhaseMeter  # noqa: E402


def worker(size: int, batch: int, rows: list[int]) -> list[dict[str, Any]]:
    """Measure every tiled block of one stack at every band height, in this process."""
    import torch
    from memory_depth import build

    from pyramidflow.model import tiling

    model, _, _ = build(size, 1, "cpu", batch=batch)
    channels, levels_n = model.config.channels, model.config.levels
    gen = torch.Generator().manual_seed(0)
    levels = [
        torch.randn(batch, channels, size >> i, size >> i, generator=gen)
        for i in range(levels_n)
    ]  # fmt: skip
    grads: list[torch.Tensor | None] = [torch.randn_like(t) for t in levels]
    budget = model.flow.budget_mb(torch.device("cpu"))
    meter = PhaseMeter("cpu")
    out: list[dict[str, Any]] = []
    warm = False
    for index, block in enumerate(model.blocks):
        if tiling.row_bands(block, levels, budget) is None:
            continue
        height = levels[block.target].shape[-2]
        everything = set(range(levels_n))
        # the first band of a process also allocates one-time state (oneDNN, torch): discarded
        for band_rows in rows if warm else rows[:1] + rows:
            start = (height - band_rows) // 2
            meter.rows.clear()
            meter.start()
            tiling.backward_block(
                block, levels, grads, [True] * levels_n, [(start, start + band_rows)],
                set(everything), set(everything),
            )  # fmt: skip
            meter.mark("band")
            if not warm:
                warm = True
                continue
            measured = meter.rows[0]["peak_mb"]
            estimated = tiling.band_transient_bytes(block, levels, band_rows) / 2**20
            out.append({
                "block": f"{index} {block.kind}({block.start})", "rows": band_rows,
                "measured_mb": measured, "estimated_mb": round(estimated, 1),
                "estimated_over_measured": round(estimated / measured, 3),
            })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.size, args.batch, args.rows)))
        return
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--size", str(args.size),
        "--batch", str(args.batch), "--rows", *map(str, args.rows),
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker failed:\n{done.stderr[-3000:]}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        print(
            f"{row['block']:12s} {row['rows']:4d} rows  measured {row['measured_mb']:7.1f} MB  "
            f"estimated {row['estimated_mb']:7.1f} MB  ratio {row['estimated_over_measured']:.2f}"
        )
    report = {**run_metadata("cpu"), "size": args.size, "batch": args.batch, "bands": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "band_transient_cpu.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
