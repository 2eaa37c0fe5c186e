"""Per-phase memory profile of one training step (CPU peak RSS, or CUDA allocated).

One training step (B images, L = 4, S stacks, C = 16, k = 7, memory='recompute') is cut
into phases: pyramid decomposition, flow forward, Fourier loss forward, the loss's
backward (up to the latents' gradients), the backward of every coupling block (in the
order the reverse walk runs them), then gradient clipping and the Adam step. For each
phase it reports the peak memory during the phase and the memory live at its end, both
above the memory before the step.

CPU: a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=131072`` (every large buffer goes
back to the system when freed, so RSS follows what is live; ``--malloc default`` keeps
glibc's own allocator, the metric of ``bench/memory_depth.py``'s ``peak_mb``); the kernel's peak-RSS
counter VmHWM is reset through /proc/self/clear_refs at the start of every phase. CUDA:
``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated`` per phase. The
step's overall peak is the largest phase peak; the phase holding it is named.

Run: ``python bench/memory_phases.py --sizes 1024 2048`` (writes
``results/memory_phases_<device>.json`` and the markdown table ``.md``; ``--merge`` adds to
an existing file, which then lists every invocation its runs came from).
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

MMAP_THRESHOLD = "131072"


class PhaseMeter:
    """Peak and live memory per phase, in MiB above the memory at :meth:`start`."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.rows: list[dict[str, Any]] = []
        self.base = 0.0

    def _reading(self, cuda_counter: str, status_key: str) -> float:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            return getattr(torch.cuda, cuda_counter)(self.device) / 2**20
        return _status_mb(status_key)

    def _now(self) -> float:
        return self._reading("memory_allocated", "VmRSS")

    def _peak(self) -> float:
        return self._reading("max_memory_allocated", "VmHWM")

    def _reset_peak(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def start(self) -> None:
        """Memory before the step: the zero of every figure."""
        self.base = self._now()
        self._reset_peak()

    def mark(self, phase: str) -> None:
        """Close the phase that ran since the last mark (or start) and open the next."""
        peak, live = self._peak() - self.base, self._now() - self.base
        self.rows.append({"phase": phase, "peak_mb": round(peak, 1), "live_mb": round(live, 1)})
        self._reset_peak()


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def worker(
    size: int, batch: int, stacks: int, device: str, budget: int | None, threads: int | None
) -> dict[str, Any]:
    """Profile one training step in this (fresh) process."""
    import pyramidflow_kernels as ops
    import torch
    from memory_depth import build

    if threads is not None:
        torch.set_num_threads(threads)

    model, images, optimizer = build(size, stacks, device, batch=batch)
    model.config.memory = "recompute"
    if budget is not None:
        model.set_memory_budget(budget)
    meter = PhaseMeter(device)
    names = {id(b): f"backward {i} {b.kind}({b.start})" for i, b in enumerate(model.blocks)}
    model.flow.backward_observer = lambda block: meter.mark(names[id(block)])
    meter.start()
    levels = model.pyramid(images)
    meter.mark("pyramid decompose")
    latents = model.flow(levels, memory="recompute")
    del levels
    meter.mark("flow forward")
    loss = ops.fourier_loss(latents, backend=model.config.backend)
    del latents
    meter.mark("loss forward")
    handle = _mark_before_flow_backward(loss, lambda: meter.mark("loss backward"))
    loss.backward()
    handle.remove()
    meter.mark("end of backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.config.grad_clip)
    optimizer.step()
    meter.mark("clip + Adam step")
    peak = max(meter.rows, key=lambda row: row["peak_mb"])
    return {
        "size": size, "batch": batch, "stacks": stacks, "memory_budget": budget,
        "threads": torch.get_num_threads(), "tiling": model.tiling_summary(),
        "phases": meter.rows,
        "step_peak_mb": peak["peak_mb"], "peak_phase": peak["phase"],
        "pyramid_mb": sum(4 * batch * 16 * (size >> i) ** 2 for i in range(4)) / 2**20,
    }  # fmt: skip


def _mark_before_flow_backward(loss, callback):
    """Hook the flow's latents node (the first node of the flow in the backward graph)."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__.startswith("_KeepLatents"):
            return node.register_prehook(lambda grads: callback())
        stack.extend(fn for fn, _ in node.next_functions)
    raise RuntimeError("the flow's latents node is not in the loss's graph")


def run_worker(size: int, args: argparse.Namespace, budget: int | None) -> dict[str, Any]:
    """One profile in a fresh subprocess (large freed buffers leave the process)."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--sizes", str(size),
        "--batch", str(args.batch), "--stacks", str(args.stacks), "--device", args.device,
    ]  # fmt: skip
    if budget is not None:
        command += ["--memory-budget", str(budget)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker at {size} px failed:\n{done.stderr[-3000:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{size} px, B={args.batch}, S={args.stacks}: tiling {run['tiling']}")
    for row in run["phases"]:
        print(f"  {row['phase']:28s} peak {row['peak_mb']:8.1f} MB  live {row['live_mb']:8.1f}")
    print(f"  step peak {run['step_peak_mb']:.0f} MB in '{run['peak_phase']}'", flush=True)
    return run


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """Per size: the step peak tiled (and untiled where measured), where the peak is."""
    lines = [
        "| size | B | S | latent pyramid MB | tiled blocks (bands) | step peak MB, tiled | "
        "peak phase, tiled | step peak MB, untiled | peak phase, untiled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sorted({run["size"] for run in runs}):
        tiled = [r for r in runs if r["size"] == size and r["memory_budget"] != 0]
        untiled = [r for r in runs if r["size"] == size and r["memory_budget"] == 0]
        first = (tiled or untiled)[0]
        cells = [str(size), str(first["batch"]), str(first["stacks"]), f"{first['pyramid_mb']:.0f}"]
        if tiled:
            plan = tiled[0]["tiling"]["tiled_blocks"]
            bands = ", ".join(sorted({f"{k.split(' ', 1)[1]}: {v}" for k, v in plan.items()}))
            cells += [bands or "none", f"{tiled[0]['step_peak_mb']:.0f}", tiled[0]["peak_phase"]]
        else:
            cells += ["-", "-", "-"]
        if untiled:
            cells += [f"{untiled[0]['step_peak_mb']:.0f}", untiled[0]["peak_phase"]]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--stacks", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument(
        "--memory-budget", type=int, default=None,
        help="Config.memory_budget in MiB (default: automatic; 0 turns tiling off)",
    )  # fmt: skip
    parser.add_argument(
        "--untiled-up-to", type=int, default=0, metavar="PX",
        help="also profile untiled (memory_budget 0) at the sizes up to PX (default: none)",
    )  # fmt: skip
    parser.add_argument(
        "--malloc", choices=("mmap", "default"), default="mmap",
        help="mmap: MALLOC_MMAP_THRESHOLD_=131072, RSS follows what is live (default); "
        "default: glibc's own allocator, as bench/memory_depth.py's peak_mb",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads per worker (default: torch's; 1 is far faster on a machine "
        "shared with other jobs, and memory does not depend on it)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--merge", action="store_true",
        help="add these runs to the existing results file (replacing the same size and "
        "setting) instead of overwriting it; the file lists the invocations it holds",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(
            args.sizes[0], args.batch, args.stacks, args.device, args.memory_budget, args.threads
        )
        print(json.dumps(result))
        return
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    invocation = " ".join(["python", "bench/memory_phases.py", *(argv or sys.argv[1:])])
    runs = []
    for size in args.sizes:
        runs.append({**run_worker(size, args, args.memory_budget), "invocation": invocation})
        if size <= args.untiled_up_to and args.memory_budget != 0:
            runs.append({**run_worker(size, args, 0), "invocation": invocation})
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"memory_phases_{tag}"
    meta = {**run_metadata(args.device), "malloc": args.malloc}
    if args.merge and (args.out / f"{name}.json").exists():
        # keep the earlier runs of other settings; each run names the command that made it
        fresh = {(run["size"], run["memory_budget"] == 0) for run in runs}
        earlier = json.loads((args.out / f"{name}.json").read_text())["runs"]
        runs = [r for r in earlier if (r["size"], r["memory_budget"] == 0) not in fresh] + runs
        runs.sort(key=lambda run: (run["size"], run["memory_budget"] == 0))
    invocations = sorted({run.get("invocation", "unrecorded") for run in runs})
    report = {**meta, "invocations": invocations, "runs": runs}
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    table = markdown_table(runs)
    (args.out / f"{name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
