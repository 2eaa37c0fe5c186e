"""Compile every Triton kernel ahead of time for real GPUs, on a machine without one.

For each ``@triton.jit`` entry kernel of ``pyramidflow_kernels`` (``*_kernel`` in
``pyramid_triton``, ``coupling_triton``, ``loss_map_triton``), with exactly the
constexprs, block sizes and argument specializations (16-byte divisibility of
pointers and integers, integers equal to 1) that the launchers use on a GPU:

1. the launchers are called on ``meta`` tensors (no memory, no data) with
   ``launch`` replaced by a recorder, for the benchmark shape (1024 x 1024, C = 16,
   B = 2, L = 4) and a small odd shape (24 x 40, C = 3, B = 1; B = 2 for the Siamese
   loss), covering every mode: decompose, compose and its adjoint, coupling forward,
   inverse and both backwards (CVN / SVN, k = 1 / 2, training / eval), Fourier loss
   forward and backward, anomaly map;
2. each recorded launch is specialized as Triton's JIT would (its own binder and
   ``_pack_args``) and compiled with ``triton.compile(ASTSource(fn, signature,
   constexprs, attrs), target=GPUTarget("cuda", capability, 32))`` for sm_80 and sm_90
   (PTX by LLVM, cubin by the ptxas shipped in Triton's wheel);
3. the cubin is inspected: registers, shared memory, stack frame, local memory and
   spill stores / loads (ptxas ``-v`` log and ``cuobjdump -res-usage``), and the PTX
   for vectorized global loads and stores (``ld.global.v4`` / ``.v2``, ``st.global...``).

Under ``TRITON_INTERPRET=1``, ``triton.jit`` returns interpreted functions that cannot
be compiled, so the compiles always run in child processes whose environment has
``TRITON_INTERPRET`` removed (this script is safe to call from an interpreted test run).
Children get a fresh, private Triton cache, so ptxas runs (and logs) every time.

Writes ``bench/results/gpu_build_check.json`` (``--out``) and, with ``--markdown PATH``,
the per-kernel table for the README. Exit status 1 on a compile error, a spill or a
kernel no scenario launched; 3 when the toolchain (Triton's NVIDIA backend, ptxas) is
unavailable.

Run: ``python bench/gpu_build_check.py --markdown bench/KERNELS_table.md``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from byte_model import (  # noqa: E402
    BENCH_SHAPE,
    FLOAT32_BYTES,
    H200_COPY_BANDWIDTH,
    KERNELS,
    Shape,
    floor_seconds,
    kernel_bytes,
)
from checkout import ensure_kernels_importable  # noqa: E402

CAPABILITIES = (80, 90)
KERNEL_MODULES = ("pyramid_triton", "coupling_triton", "loss_map_triton")
SMALL = Shape(batch=1, channels=3, height=24, width=40, levels=4)
SHAPES = {"bench": BENCH_SHAPE, "small": SMALL}
FLOAT64_BYTES = 8
#: The supported range (docs: C 1..64 channels, batches 2..64, float32 and float64):
#: channel counts that give every padded power of two CP (and the 16-divisible
#: specializations at 16, 32, 64), batches that give every pair block, at both dtypes.
RANGE_CHANNELS = (1, 2, 3, 5, 9, 16, 17, 32, 33, 64)
RANGE_BATCHES = (2, 3, 5, 9, 16, 17, 33, 64)
RANGE_LIMITS = {"channels": (1, 64), "batch": (2, 64), "element_bytes": (4, 8)}


def range_shapes() -> dict[str, Shape]:
    """Shapes that cover the supported range: (B = 2, every C) and (every B, C = 3), at
    256 x 256 (finest-level tiles as at the benchmark shape), float32 and float64; the
    name says B, C and the dtype (``B64 C3 f64``)."""
    shapes = {}
    for element_bytes, tag in ((FLOAT32_BYTES, "f32"), (FLOAT64_BYTES, "f64")):
        pairs = [(2, c) for c in RANGE_CHANNELS] + [(b, 3) for b in RANGE_BATCHES]
        pairs.append((64, 64))
        for b, c in dict.fromkeys(pairs):
            shape = Shape(batch=b, channels=c, height=256, width=256, levels=4,
                          element_bytes=element_bytes)  # fmt: skip
            shapes[f"B{b} C{c} {tag}"] = shape
    return shapes


SHAPE_SETS = {"default": lambda: dict(SHAPES), "range": lambda: {**SHAPES, **range_shapes()}}


def shape_dtype(shape: Shape):
    """The torch dtype of a shape's elements (4 bytes: float32, 8: float64)."""
    import torch

    dtypes = {FLOAT32_BYTES: torch.float32, FLOAT64_BYTES: torch.float64}
    if shape.element_bytes not in dtypes:
        raise ValueError(f"no float dtype of {shape.element_bytes} bytes")
    return dtypes[shape.element_bytes]


