"""Training memory and step time against depth: memory='recompute' versus 'store'.

For every image size and number of stacks S, one training step (forward, Fourier loss,
backward, Adam step) with B = 2, L = 4, C = 16, k = 7 (paper defaults otherwise):

- peak memory, measured in a fresh subprocess per (size, S, mode): on the CPU the
  process's peak RSS (``ru_maxrss``) after the step minus the peak RSS after imports,
  model construction and input creation (both are reported); on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step.
  On the CPU it is measured twice: with glibc's default malloc (``peak_mb``), whose
  dynamic mmap threshold lets freed 8-32 MB activations stay resident as heap
  fragments, and with ``MALLOC_MMAP_THRESHOLD_=131072`` (``peak_mmap_mb``), where every
  large buffer is returned to the system when freed, so RSS follows what is live.
  ``param_state_mb`` is what the step allocates per parameter (gradient and Adam's two
  moments, 3x the trainable parameter bytes): it grows with S in both modes;
- the steady-state activation memory ``activation_mb``: the peak of a second step above
  the memory before it (CPU: VmHWM reset through /proc/self/clear_refs, with the mmap
  threshold above; CUDA: max_memory_allocated), minus the parameter gradients
  (``grad_mb``), which grow with the parameter count, not with activations;
- step time, measured in one subprocess per (size, S) that alternates recompute and store
  steps (order ABBA, after one warm-up step of each), so that both modes see the same
  machine load: the median of each mode, and the median of the side-by-side ratios.

Writes ``memory_depth_<device>.csv`` and ``.json`` (rows plus the device name, torch
version and thread count) and ``memory_depth_<device>.png`` under ``--out``.

Run: ``python bench/memory_depth.py --sizes 256 512 --stacks 1 2 4 8 --steps 5``
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Run from a checkout: the repository root first on the path, so ``import pyramidflow``
# finds the package whether or not (and however) it is installed.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from checkout import run_metadata  # noqa: E402

MODES = ("recompute", "store")
MMAP_THRESHOLD = 131072
FIELDS = (
    "device", "size", "stacks", "mode", "peak_mb", "baseline_mb", "peak_total_mb",
    "peak_mmap_mb", "steady_peak_mmap_mb", "activation_mb", "grad_mb", "param_state_mb",
    "step_s", "step_s_all", "time_ratio_vs_store", "blocks", "batch", "levels", "channels",
    "kernel_size", "threads",
)  # fmt: skip


def build(size: int, stacks: int, device: str, seed: int = 0, batch: int = 2):
    """Model (training mode), normalized images (B images) and an Adam optimizer."""
    import torch

    from pyramidflow import Config, PyramidFlow

    torch.manual_seed(seed)
    config = Config(
        image_size=(size, size), stacks=stacks, levels=4, channels=16, kernel_size=7,
        batch_size=batch,
    )  # fmt: skip
    model = PyramidFlow(config)
    # non-zero last convolutions, as after some training: the step does real work
    for block in model.blocks:
        torch.nn.init.normal_(block.param_net[2].weight, std=1e-3)
    model = model.to(device).train()
    images = torch.randn(config.batch_size, config.in_channels, size, size, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    return model, images, optimizer


def train_step(model, images, optimizer, memory: str) -> None:
    """Forward, Fourier loss, backward, gradient clipping and an Adam step."""
    import torch

    model.config.memory = memory
    optimizer.zero_grad(set_to_none=True)
    loss = model.loss(model(images))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.config.grad_clip)
    optimizer.step()


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def max_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def steady_step_peak_mb(model, images, optimizer, mode: str, device: str) -> float | None:
    """Peak memory of a second training step above the memory before it.

    After the first step the optimizer's moments exist, as in any later step; what the
    step adds on top is activations, temporaries and the parameter gradients. On the CPU
    the kernel's peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs (Linux
    >= 4.0) right before the step; None where that is not available.
    """
    import torch

    optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        before = torch.cuda.memory_allocated(torch.device(device)) / 2**20
        train_step(model, images, optimizer, mode)
        synchronize(device)
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20 - before
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_mb("VmRSS")
    except (OSError, KeyError):
        return None
    train_step(model, images, optimizer, mode)
    return _proc_status_mb("VmHWM") - before


def worker_memory(size: int, stacks: int, mode: str, device: str) -> dict[str, Any]:
    """Peak memory of one training step in this (fresh) process."""
    import torch

    model, images, optimizer = build(size, stacks, device)
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        baseline = torch.cuda.memory_allocated(torch.device(device)) / 2**20
        train_step(model, images, optimizer, mode)
        synchronize(device)
        total = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    else:
        baseline = max_rss_mb()
        train_step(model, images, optimizer, mode)
        total = max_rss_mb()
    param_bytes = sum(p.numel() * p.element_size() for p in optimizer.param_groups[0]["params"])
    steady = steady_step_peak_mb(model, images, optimizer, mode, device)
    return {
        "peak_mb": total - baseline,
        "steady_peak_mb": steady,
        "grad_mb": param_bytes / 2**20,
        "param_state_mb": 3 * param_bytes / 2**20,
        "baseline_mb": baseline,
        "peak_total_mb": total,
        "blocks": len(model.blocks),
        "threads": torch.get_num_threads(),
    }


def worker_time(size: int, stacks: int, steps: int, device: str) -> dict[str, Any]:
    """Step times of both modes, interleaved (ABBA), after one warm-up step of each."""
    model, images, optimizer = build(size, stacks, device)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for index in range(steps + 1):
        order = MODES if index % 2 == 0 else MODES[::-1]
        for mode in order:
            synchronize(device)
            start = time.perf_counter()
            train_step(model, images, optimizer, mode)
            synchronize(device)
            if index > 0:
                times[mode].append(time.perf_counter() - start)
    ratios = [r / s for r, s in zip(times["recompute"], times["store"], strict=True)]
    return {"times": times, "ratio": statistics.median(ratios)}


def run_worker(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run this script as a fresh subprocess and parse the JSON it prints last."""
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    environ = {**os.environ, **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environ)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path, tag: str) -> None:
    """CSV, JSON and a PNG plot (memory vs S, time vs S)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"memory_depth_{tag}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in FIELDS})
    (out / f"memory_depth_{tag}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    unit = "allocated" if meta["device"].startswith("cuda") else "RSS above baseline"
    for size in sorted({row["size"] for row in rows}):
        for mode, style in zip(MODES, ("o-", "s--"), strict=True):
            sel = sorted(
                (r for r in rows if r["size"] == size and r["mode"] == mode),
                key=lambda r: r["stacks"],
            )
            if not sel:
                continue
            stacks = [r["stacks"] for r in sel]
            label = f"{size} px, {mode}"
            if all(r.get("activation_mb") is not None for r in sel):
                line = ax_mem.plot(
                    stacks, [r["activation_mb"] for r in sel], style,
                    label=f"{label}, step peak - gradients",
                )[0]  # fmt: skip
                ax_mem.plot(
                    stacks, [r["peak_mb"] for r in sel], style[0] + ":",
                    color=line.get_color(), alpha=0.5, label=f"{label}, first step, raw RSS",
                )  # fmt: skip
            else:
                ax_mem.plot(stacks, [r["peak_mb"] for r in sel], style, label=label)
            ax_time.plot(stacks, [r["step_s"] for r in sel], style, label=label)
    for ax, ylabel in ((ax_mem, f"peak memory, MB ({unit})"), (ax_time, "median step time, s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["stacks"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("stacks S (depth)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PyramidFlow training step, B=2, L=4, C=16, k=7 - {meta['device_name']}")
    fig.tight_layout()
    fig.savefig(out / f"memory_depth_{tag}.png", dpi=110)
    plt.close(fig)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per size, the figures the targets are about: how much recompute's activations
    change from the smallest to the largest S (flat within 10 %), whether they are below
    store's from S = 2 on, and the recompute / store time ratios (<= 1.40 at 256 px, S = 4)."""
    summary: dict[str, Any] = {}
    for size in sorted({row["size"] for row in rows}):
        mine = {(row["stacks"], row["mode"]): row for row in rows if row["size"] == size}
        stacks = sorted({s for s, _ in mine})
        activations = [mine[(s, "recompute")].get("activation_mb") for s in stacks]
        entry: dict[str, Any] = {
            "time_ratio_by_stacks": {
                s: round(mine[(s, "recompute")]["time_ratio_vs_store"], 3) for s in stacks
            }
        }
        if None not in activations:
            first, last = activations[0], activations[-1]
            entry[f"activation_change_S{stacks[0]}_to_S{stacks[-1]}"] = round(last / first - 1, 4)
            entry["activation_spread_over_S"] = round(max(activations) / min(activations) - 1, 4)
            entry["recompute_below_store_from_S2"] = all(
                mine[(s, "recompute")]["activation_mb"] < mine[(s, "store")]["activation_mb"]
                for s in stacks
                if s >= 2
            )
        summary[str(size)] = entry
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--stacks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (>= 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "memory":
        print(json.dumps(worker_memory(args.sizes[0], args.stacks[0], args.mode, args.device)))
        return
    if args.worker == "time":
        print(json.dumps(worker_time(args.sizes[0], args.stacks[0], args.steps, args.device)))
        return

    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    meta = {
        **run_metadata(args.device),
        "malloc_mmap_threshold_for_peak_mmap_mb": MMAP_THRESHOLD,
        "memory_metric": (
            "torch.cuda.max_memory_allocated minus allocated before the step"
            if tag == "cuda"
            else "peak RSS (ru_maxrss) after one step minus peak RSS after imports and setup"
        ),
    }
    rows: list[dict[str, Any]] = []
    common = ["--device", args.device]
    for size in args.sizes:
        for stacks in args.stacks:
            shape = ["--sizes", str(size), "--stacks", str(stacks), *common]
            memory = {m: run_worker([*shape, "--worker", "memory", "--mode", m]) for m in MODES}
            if tag == "cpu":
                fixed = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
                for m in MODES:
                    again = run_worker([*shape, "--worker", "memory", "--mode", m], env=fixed)
                    memory[m]["peak_mmap_mb"] = again["peak_mb"]
                    memory[m]["steady_peak_mmap_mb"] = again["steady_peak_mb"]
            for m in MODES:
                steady = memory[m].get("steady_peak_mmap_mb", memory[m]["steady_peak_mb"])
                if steady is not None:
                    memory[m]["activation_mb"] = steady - memory[m]["grad_mb"]
            timing = run_worker([*shape, "--worker", "time", "--steps", str(args.steps)])
            for mode in MODES:
                step_times = timing["times"][mode]
                row = {
                    "device": meta["device_name"], "size": size, "stacks": stacks, "mode": mode,
                    **memory[mode],
                    "step_s": statistics.median(step_times),
                    "step_s_all": " ".join(f"{t:.3f}" for t in step_times),
                    "time_ratio_vs_store": timing["ratio"] if mode == "recompute" else 1.0,
                    "batch": 2, "levels": 4, "channels": 16, "kernel_size": 7,
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{size:5d} px  S={stacks}  {mode:9s}  activations "
                    f"{row.get('activation_mb') or float('nan'):7.1f} MB  first-step peak "
                    f"{row['peak_mb']:8.1f} MB "
                    f"(mmap {row.get('peak_mmap_mb') or float('nan'):7.1f}, params "
                    f"{row['param_state_mb']:5.1f}, baseline {row['baseline_mb']:.0f})  "
                    f"step {row['step_s']:.3f} s  "
                    f"ratio {row['time_ratio_vs_store']:.3f}",
                    flush=True,
                )
            meta["summary"] = summarize(rows)
            write_results(rows, meta, args.out, tag)
    print(json.dumps(meta["summary"], indent=1))


if __name__ == "__main__":
    main()
