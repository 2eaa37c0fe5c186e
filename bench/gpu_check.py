"""One prepared GPU check: correctness on CUDA first, then bandwidth, op benchmarks, training.

Sections, in priority order, each guarded (an error is recorded, the run goes on) and
each skipped, with a note, once the time budget (``--budget-s``, default 420 s: the
whole check must fit in 8 minutes on one H200) is spent:

1. the device: name (``torch.cuda.get_device_name``), capability, versions;
2. the op tests on the device, first (a run cut short still says whether the kernels
   compute the right thing): the test suite's ``tests/test_triton_*.py`` (every Triton
   op forward and backward against the float64 torch reference, a whole training step)
   run by pytest with ``--device cuda`` (compiled kernels); one row per test case. The
   CPU dry run runs the pyramid tests only, in the interpreter. They may use up to 60 %
   of the budget left, so that the benchmarks keep some time;
3. copy bandwidth: ``clone`` of a 1 GiB float32 tensor, CUDA events, median;
   bytes moved = 2 x 1 GiB (read + write);
4. op benchmarks at 1024 x 1024, C = 16, B = 2, L = 4, float32, torch vs Triton
   backend, forward and backward (median of CUDA-event timings): bytes from
   ``bench/byte_model.py``, GB/s, % of the copy bandwidth and % of the byte floor; the
   Triton results are compared with the torch ones on the same inputs (relative RMS);
5. training steps (``pyramidflow.PyramidFlow``, Adam, ``loss = model.loss(model(x))``,
   backward, step, B = 2) at 256, 1024 and 2048 px, backend torch vs Triton, memory
   ``recompute`` vs ``store``: median step time and ``torch.cuda.max_memory_allocated``;
   an out-of-memory is caught and recorded (``status: "oom"``);
6. peak memory against resolution: one training step (B = 2, S = 4, backend auto,
   recompute) at 1024, 2048 and 4096 px with the row-band tiling on (automatic budget,
   ``pyramidflow.model.tiling``) and, at 1024 and 2048 px, off (``memory_budget = 0``):
   ``torch.cuda.max_memory_allocated`` above the memory before the step, the budget and
   the tiled blocks (an out-of-memory is recorded as ``status: "oom"``).

The JSON is rewritten after every section, so a run killed by a timeout keeps what it
measured.

``--device cpu --tiny`` runs every code path with tiny shapes under Triton's interpreter
(``TRITON_INTERPRET=1`` is set before Triton is imported) in well under a minute: that is
how ``tests/test_gpu_check_dry.py`` checks this script on machines without a GPU.

Writes JSON to ``$OUT/gpu_check.json`` when ``$OUT`` is set, else to
``bench/results/gpu_check.json`` (``gpu_check_cpu.json`` for the CPU mode; ``--out``
overrides both), and prints a short table last.

Run on a GPU: ``bash bench/gpu_check.sh`` (or ``python bench/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from byte_model import H200_COPY_BANDWIDTH, Shape, floor_seconds, op_bytes  # noqa: E402
from checkout import ensure_kernels_importable  # noqa: E402

REPORT_KEYS = ("device", "ops", "copy", "training", "correctness", "errors", "skipped")


class Budget:
    """Wall-clock budget shared by all sections."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Settings:
    """Shapes and repetitions for the full (CUDA) run or the tiny (CPU) run."""

    def __init__(self, device: str, tiny: bool) -> None:
        self.device = device
        self.tiny = tiny
        if tiny:
            self.copy_bytes = 8 * 2**20
            self.op_shape = Shape(batch=2, channels=4, height=32, width=32, levels=3)
            self.reps, self.warmup = 1, 0
            self.train_sizes = [16]
            self.train_stacks = 1
            self.train_steps = 1
            # (size, memory budget MiB): tiny tiled and untiled runs, torch backend
            self.resolution_runs = [(64, 1), (64, 0)]
        else:
            self.copy_bytes = 2**30
            self.op_shape = Shape()  # 1024 x 1024, C = 16, B = 2, L = 4
            self.reps, self.warmup = 10, 2
            self.train_sizes = [256, 1024, 2048]
            self.train_stacks = 4
            self.train_steps = 3
            self.resolution_runs = [(1024, None), (1024, 0), (2048, None), (2048, 0),
                                    (4096, None)]  # fmt: skip