EXIT_TOOLCHAIN = 3
DEFAULT_OUT = HERE / "results" / "gpu_build_check.json"

# --------------------------------------------------------------------------- environment


def child_env(cache_dir: str | None = None) -> dict[str, str]:
    """This process's environment without ``TRITON_INTERPRET`` (real ``triton.jit``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the 3.9 default, without its warning
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = cache_dir
    pythonpath = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return env


def toolchain() -> dict[str, Any]:
    """Triton's NVIDIA backend and its tools: ``{"ok": bool, "reason": str, ...}``.

    Importing Triton here is harmless under the interpreter (no kernel is compiled)."""
    try:
        import triton
        from triton import knobs
    except Exception as error:  # noqa: BLE001 - any import failure means no toolchain
        return {"ok": False, "reason": f"triton does not import: {error}"}
    try:
        from triton.backends.nvidia import compiler as _nvidia  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return {"ok": False, "reason": f"Triton's NVIDIA backend does not import: {error}"}
    info: dict[str, Any] = {"ok": True, "reason": "", "triton": triton.__version__}
    for name in ("ptxas", "ptxas_blackwell", "cuobjdump"):
        try:
            tool = getattr(knobs.nvidia, name)
            info[name] = {"path": tool.path, "version": tool.version.strip().splitlines()[-1]}
        except Exception as error:  # noqa: BLE001 - missing binary or unusable
            if name == "cuobjdump":
                info[name] = None  # optional: the ptxas log has the same numbers
                continue
            return {"ok": False, "reason": f"{name} is unavailable: {error}"}
    return info


# --------------------------------------------------------------------------- recording


def _import_kernels():
    """The kernel modules (from the installed package, else straight from ``kernels/``)."""
    import importlib

    ensure_kernels_importable()
    return {name: importlib.import_module(f"pyramidflow_kernels.{name}") for name in KERNEL_MODULES}


def defined_kernels(modules: dict[str, Any]) -> dict[str, Any]:
    """Every ``@triton.jit`` entry point: module-level JIT functions named ``*_kernel``."""
    from triton.runtime.jit import JITFunction

    found = {}
    for module in modules.values():
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                found[name] = value
    return found


def _scenarios(
    modules: dict[str, Any], shape: Shape, all_modes: bool = False
) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(label, call) for every launcher mode at ``shape``, on meta tensors."""
    import torch

    pt, ct, lt = (modules[name] for name in KERNEL_MODULES)
    meta = {"device": "meta", "dtype": shape_dtype(shape)}
    b, c, height, width, levels = (
        shape.batch, shape.channels, shape.height, shape.width, shape.levels,
    )  # fmt: skip

    def level(i: int, batch: int = b) -> torch.Tensor:
        return torch.empty(batch, c, height >> i, width >> i, **meta)

    pyramid = [level(i) for i in range(levels)]
    yield "pyramid_decompose", lambda: pt.pyramid_decompose(level(0), levels)
    yield "pyramid_decompose backward", lambda: pt.window_launch(level(0), pt.MODE_ROUTE, level(1))
    yield "pyramid_compose", lambda: pt.pyramid_compose(pyramid)
    yield "pyramid_compose backward", lambda: pt.window_launch(level(0), pt.MODE_UP_ADJOINT)
    yield "pyramid up_adjoint backward", lambda: pt.up_launch(level(1), None)
    template = [level(i, 1)[0] for i in range(levels)]
    yield "anomaly_map", lambda: lt._anomaly_fn(pyramid, template)
    pair_batch = max(b, 2)  # the Siamese loss needs two images
    pairs = [level(i, pair_batch) for i in range(levels)]
    count = pair_batch * (pair_batch - 1) // 2

    def loss_forward() -> None:
        maps = pt.pyramid_compose([lt.pair_sq_diff_launch(z) for z in pairs])
        lt.spectrum_abs_mean_launch(maps[:, 0])

    def loss_backward() -> None:
        maps = torch.empty(count, height, width, **meta)
        grad_maps = lt.spectrum_abs_mean_grad_launch(torch.ones((), **meta), maps)
        grads = [grad_maps[:, None]]
        for _ in range(1, levels):
            grads.append(pt.window_launch(grads[-1], pt.MODE_UP_ADJOINT))
        for z, grad in zip(pairs, grads, strict=True):
            lt.pair_sq_diff_grad_launch(grad, z)

    yield "fourier_loss", loss_forward
    yield "fourier_loss backward", loss_backward
    for stride, volume_norm, training, backward in coupling_modes(all_modes):
        yield from _coupling_scenarios(ct, shape, stride, volume_norm, training, backward)


