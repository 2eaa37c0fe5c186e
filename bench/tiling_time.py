"""Training step time with row-band tiling (automatic budget) against untiled, side by side.

One process per size builds one model (B = 2, L = 4, S stacks, C = 16, k = 7, recompute) and
alternates steps with ``memory_budget = 0`` (never tile) and the automatic budget (order
ABBA, after one warm-up step of each), so both see the same machine load. Reports the
median step time of each and the median of the per-pair ratios tiled / untiled, for wall
time and for the process's CPU time (``time.process_time``: on a machine shared with other
jobs it counts this process's work, not the time slices others took), and the load
average before and after.

Run: ``python bench/tiling_time.py --sizes 256 1024 --steps 2`` (writes
``results/tiling_time_<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from checkout import run_metadata  # noqa: E402
from memory_depth import build, synchronize, train_step  # noqa: E402

BUDGETS = {"untiled": 0, "tiled": None}


def time_size(size: int, stacks: int, steps: int, device: str) -> dict[str, Any]:
    """Median step times of both settings and the median of the side-by-side ratios."""
    model, images, optimizer = build(size, stacks, device)
    times: dict[str, list[float]] = {name: [] for name in BUDGETS}
    cpu_times: dict[str, list[float]] = {name: [] for name in BUDGETS}
    plan = {}
    load_before = os.getloadavg()
    for index in range(steps + 1):
        order = list(BUDGETS) if index % 2 == 0 else list(BUDGETS)[::-1]
        for name in order:
            model.set_memory_budget(BUDGETS[name])
            plan[name] = model.tiling_summary()
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(model, images, optimizer, "recompute")
            synchronize(device)
            if index > 0:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - start_cpu)

    def ratio(values: dict[str, list[float]]) -> float:
        pairs = zip(values["tiled"], values["untiled"], strict=True)
        return statistics.median(t / u for t, u in pairs)

    return {
        "size": size,
        "stacks": stacks,
        "threads": torch.get_num_threads(),
        "step_s": {name: statistics.median(values) for name, values in times.items()},
        "step_s_all": times,
        "cpu_s_all": cpu_times,
        "ratio_tiled_over_untiled": ratio(times),
        "cpu_ratio_tiled_over_untiled": ratio(cpu_times),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "plan": plan["tiled"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--stacks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting (>= 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's); 1 keeps a shared machine's other jobs "
        "from stalling the step's worker threads",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        row = time_size(size, args.stacks, args.steps, args.device)
        rows.append(row)
        print(
            f"{size:5d} px  untiled {row['step_s']['untiled']:8.2f} s  tiled "
            f"{row['step_s']['tiled']:8.2f} s  ratio {row['ratio_tiled_over_untiled']:.3f}  "
            f"CPU-time ratio {row['cpu_ratio_tiled_over_untiled']:.3f}  load "
            f"{row['load_average_before_after']}  "
            f"tiled blocks {row['plan']['tiled_blocks']}",
            flush=True,
        )
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {**run_metadata(args.device), "rows": rows}
    (args.out / f"tiling_time_{tag}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