# --------------------------------------------------------------------------- helpers


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any], device: str, reps: int, warmup: int
) -> tuple[list[float], Any]:
    """(seconds per call, the last call's result): CUDA events on a GPU, ``perf_counter``
    on the CPU; ``warmup`` untimed calls first (they compile the Triton kernels)."""
    import torch

    for _ in range(warmup):
        fn()
    synchronize(device)
    times, result = [], None
    for _ in range(max(reps, 1)):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - begin)
    return times, result


def _flat(outputs) -> list:
    import torch

    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for t in outputs if isinstance(t, torch.Tensor)]


def guarded(report: dict[str, Any], section: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - one failing section must not end the check
        report["errors"].append(
            {"section": section, "error": f"{type(error).__name__}: {error}",
             "traceback": traceback.format_exc()[-4000:]}
        )  # fmt: skip
        print(f"[{section}] ERROR {type(error).__name__}: {error}", flush=True)


# --------------------------------------------------------------------------- sections


def device_info(settings: Settings) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": settings.device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tiny": settings.tiny,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    # the torch reference's convolutions may use TF32 on a GPU: it bounds the agreement
    info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    if settings.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(settings.device))
        info.update(
            name=torch.cuda.get_device_name(torch.device(settings.device)),
            capability=f"sm_{props.major}{props.minor}",
            memory_gb=props.total_memory / 1e9,
            sms=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    else:
        info["name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def copy_bandwidth(settings: Settings) -> dict[str, Any]:
    """Device-to-device copy: ``clone`` of a ``copy_bytes`` float32 tensor."""
    import torch

    source = torch.empty(settings.copy_bytes // 4, device=settings.device).fill_(1.0)
    times, _ = time_call(source.clone, settings.device, max(settings.reps, 5), settings.warmup)
    median = statistics.median(times)
    moved = 2 * settings.copy_bytes
    del source
    return {
        "tensor_bytes": settings.copy_bytes,
        "bytes_moved": moved,
        "median_s": median,
        "times_s": times,
        "bytes_per_s": moved / median,
        "gbytes_per_s": moved / median / 1e9,
        "reference_h200_bytes_per_s": H200_COPY_BANDWIDTH,
    }


def _op_inputs(op: str, shape: Shape, device: str, requires_grad: bool, seed: int = 0):
    """Arguments (and keyword options) of ``op`` on random data."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    b, c, height, width = shape.batch, shape.channels, shape.height, shape.width

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(size, device=device, generator=gen)

    def level(i: int, batch: int = b) -> torch.Tensor:
        return randn(batch, c, height >> i, width >> i).requires_grad_(requires_grad)

    if op == "pyramid_decompose":
        return (level(0), shape.levels), {}
    if op.startswith("affine_coupling"):
        # "affine_coupling[_inverse]:<CVN|SVN>:<k>:<train|eval>"
        _, volume_norm, stride, mode = op.split(":")
        k = int(stride)
        x = randn(b, c, height, width)
        h = randn(b, 2 * c, k * height, k * width, scale=1.5)
        q, _ = torch.linalg.qr(randn(c, c))
        weight = q + 0.2 * randn(c, c)
        mean_shape = (1, 1, k * height, k * width) if volume_norm == "CVN" else (1, c, 1, 1)
        running = randn(*mean_shape, scale=0.3)
        leaves = [t.requires_grad_(requires_grad) for t in (x, h, weight)]
        return (*leaves, running), {"volume_norm": volume_norm, "training": mode == "train"}
    pyramid = [level(i) for i in range(shape.levels)]
    if op == "anomaly_map":
        template = [randn(c, height >> i, width >> i) for i in range(shape.levels)]
        return (pyramid, template), {}
    return (pyramid,), {}


def _op_function(op: str) -> Callable:
    import pyramidflow_kernels as ops

    base = op.split(":")[0]
    return getattr(ops, base)


def _grad_leaves(op: str, args) -> list:
    if op == "pyramid_decompose":
        return [args[0]]
    if op.startswith("affine_coupling"):
        return list(args[:3])
    return list(args[0])


def _bench_ops(shape: Shape) -> list[tuple[str, str, str, bool]]:
    """(label, op key, byte-model op, training) of the op benchmarks."""
    return [
        ("pyramid_decompose", "pyramid_decompose", "pyramid_decompose", True),
        ("pyramid_compose", "pyramid_compose", "pyramid_compose", True),
        ("fourier_loss", "fourier_loss", "fourier_loss", True),
        ("anomaly_map", "anomaly_map", "anomaly_map", True),
        ("affine_coupling train", "affine_coupling:CVN:1:train", "affine_coupling", True),
        ("affine_coupling eval", "affine_coupling:CVN:1:eval", "affine_coupling", False),
    ]


def op_benchmarks(settings: Settings, report: dict[str, Any], budget: Budget) -> None:
    """Forward and backward of every op, torch vs Triton, with GB/s and agreement."""
    import torch
    from pyramidflow_kernels.testing import relative_error

    shape, device = settings.op_shape, settings.device
    copy_bw = report["copy"].get("bytes_per_s") if report.get("copy") else None
    for label, key, model_op, training in _bench_ops(shape):
        for direction in ("forward", "backward"):
            if key == "anomaly_map" and direction == "backward":
                continue  # inference only
            if budget.left() <= 0:
                report["skipped"].append(f"op {label} {direction}: time budget spent")
                continue
            outputs_by_backend: dict[str, list] = {}
            for backend in ("torch", "triton"):
                row = {"op": label, "direction": direction, "backend": backend,
                       "shape": shape.label()}  # fmt: skip
                try:
                    times, outputs = _time_op(key, shape, device, backend, direction, settings)
                except Exception as error:  # noqa: BLE001
                    row["error"] = f"{type(error).__name__}: {error}"
                    report["ops"].append(row)
                    print(f"[ops] {label} {direction} {backend}: ERROR {row['error']}", flush=True)
                    continue
                outputs_by_backend[backend] = outputs
                median = statistics.median(times)
                moved = op_bytes(model_op, shape, direction, training=training)
                row.update(
                    median_s=median, times_s=times, bytes=moved, gbytes_per_s=moved / median / 1e9,
                    floor_s=floor_seconds(moved, copy_bw or H200_COPY_BANDWIDTH),
                    pct_of_copy=(100.0 * moved / median / copy_bw) if copy_bw else None,
                )  # fmt: skip
                row["pct_of_floor"] = 100.0 * row["floor_s"] / median
                report["ops"].append(row)
            if len(outputs_by_backend) == 2:
                errors = [
                    relative_error(a, b)
                    for a, b in zip(
                        outputs_by_backend["triton"], outputs_by_backend["torch"], strict=True
                    )
                ]
                report["ops"][-1]["rel_rms_vs_torch"] = max(errors) if errors else None
            del outputs_by_backend
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def _time_op(key: str, shape: Shape, device: str, backend: str, direction: str, settings):
    """(times, outputs) of one op call (forward) or one gradient evaluation (backward)."""
    import torch

    fn = _op_function(key)
    args, kwargs = _op_inputs(key, shape, device, requires_grad=direction == "backward")
    if direction == "forward":

        def run():
            with torch.no_grad():
                return fn(*args, **kwargs, backend=backend)

        times, result = time_call(run, device, settings.reps, settings.warmup)
        return times, _flat(result)
    outputs = _flat(fn(*args, **kwargs, backend=backend))
    outputs = [o for o in outputs if o.requires_grad]
    gen = torch.Generator(device=device).manual_seed(1)
    grads = [
        torch.ones_like(o) if o.dim() == 0 else torch.randn(o.shape, device=device, generator=gen)
        for o in outputs
    ]
    leaves = _grad_leaves(key, args)

    def run_backward():
        return torch.autograd.grad(outputs, leaves, grads, retain_graph=True)

    times, result = time_call(run_backward, device, settings.reps, settings.warmup)
    return times, list(result)


def _measured_row(row: dict[str, Any], measure: Callable[..., dict[str, Any]], *args) -> None:
    """Fill ``row`` from ``measure(*args)`` with status ok, or record an out-of-memory or
    another error."""
    import torch

    try:
        row.update(measure(*args))
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError as error:
        row["status"] = "oom"
        row["error"] = str(error).splitlines()[0][:300]
    except Exception as error:  # noqa: BLE001
        row["status"] = "error"
        row["error"] = f"{type(error).__name__}: {error}"


def training_steps(settings: Settings, report: dict[str, Any], budget: Budget) -> None:
    """Median step time and peak memory per (size, backend, memory mode)."""
    import torch

    device = settings.device
    for size in settings.train_sizes:
        for backend in ("torch", "triton"):
            for memory in ("recompute", "store"):
                row: dict[str, Any] = {"size": size, "backend": backend, "memory": memory,
                                       "batch": 2, "stacks": settings.train_stacks}  # fmt: skip
                if budget.left() <= 0:
                    row["status"] = "skipped: time budget spent"
                    report["training"].append(row)
                    report["skipped"].append(f"training {size} {backend} {memory}")
                    continue
                _measured_row(row, _train, size, backend, memory, settings)
                report["training"].append(row)
                print(f"[train] {size} px {backend:6s} {memory:9s} {row['status']} "
                      f"{row.get('median_step_s', float('nan')):.4f} s "
                      f"{row.get('max_memory_mb', float('nan')):.0f} MB", flush=True)  # fmt: skip
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()


def _train(size: int, backend: str, memory: str, settings: Settings) -> dict[str, Any]:
    import torch

    from pyramidflow import Config, PyramidFlow

    device = settings.device
    torch.manual_seed(0)
    config = Config(image_size=(size, size), stacks=settings.train_stacks, batch_size=2,
                    backend=backend, memory=memory)  # fmt: skip
    model = PyramidFlow(config)
    for block in model.blocks:  # non-zero last convolutions, as after some training
        torch.nn.init.normal_(block.param_net[2].weight, std=1e-3)
    model = model.to(device).train()
    images = torch.randn(2, config.in_channels, size, size, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps)
    baseline = 0
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(model(images))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    losses = [step()]  # warm-up (compiles the Triton kernels)
    times = []
    for _ in range(settings.train_steps):
        synchronize(device)
        begin = time.perf_counter()
        losses.append(step())
        synchronize(device)
        times.append(time.perf_counter() - begin)
    result: dict[str, Any] = {
        "median_step_s": statistics.median(times), "step_s": times,
        "losses": losses, "finite": all(map(lambda v: v == v and abs(v) < 1e30, losses)),
    }  # fmt: skip
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        result["max_memory_mb"] = peak / 2**20
        result["max_memory_above_baseline_mb"] = (peak - baseline) / 2**20
    return result


def resolution_memory(settings: Settings, report: dict[str, Any], budget: Budget) -> None:
    """Peak memory of one training step per (size, band budget): tiled against untiled."""
    import torch

    for size, memory_budget in settings.resolution_runs:
        row: dict[str, Any] = {"size": size, "memory_budget": memory_budget, "batch": 2,
                               "stacks": settings.train_stacks}  # fmt: skip
        if budget.left() <= 0:
            row["status"] = "skipped: time budget spent"
            report["skipped"].append(f"resolution {size} budget {memory_budget}")
        else:
            _measured_row(row, _resolution_step, size, memory_budget, settings)
        report["resolution"].append(row)
        print(f"[memory] {size} px budget {row.get('budget_mb', memory_budget)} MiB "
              f"{row['status']} {row.get('max_memory_above_baseline_mb', float('nan')):.0f} MB",
              flush=True)  # fmt: skip
        if settings.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _resolution_step(size: int, memory_budget: int | None, settings: Settings) -> dict[str, Any]:
    import torch

    from pyramidflow import Config, PyramidFlow

    device = settings.device
    torch.manual_seed(0)
    backend = "torch" if settings.tiny else "auto"  # tiny: the band code path, quickly
    config = Config(image_size=(size, size), stacks=settings.train_stacks, batch_size=2,
                    backend=backend, memory_budget=memory_budget)  # fmt: skip
    model = PyramidFlow(config)
    for block in model.blocks:
        torch.nn.init.normal_(block.param_net[2].weight, std=1e-3)
    model = model.to(device).train()
    images = torch.randn(2, config.in_channels, size, size, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps)
    plan = model.tiling_summary()
    baseline = 0
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    begin = time.perf_counter()
    loss = model.loss(model(images))
    loss.backward()
    optimizer.step()
    synchronize(device)
    result: dict[str, Any] = {
        "budget_mb": plan["budget_mb"], "tiled_blocks": plan["tiled_blocks"],
        "step_s": time.perf_counter() - begin, "loss": float(loss.detach()),
    }  # fmt: skip
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        result["max_memory_above_baseline_mb"] = (peak - baseline) / 2**20
        result["max_memory_mb"] = peak / 2**20
    return result


#: The test suite's Triton op tests: on a GPU they run compiled, on the device (``--device``
#: in tests/conftest.py), instead of a second copy of them here.
OP_TEST_FILES = (
    "tests/test_triton_pyramid.py",
    "tests/test_triton_coupling.py",
    "tests/test_triton_loss_map.py",
    "tests/test_triton_model.py",
)
#: The dry run on the CPU (interpreter) runs only the pyramid tests, to stay short.
TINY_OP_TEST_FILES = ("tests/test_triton_pyramid.py",)


def op_tests(settings: Settings, report: dict[str, Any], budget: Budget) -> None:
    """Run the Triton op tests on this device with pytest; one row per test case."""
    import tempfile
    import xml.etree.ElementTree as ElementTree

    files = TINY_OP_TEST_FILES if settings.tiny else OP_TEST_FILES
    on_cuda = settings.device.startswith("cuda")
    env = {**os.environ, "TRITON_INTERPRET": "0" if on_cuda else "1"}
    with tempfile.TemporaryDirectory() as folder:
        # the checkout importable as it is, installed or not (the GPU machine has no
        # network): pyramidflow from the root, pyramidflow_kernels through a link to kernels/
        (Path(folder) / "pyramidflow_kernels").symlink_to(ROOT / "kernels")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (folder, str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        junit = Path(folder) / "op_tests.xml"
        command = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
            "--device", "cuda" if on_cuda else "cpu", f"--junitxml={junit}", *files,
        ]  # fmt: skip
        timeout = max(0.6 * budget.left(), 60.0)  # the benchmarks after it keep some time
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            report["skipped"].append(f"op tests: stopped after {timeout:.0f} s")
            return
        if not junit.is_file():
            raise RuntimeError(f"pytest wrote no report: {done.stdout[-800:]} {done.stderr[-800:]}")
        cases = ElementTree.parse(junit).getroot().iter("testcase")
        for case in cases:
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            skipped = case.find("skipped")
            row: dict[str, Any] = {
                "op": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                "seconds": float(case.get("time", 0.0)),
                "ok": problem is None and skipped is None,
            }  # fmt: skip
            if problem is not None:
                row["error"] = (problem.get("message") or "")[:500]
            elif skipped is not None:
                row["error"] = "skipped: " + (skipped.get("message") or "")[:200]
            report["correctness"].append(row)
            if not row["ok"]:
                print(f"[check] {row['op']}: FAIL {row['error']}", flush=True)


# --------------------------------------------------------------------------- output


def summary_table(report: dict[str, Any]) -> str:
    """The short table printed last."""
    lines = [f"device: {report['device'].get('name')} ({report['device'].get('device')})"]
    copy = report.get("copy") or {}
    if copy.get("gbytes_per_s"):
        lines.append(f"copy bandwidth: {copy['gbytes_per_s']:.0f} GB/s")
    lines.append(
        f"{'op':24s} {'dir':8s} {'torch ms':>9s} {'triton ms':>9s} {'speedup':>7s} "
        f"{'GB/s':>7s} {'%copy':>6s} {'rel err':>8s}"
    )
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in report["ops"]:
        rows.setdefault((row["op"], row["direction"]), {})[row["backend"]] = row
    for (op, direction), by_backend in rows.items():
        torch_row, triton_row = by_backend.get("torch", {}), by_backend.get("triton", {})
        t_ms = torch_row.get("median_s", float("nan")) * 1e3
        tr_ms = triton_row.get("median_s", float("nan")) * 1e3
        pct = triton_row.get("pct_of_copy")
        err = triton_row.get("rel_rms_vs_torch")
        lines.append(
            f"{op:24s} {direction:8s} {t_ms:9.3f} {tr_ms:9.3f} {t_ms / tr_ms:7.2f} "
            f"{triton_row.get('gbytes_per_s', float('nan')):7.0f} "
            f"{pct if pct is not None else float('nan'):6.1f} "
            f"{err if err is not None else float('nan'):8.1e}"
        )
    lines.append(f"{'train px':>8s} {'backend':7s} {'memory':9s} {'step s':>8s} {'peak MB':>9s}")
    for row in report["training"]:
        lines.append(
            f"{row['size']:8d} {row['backend']:7s} {row['memory']:9s} "
            f"{row.get('median_step_s', float('nan')):8.4f} "
            f"{row.get('max_memory_mb', float('nan')):9.0f}  {row['status']}"
        )
    lines.append(f"{'mem px':>8s} {'budget MiB':>10s} {'tiled':>5s} {'peak MB':>9s}")
    for row in report.get("resolution", []):
        lines.append(
            f"{row['size']:8d} {row.get('budget_mb', row['memory_budget'])!s:>10s} "
            f"{len(row.get('tiled_blocks', {})):5d} "
            f"{row.get('max_memory_above_baseline_mb', float('nan')):9.0f}  {row['status']}"
        )
    checks = report["correctness"]
    passed = sum(bool(c.get("ok")) for c in checks)
    lines.append(f"op checks on the device: {passed}/{len(checks)} passed; "
                 f"errors: {len(report['errors'])}; skipped: {len(report['skipped'])}; "
                 f"{report['elapsed_s']:.0f} s")  # fmt: skip
    return "\n".join(lines)


def default_out(device: str) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    name = "gpu_check.json" if device.startswith("cuda") else "gpu_check_cpu.json"
    return HERE / "results" / name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget")
    parser.add_argument("--out", type=Path, help="JSON path (default: $OUT or bench/results)")
    parser.add_argument(
        "--sections", default="correctness,copy,ops,training,resolution",
        help="comma-separated subset of correctness,copy,ops,training,resolution (run in "
        "this order whatever the order given)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device = args.device
    if device is None or device.startswith("cuda"):
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, before Triton is imported
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # the interpreter, before Triton is imported
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            os.environ["TRITON_INTERPRET"] = "1"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --tiny for the dry run", file=sys.stderr)
        return 2
    tiny = args.tiny or device == "cpu"
    ensure_kernels_importable()
    settings = Settings(device, tiny)
    budget = Budget(args.budget_s)
    sections = set(args.sections.split(","))
    report: dict[str, Any] = {"device": {}, "copy": {}, "ops": [], "training": [],
                              "resolution": [], "correctness": [], "errors": [],
                              "skipped": []}  # fmt: skip
    report["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["command"] = " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    report["budget_s"] = args.budget_s
    out = args.out or default_out(device)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a run killed by a timeout keeps its numbers
        report["elapsed_s"] = budget.elapsed()
        out.write_text(json.dumps(report, indent=1, default=str))

    guarded(report, "device", lambda: report.update(device=device_info(settings)))
    print(f"device: {report['device'].get('name')}", flush=True)
    save()
    if "correctness" in sections:  # first: a run cut short still says whether ops are right
        guarded(report, "correctness", lambda: op_tests(settings, report, budget))
        save()
    if "copy" in sections:
        guarded(report, "copy", lambda: report.update(copy=copy_bandwidth(settings)))
        save()
    if "ops" in sections:
        guarded(report, "ops", lambda: op_benchmarks(settings, report, budget))
        save()
    if "training" in sections:
        guarded(report, "training", lambda: training_steps(settings, report, budget))
        save()
    if "resolution" in sections:
        guarded(report, "resolution", lambda: resolution_memory(settings, report, budget))
        save()
    save()
    print(summary_table(report))
    print(f"JSON: {out}")
    failed_checks = [c for c in report["correctness"] if not c.get("ok")]
    return 1 if report["errors"] or failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