def coupling_modes(all_modes: bool = False) -> list[tuple[int, str, bool, bool]]:
    """(k, volume_norm, training, with backward) of the coupling launches to compile.

    Default: the modes a model launches, CVN at k = 1 (a strided Down block's parameters
    are computed at the target resolution) and SVN at k = 1 and 2, each in training
    (forward, inverse, both backwards) and in eval (forward, inverse), plus the eval
    backward (``FINAL``) once, CVN at k = 1. ``all_modes``: the full cross product
    (adds CVN at k = 2, used with ``strided_down=False``, and every eval backward)."""
    if all_modes:
        return [(k, vn, train, True) for k in (1, 2) for vn in ("CVN", "SVN")
                for train in (True, False)]  # fmt: skip
    modes = [(1, "CVN"), (1, "SVN"), (2, "SVN")]
    chosen = [(k, vn, True, True) for k, vn in modes]
    chosen += [(k, vn, False, (k, vn) == (1, "CVN")) for k, vn in modes]
    return chosen


def _coupling_scenarios(
    ct, shape: Shape, stride: int, volume_norm: str, training: bool, backward: bool
) -> Iterator[tuple[str, Callable[[], Any]]]:
    import torch

    meta = {"device": "meta", "dtype": shape_dtype(shape)}
    b, c, height, width = shape.batch, shape.channels, shape.height, shape.width
    x = torch.empty(b, c, height, width, **meta)
    h = torch.empty(b, 2 * c, stride * height, stride * width, **meta)
    weight = torch.empty(c, c, **meta)
    mean_shape = (1, 1, stride * height, stride * width) if volume_norm == "CVN" else (1, c, 1, 1)
    mean = torch.empty(mean_shape, **meta)
    options = (volume_norm, training, 2.0)
    tag = f"k={stride} {volume_norm} {'train' if training else 'eval'}"
    grad_mean = mean if training else None
    yield f"affine_coupling {tag}", lambda: ct._coupling_fn(x, h, weight, mean, *options)
    yield f"affine_coupling_inverse {tag}", lambda: ct._inverse_fn(x, h, weight, mean, *options)
    if not backward:
        return
    yield (
        f"affine_coupling backward {tag}",
        lambda: ct._backward_impl(x, grad_mean, x, h, weight, mean, *options),
    )
    yield (
        f"affine_coupling_inverse backward {tag}",
        lambda: ct._inverse_backward_impl(x, x, h, weight, mean, *options),
    )
    yield (
        f"affine_coupling_recompute {tag}",
        lambda: ct._recompute_impl(x, x, h, weight, mean, *options),
    )


def record_launches(
    modules: dict[str, Any], all_modes: bool = False, shapes: dict[str, Shape] | None = None
) -> list[dict[str, Any]]:
    """Every kernel launch of every scenario at every shape (``SHAPES`` by default), with
    the tile sizes of the current mode (GPU unless interpreting); nothing runs."""
    records: list[dict[str, Any]] = []
    context: dict[str, str] = {}

    def recorder(kernel, grid, *args, **constexprs) -> None:
        records.append(
            {"kernel": kernel, "grid": tuple(grid), "args": args, "constexprs": constexprs,
             **context}
        )  # fmt: skip

    saved = {name: module.launch for name, module in modules.items()}
    try:
        for module in modules.values():
            module.launch = recorder
        for shape_name, shape in (SHAPES if shapes is None else shapes).items():
            for label, call in _scenarios(modules, shape, all_modes):
                context.update(shape=shape_name, scenario=label)
                call()
    finally:
        for name, module in modules.items():
            module.launch = saved[name]
    return records


def variant(kernel_name: str, constexprs: dict[str, Any]) -> str:
    """The ``byte_model.KERNELS`` key of a launch (a kernel in one mode)."""
    if kernel_name == "_window_kernel":
        return ("down", "up_adjoint", "down_route")[constexprs["MODE"]]
    if kernel_name == "_up_kernel":
        if constexprs["WRITE_MAX"]:
            return "up_max"
        if not constexprs["HAS_FINE"]:
            return "up_only"
        return "band" if constexprs["SIGN"] < 0 else "up_add"
    key = kernel_name.strip("_").removesuffix("_kernel")
    if key not in KERNELS:
        raise KeyError(f"no byte model for kernel {kernel_name} (add it to byte_model.KERNELS)")
    return key


# --------------------------------------------------------------------------- compiling


def _specialize(record: dict[str, Any], backend) -> tuple[Any, dict, dict, dict]:
    """(options, signature, constexprs, attrs) exactly as ``JITFunction.run`` builds them."""
    from triton.runtime.jit import create_function_from_signature

    kernel = record["kernel"]
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*record["args"], **record["constexprs"])
    return kernel._pack_args(backend, record["constexprs"], bound, specialization, options)


def _plain(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def build_tasks(
    modules: dict[str, Any],
    capabilities: tuple[int, ...],
    all_modes: bool = False,
    shapes: dict[str, Shape] | None = None,
) -> list[dict[str, Any]]:
    """Unique (capability, kernel, specialization) compile tasks, in a stable order.

    Each task's ``bytes_per_program`` is its kernel's byte count at its shape (finest
    level) over the programs of that shape's largest launch of the kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    shapes = SHAPES if shapes is None else shapes
    records = record_launches(modules, all_modes, shapes)
    programs: dict[tuple[str, str], int] = {}
    for record in records:
        key = (variant(record["kernel"].__name__, record["constexprs"]), record["shape"])
        count = 1
        for size in record["grid"]:
            count *= int(size)
        programs[key] = max(programs.get(key, 0), count)
    tasks: dict[tuple, dict[str, Any]] = {}
    for capability in capabilities:
        backend = make_backend(GPUTarget("cuda", capability, 32))
        for record in records:
            options, signature, constexprs, attrs = _specialize(record, backend)
            name = record["kernel"].__name__
            names = record["kernel"].arg_names
            const_named = {names[path[0]]: _plain(v) for path, v in constexprs.items()}
            key = (capability, name, repr(sorted(signature.items())), repr(const_named),
                   repr(sorted(attrs.items())))  # fmt: skip
            used = f"{record['shape']}: {record['scenario']}"
            if key in tasks:
                if used not in tasks[key]["used_by"]:
                    tasks[key]["used_by"].append(used)
                continue
            kind = variant(name, record["constexprs"])
            moved = kernel_bytes(kind, shapes[record["shape"]])
            tasks[key] = {
                "kernel": name, "variant": kind,
                "capability": capability, "target": f"sm_{capability}",
                "shape": record["shape"], "used_by": [used], "grid": list(record["grid"]),
                "bytes_per_program": moved // programs[(kind, record["shape"])],
                "signature": signature, "constexprs": const_named,
                "divisible_by_16": [names[path[0]] for path, a in attrs.items() if a],
                "num_warps": options.num_warps, "num_stages": options.num_stages,
                "_record": record, "_options": options, "_constexprs": constexprs,
                "_attrs": attrs,
            }  # fmt: skip
    return list(tasks.values())


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9:_]+)*)")
_BAR_SYNC = re.compile(r"^\s*(?:@!?%\w+\s+)?bar(?:rier)?\.sync\b", re.MULTILINE)
_CONVERT_LAYOUT = re.compile(r"\bttg\.convert_layout\b")

#: Static facts of one compiled configuration; the regression check holds each of these
#: at or below its recorded value (vector access counts are recorded, not held: a
#: vector access that turns scalar raises the scalar count).
HELD_FACTS = ("registers", "spill_bytes", "bar_sync", "convert_layout", "ld_scalar", "st_scalar")
FACTS = (*HELD_FACTS, "ld_vector", "st_vector", "bytes_per_program")
BASELINE = HERE / "results" / "kernel_facts.json"
DUMP_ENV = "PYRAMIDFLOW_DUMP_KERNELS"
FACT_SOURCES = ("_triton_utils.py", "pyramid_triton.py", "coupling_triton.py", "loss_map_triton.py")


def barrier_count(ptx: str) -> int:
    """``bar.sync`` / ``barrier.sync`` instructions in ``ptx`` (static count)."""
    return len(_BAR_SYNC.findall(ptx))


def convert_layout_count(ttgir: str) -> int:
    """``ttg.convert_layout`` ops in ``ttgir`` (static count: each one that survives to
    the GPU IR moves data between threads, through shared memory or shuffles)."""
    return len(_CONVERT_LAYOUT.findall(ttgir))


def vector_widths(ptx: str) -> dict[str, dict[str, int]]:
    """Counts of global loads / stores in ``ptx`` by width: v4, v2 or scalar."""
    counts = {op: {"v4": 0, "v2": 0, "scalar": 0} for op in ("ld", "st")}
    for op, suffix in _GLOBAL_ACCESS.findall(ptx):
        parts = suffix.split(".")
        width = "v4" if "v4" in parts else "v2" if "v2" in parts else "scalar"
        counts[op][width] += 1
    return counts


def describe_vectors(counts: dict[str, dict[str, int]]) -> str:
    """'ld v4x12 s2, st v4x1' style summary."""
    parts = []
    for op in ("ld", "st"):
        items = [f"{w}x{n}" for w, n in counts[op].items() if n and w != "scalar"]
        if counts[op]["scalar"]:
            items.append(f"scalar x{counts[op]['scalar']}")
        parts.append(f"{op} " + (" ".join(items) if items else "-"))
    return ", ".join(parts)


def _res_usage(cubin: bytes, kernel: str) -> dict[str, int] | None:
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - optional tool
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        done = subprocess.run(
            [tool, "-res-usage", handle.name], capture_output=True, text=True, check=False
        )
    finally:
        os.unlink(handle.name)
    match = _RES_USAGE.search(done.stdout.split(f"Function {kernel}:", 1)[-1])
    if done.returncode != 0 or match is None:
        return None
    reg, stack, shared, local = (int(v) for v in match.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def compile_task(task: dict[str, Any]) -> dict[str, Any]:
    """Compile one task and measure its resources; never raises (errors are recorded)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    result = {k: v for k, v in task.items() if not k.startswith("_")}
    result["bytes"] = kernel_bytes(task["variant"], BENCH_SHAPE)
    result["floor_s"] = floor_seconds(result["bytes"])
    start = time.perf_counter()
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        source = triton.compiler.ASTSource(
            task["_record"]["kernel"], task["signature"], task["_constexprs"], task["_attrs"]
        )
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", task["capability"], 32),
                options=task["_options"].__dict__,
            )
    except Exception as error:  # noqa: BLE001 - reported, the run goes on
        result["error"] = f"{type(error).__name__}: {str(error)[-2000:]}"
        result["compile_s"] = time.perf_counter() - start
        return result
    finally:
        knobs.nvidia.dump_ptxas_log = False
    result["compile_s"] = time.perf_counter() - start
    result["error"] = None
    text = log.getvalue()
    used, frame = _PTXAS_USED.search(text), _PTXAS_FRAME.search(text)
    result["ptxas_log"] = text.strip()[-1000:]
    result["registers"] = int(used.group(1)) if used else None
    stack, spill_stores, spill_loads = (int(v) for v in frame.groups()) if frame else (0, 0, 0)
    result.update(stack=stack, spill_stores=spill_stores, spill_loads=spill_loads)
    result["shared"] = int(compiled.metadata.shared)
    result["local"] = 0
    usage = _res_usage(compiled.asm["cubin"], compiled.metadata.name)
    if usage is not None:
        result["registers"] = usage["registers"]
        result["stack"] = max(result["stack"], usage["stack"])
        result["local"] = usage["local"]
    result["res_usage_source"] = "cuobjdump" if usage is not None else "ptxas -v"
    if result["registers"] is None:
        result["error"] = "no register count (neither the ptxas log nor cuobjdump has one)"
    result["spill"] = bool(spill_stores or spill_loads or result["local"] or result["stack"])
    counts = vector_widths(compiled.asm["ptx"])
    result["ptx_global"] = counts
    result["vectorized"] = bool(sum(counts["ld"][w] + counts["st"][w] for w in ("v4", "v2")))
    result["vectors"] = describe_vectors(counts)
    dump = os.environ.get(DUMP_ENV)
    if dump:  # the compiled code, for reading (``--dump DIR``)
        key = config_key(result)
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        stem = f"{result['target']}{result['kernel']}.{digest}"
        for kind in ("ttgir", "ptx"):
            (Path(dump) / f"{stem}.{kind}").write_text(compiled.asm[kind])
    result["bar_sync"] = barrier_count(compiled.asm["ptx"])
    result["convert_layout"] = convert_layout_count(compiled.asm["ttgir"])
    result["facts"] = facts_of(result)
    return result


def facts_of(result: dict[str, Any]) -> dict[str, int]:
    """The ``FACTS`` of one compiled configuration."""
    counts = result["ptx_global"]
    return {
        "registers": result["registers"],
        "spill_bytes": result["spill_stores"] + result["spill_loads"]
        + max(result["stack"], result["local"]),
        "bar_sync": result["bar_sync"],
        "convert_layout": result["convert_layout"],
        "ld_scalar": counts["ld"]["scalar"],
        "st_scalar": counts["st"]["scalar"],
        "ld_vector": counts["ld"]["v4"] + counts["ld"]["v2"],
        "st_vector": counts["st"]["v4"] + counts["st"]["v2"],
        "bytes_per_program": result["bytes_per_program"],
    }  # fmt: skip


def config_key(result: dict[str, Any]) -> str:
    """A readable key of one compiled configuration: target, kernel, constexprs, the
    argument types and the 16-divisible arguments (what Triton specializes on)."""
    consts = ",".join(f"{k}={v}" for k, v in sorted(result["constexprs"].items()))
    types = ",".join(t for t in result["signature"].values() if t != "constexpr")
    divisible = ",".join(sorted(result["divisible_by_16"]))
    return f"{result['target']} {result['kernel']} [{consts}] ({types}) div16[{divisible}]"


def source_digests() -> dict[str, str]:
    """sha256 of each kernel source the facts depend on (kernels and launchers)."""
    return {
        name: hashlib.sha256((ROOT / "kernels" / name).read_bytes()).hexdigest()
        for name in FACT_SOURCES
    }


def baseline_of(report: dict[str, Any]) -> dict[str, Any]:
    """The recorded facts of a run (``--record-baseline``), keyed by ``config_key``."""
    configs = {}
    for r in report["results"]:
        if r["error"] is None:
            configs[config_key(r)] = {"variant": r["variant"], "shape": r["shape"], **r["facts"]}
    return {
        "triton": report.get("triton"),
        "ptxas": (report["toolchain"].get("ptxas") or {}).get("version"),
        "shape_set": report.get("shape_set"),
        "limits": RANGE_LIMITS,
        "range_channels": list(RANGE_CHANNELS),
        "range_batches": list(RANGE_BATCHES),
        "sources": source_digests(),
        "configs": dict(sorted(configs.items())),
    }


def regressions(report: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """Configurations whose ``HELD_FACTS`` exceed their recorded values, and compiled
    configurations the baseline does not hold (record it again after a kernel change)."""
    found = []
    recorded = baseline["configs"]
    for r in report["results"]:
        if r["error"] is not None:
            continue
        key = config_key(r)
        if key not in recorded:
            found.append(f"{key}: not in the recorded facts (rerun with --record-baseline)")
            continue
        worse = [
            f"{fact} {r['facts'][fact]} > {recorded[key][fact]}"
            for fact in HELD_FACTS
            if r["facts"][fact] > recorded[key][fact]
        ]
        if worse:
            found.append(f"{key}: regressed: {', '.join(worse)}")
    return found


def select_tasks(
    tasks: list[dict[str, Any]], pattern: str | None = None, keys: list[str] | None = None
) -> list[dict[str, Any]]:
    """Tasks whose "kernel variant shape" matches ``pattern`` (a regex), or whose
    ``config_key`` is in ``keys``; all of them when neither is given."""
    if pattern:
        tasks = [
            t for t in tasks if re.search(pattern, f"{t['kernel']} {t['variant']} {t['shape']}")
        ]
    if keys is not None:
        wanted = set(keys)
        tasks = [t for t in tasks if config_key(t) in wanted]
    return tasks


def worker(
    shard: int,
    shards: int,
    capabilities: tuple[int, ...],
    all_modes: bool = False,
    shape_set: str = "default",
    pattern: str | None = None,
    keys: list[str] | None = None,
) -> dict[str, Any]:
    """Child process: record, specialize, compile this shard's tasks."""
    modules = _import_kernels()
    from pyramidflow_kernels._backend import interpreting

    if interpreting():
        raise RuntimeError("the compile worker must run with TRITON_INTERPRET unset")
    tasks = build_tasks(modules, capabilities, all_modes, SHAPE_SETS[shape_set]())
    launched = {t["kernel"] for t in tasks}
    chosen = select_tasks(tasks, pattern, keys)
    results = [compile_task(task) for task in chosen[shard::shards]]
    return {
        "defined": sorted(defined_kernels(modules)),
        "launched": sorted(launched),
        "tasks": len(chosen),
        "results": results,
    }


# --------------------------------------------------------------------------- driver


def run_check(
    capabilities: tuple[int, ...] = CAPABILITIES,
    jobs: int | None = None,
    all_modes: bool = False,
    shape_set: str = "default",
    pattern: str | None = None,
    keys: list[str] | None = None,
) -> dict[str, Any]:
    """Run the whole check in ``jobs`` child processes (TRITON_INTERPRET removed).

    ``shape_set``: "default" (benchmark and small shapes) or "range" (adds the supported
    range of channels, batches and dtypes, ``range_shapes``); ``pattern`` / ``keys``
    compile only some configurations (``select_tasks``)."""
    start = time.perf_counter()
    # ptxas and LLVM contend: 2 processes on 2 cores are slower than 1 (177 s vs 151 s)
    jobs = max(1, jobs or min(4, (os.cpu_count() or 1) // 2))
    caps = ",".join(str(c) for c in capabilities)
    with tempfile.TemporaryDirectory(prefix="pf-triton-cache-") as cache:
        env = child_env(cache)
        probe = subprocess.run(
            [sys.executable, __file__, "--toolchain"], env=env, capture_output=True, text=True
        )
        chain = _last_json(probe.stdout) or {"ok": False, "reason": probe.stderr[-2000:]}
        report: dict[str, Any] = {"toolchain": chain, "capabilities": list(capabilities)}
        if not chain.get("ok"):
            report["seconds"] = time.perf_counter() - start
            return report
        keys_file = Path(cache) / "keys.json"
        keys_file.write_text(json.dumps(keys))
        options = ["--capabilities", caps, "--shapes", shape_set, "--keys-file", str(keys_file)]
        options += ["--all-modes"] if all_modes else []
        options += ["--kernels", pattern] if pattern else []
        children = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", f"{i}/{jobs}", *options],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(jobs)
        ]
        outputs = [child.communicate() for child in children]
    results, failures = [], []
    defined: set[str] = set()
    launched: set[str] = set()
    for child, (stdout, stderr) in zip(children, outputs, strict=True):
        parsed = _last_json(stdout)
        if child.returncode != 0 or parsed is None:
            failures.append(f"worker exit {child.returncode}: {stderr[-3000:]}")
            continue
        results.extend(parsed["results"])
        defined |= set(parsed["defined"])
        launched |= set(parsed["launched"])
    results.sort(key=lambda r: (r["kernel"], r["variant"], r["shape"], r["capability"]))
    report.update(
        triton=chain.get("triton"),
        shape_set=shape_set,
        shapes={name: vars(shape) for name, shape in SHAPE_SETS[shape_set]().items()},
        selection={"kernels": pattern, "keys": keys},
        bandwidth=H200_COPY_BANDWIDTH,
        jobs=jobs,
        all_modes=all_modes,
        defined_kernels=sorted(defined),
        not_launched=sorted(defined - launched),
        worker_failures=failures,
        results=results,
        summary={
            "compiled": sum(r["error"] is None for r in results),
            "errors": sum(r["error"] is not None for r in results),
            "spills": sum(bool(r.get("spill")) for r in results),
        },
        seconds=time.perf_counter() - start,
    )
    return report


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def problems(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[str]:
    """Everything that makes the check fail (empty: all kernels build, none spills and,
    with a ``baseline`` of the same Triton version, none regresses past its facts)."""
    found = list(report.get("worker_failures", []))
    found += [f"kernel {name} is not launched by any scenario" for name in report["not_launched"]]
    if baseline is not None and baseline.get("triton") == report.get("triton"):
        found += regressions(report, baseline)
    if not report.get("results"):
        found.append("nothing was compiled")
    for r in report.get("results", []):
        where = f"{r['kernel']} [{r['variant']}] {r['target']} ({r['shape']})"
        if r["error"] is not None:
            found.append(f"{where}: compile error: {r['error'][:500]}")
        elif r["spill"]:
            found.append(
                f"{where}: local memory: stack {r['stack']} B, local {r['local']} B, spill "
                f"stores {r['spill_stores']} B, loads {r['spill_loads']} B"
            )
    return found


def text_table(report: dict[str, Any]) -> str:
    """One line per compiled configuration."""
    head = (
        f"{'kernel':27s} {'variant':17s} {'shape':12s} {'target':6s} {'regs':>4s} "
        f"{'smem':>6s} {'local':>5s} {'spill':>5s} {'bar':>4s} {'cvt':>4s} {'B/prog':>7s}  "
        f"vectorized (PTX global ld / st)"
    )
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        where = f"{r['kernel']:27s} {r['variant']:17s} {r['shape']:12s} {r['target']:6s}"
        if r["error"] is not None:
            lines.append(f"{where} ERROR {r['error'][:80]}")
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        lines.append(
            f"{where} {r['registers']:4d} {r['shared']:6d} {max(r['stack'], r['local']):5d} "
            f"{spill:5d} {r['bar_sync']:4d} {r['convert_layout']:4d} "
            f"{r['bytes_per_program']:7d}  {r['vectors']}"
        )
    return "\n".join(lines)


def _span(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if len(set(values)) > 1 else f"{values[0]}"


def markdown_table(report: dict[str, Any]) -> str:
    """Per kernel mode: op, fusion, registers, spills, barriers, layout conversions,
    scalar / vector global accesses, bytes per program, bytes, floor."""
    rows = []
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in report["results"]:
        by_variant.setdefault(r["variant"], []).append(r)
    bw = report["bandwidth"]
    for name, info in KERNELS.items():
        entries = [r for r in by_variant.get(name, []) if r["error"] is None]
        if not entries:
            continue
        regs = []
        for cap in report["capabilities"]:
            values = [r["registers"] for r in entries if r["capability"] == cap]
            regs.append(_span(values) if values else "-")
        worst: dict[str, int] = {}
        for r in entries:
            if r["spill"]:
                amount = max(r["spill_stores"], r["stack"], r["local"])
                worst[r["target"]] = max(worst.get(r["target"], 0), amount)
        spills = ", ".join(f"**{t}: {n} B**" for t, n in sorted(worst.items())) or "none"
        bench = [r for r in entries if r["shape"] == "bench" and r["capability"] == 90]
        bench = bench or [r for r in entries if r["capability"] == 90] or entries
        facts = [r["facts"] for r in bench]
        sync = " / ".join(_span([f[k] for f in facts]) for k in ("bar_sync", "convert_layout"))
        access = ", ".join(
            f"{op} {_span([f[op + '_vector'] for f in facts])} v"
            f" + {_span([f[op + '_scalar'] for f in facts])} s"
            for op in ("ld", "st")
        )
        per_program = _span([f["bytes_per_program"] for f in facts])
        moved = kernel_bytes(name, BENCH_SHAPE)
        rows.append(
            f"| `{info.function}` {name} | {info.op} | {info.fuses.replace('|', chr(92) + '|')} | "
            f"{' / '.join(regs)} | {spills} | {sync} | {access} | {per_program} | "
            f"{moved / 1e6:.0f} MB | {floor_seconds(moved, bw) * 1e6:.1f} us |"
        )
    caps = " / ".join(f"sm_{c}" for c in report["capabilities"])
    covered = "a small odd shape"
    if report.get("shape_set") == "range":
        covered += (
            f" and the supported range (C {RANGE_LIMITS['channels'][0]}.."
            f"{RANGE_LIMITS['channels'][1]}, B {RANGE_LIMITS['batch'][0]}.."
            f"{RANGE_LIMITS['batch'][1]}, float32 and float64: `--shapes range`)"
        )
    header = [
        f"Kernels compiled ahead of time with Triton {report.get('triton')} for {caps} "
        f"(`python bench/gpu_build_check.py --shapes range`). Registers per thread (range "
        f"over the launch configurations of {BENCH_SHAPE.label()}, {covered}), local memory "
        f"spills (worst spill-store or stack bytes per thread). At the benchmark shape on "
        f"sm_90 (a range where the modes differ): `bar.sync` and `ttg.convert_layout` "
        f"counts (static, in the PTX / TTGIR), global loads and stores in the PTX as vector "
        f"(`.v2`/`.v4`) + scalar instructions (static), and bytes moved per program (the "
        f"kernel's bytes over its programs). Then bytes read + written by one launch on the "
        f"finest level at {BENCH_SHAPE.label()} float32, and the floor at "
        f"{bw / 1e12:.1f} TB/s (H200 copy bandwidth). Byte formulas: `bench/byte_model.py`; "
        f"every configuration's facts: `bench/results/kernel_facts.json`.",
        "",
        f"| kernel | op | fuses | registers ({caps}) | spills | bar.sync / convert_layout "
        f"| global ld, st (vector + scalar) | bytes / program | bytes | floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    parser.add_argument("--markdown", type=Path, help="also write the README table here")
    parser.add_argument("--capabilities", default=",".join(map(str, CAPABILITIES)))
    parser.add_argument("--jobs", type=int, help="compile processes (default: CPUs / 2, 1 to 4)")
    parser.add_argument(
        "--all-modes", action="store_true", help="every coupling mode (see coupling_modes)"
    )
    parser.add_argument(
        "--shapes", choices=sorted(SHAPE_SETS), default="default",
        help="default: benchmark + small shape; range: also the supported C, B and dtypes",
    )  # fmt: skip
    parser.add_argument(
        "--kernels", help='only configurations whose "kernel variant shape" matches this regex'
    )
    parser.add_argument(
        "--baseline", type=Path, default=BASELINE,
        help="recorded facts to hold every configuration to (missing file: not checked)",
    )  # fmt: skip
    parser.add_argument(
        "--record-baseline", action="store_true",
        help="write this run's facts to --baseline (needs --shapes range, no --kernels)",
    )  # fmt: skip
    parser.add_argument("--dump", type=Path, help="write each configuration's TTGIR and PTX here")
    parser.add_argument("--keys-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--toolchain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    capabilities = tuple(int(c) for c in args.capabilities.split(","))

    if args.toolchain:
        print(json.dumps(toolchain()))
        return 0
    if args.worker:
        shard, shards = (int(v) for v in args.worker.split("/"))
        keys = json.loads(args.keys_file.read_text()) if args.keys_file else None
        done = worker(shard, shards, capabilities, args.all_modes, args.shapes, args.kernels, keys)
        print(json.dumps(done))
        return 0
    if args.record_baseline and (args.shapes != "range" or args.kernels):
        parser.error("--record-baseline needs the whole range: --shapes range, no --kernels")

    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        os.environ[DUMP_ENV] = str(args.dump.resolve())  # read by the compile workers
    report = run_check(capabilities, args.jobs, args.all_modes, args.shapes, args.kernels)
    if args.kernels:
        report["not_launched"] = []  # a selection compiles some kernels on purpose
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    if not report["toolchain"].get("ok"):
        print(f"toolchain unavailable: {report['toolchain'].get('reason')}", file=sys.stderr)
        return EXIT_TOOLCHAIN
    print(text_table(report))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(report))
    baseline = None
    if args.record_baseline:
        args.baseline.write_text(json.dumps(baseline_of(report), indent=1) + "\n")
        print(f"recorded the facts of {report['summary']['compiled']} configurations: "
              f"{args.baseline}")  # fmt: skip
    elif args.baseline.exists():
        baseline = json.loads(args.baseline.read_text())
        if baseline.get("triton") != report.get("triton"):
            print(f"note: {args.baseline} was recorded with Triton {baseline.get('triton')}, "
                  f"this is {report.get('triton')}: facts not compared")  # fmt: skip
    found = problems(report, baseline)
    summary = report["summary"]
    print(
        f"\n{summary['compiled']} configurations compiled, {summary['errors']} errors, "
        f"{summary['spills']} with local memory, in {report['seconds']:.1f} s "
        f"({report['jobs']} processes); JSON: {args.out}"
    )
    for line in found:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
