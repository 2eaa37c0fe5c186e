"""No kernel offset overflows int32 at the supported limits (C <= 64, 8192 px, B <= 64).

An int32 offset such as ``c * HW`` wraps once a batch item holds 2^31 elements (C = 64 at
8192 px is 2^32), and the kernel silently reads and writes the wrong pixels on a GPU. The
test needs no memory and no GPU:

1. every launcher mode is called on ``meta`` tensors at the limits, with ``launch``
   replaced by a recorder and GPU tile sizes (nothing is allocated, nothing runs): the
   scenarios of ``bench/gpu_build_check.py``, which compiles the same launches;
2. for each recorded launch, the program with the largest id on every grid axis (the one
   with the largest offsets) runs in Triton's interpreter with its integer-overflow checks
   on (``debug``: every int32 add, sub and mul is checked against its int64 result), the
   tensors replaced by fake addresses 2^44 bytes apart, and loads and stores recording the
   addresses they would touch instead of touching memory;
3. every address must lie inside its tensor, and the largest element offset the program
   touches is reported per kernel: the largest offset the launcher can produce.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton does not import: the Triton kernels cannot run")

from pyramidflow_kernels import (  # noqa: E402
    _triton_utils,
    coupling_triton,
    loss_map_triton,
    pyramid_triton,
)

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from conftest import bench_module  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

build_check = bench_module("gpu_build_check")
Shape = bench_module("byte_model").Shape

MAX_CHANNELS = 64
MAX_SIZE = 8192
MAX_BATCH = 64
# the coupling at k = 2 reads parameters at twice this size: 16384 px, beyond the limit
LIMITS = Shape(batch=MAX_BATCH, channels=MAX_CHANNELS, height=MAX_SIZE, width=MAX_SIZE, levels=2)
INT32_LIMIT = 2**31
REGION = 2**44  # bytes between two fake tensors: larger than any tensor at the limits

MODULES = (pyramid_triton, coupling_triton, loss_map_triton)


@dataclass
class Launch:
    """One recorded kernel launch: what the GPU would run."""

    scenario: str
    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__


class Touched:
    """The element offsets a program touched, per tensor argument (by fake address)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.numel = [t.numel() for t in tensors]
        self.itemsize = [t.element_size() for t in tensors]
        self.low = [2**63] * len(tensors)
        self.high = [-1] * len(tensors)
        self.stray: list[int] = []

    def add(self, addresses: np.ndarray) -> None:
        addresses = addresses.astype(np.uint64).ravel()
        region = (addresses // np.uint64(REGION)).astype(np.int64) - 1
        inside = (region >= 0) & (region < len(self.numel))
        self.stray += [int(a) for a in addresses[~inside][:4]]
        for index in np.unique(region[inside]):
            mine = addresses[region == index] - np.uint64(REGION * (int(index) + 1))
            elements = mine // np.uint64(self.itemsize[index])
            self.low[index] = min(self.low[index], int(elements.min()))
            self.high[index] = max(self.high[index], int(elements.max()))

    def outside(self) -> list[str]:
        """Accesses outside their tensor: wrapped or miscomputed offsets."""
        found = [f"address {a:#x} is in no tensor" for a in self.stray]
        for index, numel in enumerate(self.numel):
            if self.high[index] >= 0 and not (0 <= self.low[index] and self.high[index] < numel):
                found.append(
                    f"tensor {index}: offsets {self.low[index]}..{self.high[index]} outside "
                    f"0..{numel - 1}"
                )
        return found


class FakeTensor:
    """A tensor argument at a fake address: the interpreter only needs its dtype and
    address (it never dereferences it here)."""

    def __init__(self, tensor: torch.Tensor, index: int) -> None:
        self.dtype = tensor.dtype
        self.index = index

    def data_ptr(self) -> int:
        return REGION * (self.index + 1)


def record_at_limits() -> list[Launch]:
    """Every distinct launch of every launcher mode (``gpu_build_check``'s scenarios, all
    coupling modes) at the limits, on meta tensors with GPU tile sizes; nothing runs."""
    saved = _triton_utils.interpreting
    _triton_utils.interpreting = lambda: False  # the interpreter's tiles change the grid
    try:
        modules = {module.__name__.rsplit(".", 1)[-1]: module for module in MODULES}
        records = build_check.record_launches(modules, all_modes=True, shapes={"limits": LIMITS})
    finally:
        _triton_utils.interpreting = saved
    unique: dict[str, Launch] = {}
    for r in records:
        launch = Launch(r["scenario"], r["kernel"], r["grid"], r["args"], r["constexprs"])
        args = [(a.shape, a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args]
        unique.setdefault(repr((launch.name, launch.grid, args, launch.constexprs)), launch)
    return list(unique.values())


@contextlib.contextmanager
def fake_memory(touched: Touched) -> Iterator[None]:
    """Loads return ones and stores do nothing; both record the addresses of live lanes."""
    builder = interpreter.interpreter_builder

    def load(ptrs, mask, other, cache_policy, is_volatile):
        touched.add(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)])
        dtype = ptrs.get_element_ty()
        return interpreter.TensorHandle(
            np.ones(ptrs.data.shape, dtype=interpreter._get_np_dtype(dtype)), dtype
        )

    def store(ptrs, value, mask, cache_policy):
        touched.add(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)])

    saved_options = builder.options
    builder.create_masked_load = load
    builder.create_masked_store = store
    builder.options = interpreter.InterpreterOptions(debug=True)  # int32 overflow checks on
    try:
        yield
    finally:
        del builder.create_masked_load, builder.create_masked_store
        builder.options = saved_options


def run_last_program(launch: Launch) -> Touched:
    """Run the program with the largest id on every grid axis in the interpreter."""
    touched = Touched([a for a in launch.args if isinstance(a, torch.Tensor)])
    fakes, index = [], 0
    for arg in launch.args:
        if isinstance(arg, torch.Tensor):
            fakes.append(FakeTensor(arg, index))
            index += 1
        else:
            fakes.append(arg)
    kernel = launch.kernel
    fn = kernel.rewrite()
    constexpr_names = interpreter.GridExecutor(fn, kernel.arg_names, launch.grid).constexprs
    grid = launch.grid + (1,) * (3 - len(launch.grid))
    scope = interpreter._patch_lang(kernel.fn)
    try:
        bound = inspect.getcallargs(fn, *fakes, **launch.constexprs)
        args = {
            name: value if name in constexpr_names else interpreter._implicit_cvt(value)
            for name, value in bound.items()
        }
        with fake_memory(touched):
            interpreter.interpreter_builder.set_grid_dim(*grid)
            interpreter.interpreter_builder.set_grid_idx(*(n - 1 for n in grid))
            fn(**args)
    finally:
        scope.restore()
    return touched


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=torch.float32)


LAUNCHES = record_at_limits()


@pytest.mark.parametrize(
    "launch", LAUNCHES, ids=[f"{launch.scenario}-{launch.name}" for launch in LAUNCHES]
)
def test_largest_offsets_fit_their_tensors(launch: Launch) -> None:
    touched = run_last_program(launch)  # raises on any int32 overflow
    assert not touched.outside(), touched.outside()
    largest = max(touched.high)
    # the limits are meant to reach past int32: a launch that stays below proves nothing
    assert largest >= INT32_LIMIT, f"largest offset {largest} < 2^31: raise the limits"


@triton.jit
def _channel_offsets_kernel(x_ptr, HW, C: tl.constexpr, WIDE: tl.constexpr):
    """Stores one value per channel plane, its offset computed in int32 or int64."""
    for c in tl.static_range(C):
        if WIDE:
            offset = tl.full((), c, tl.int64) * HW
        else:
            offset = c * HW
        tl.store(x_ptr + offset, 1.0)


@pytest.mark.parametrize("wide", [False, True])
def test_the_harness_catches_an_int32_offset(wide: bool) -> None:
    """The check itself can fail: ``c * HW`` in int32 at C = 64, 8192 px is reported."""
    planes = meta(MAX_CHANNELS, MAX_SIZE, MAX_SIZE)
    launch = Launch("self-test", _channel_offsets_kernel, (1,), (planes, MAX_SIZE**2),
                    {"C": MAX_CHANNELS, "WIDE": wide})  # fmt: skip
    if wide:
        touched = run_last_program(launch)
        assert touched.high == [planes.numel() - MAX_SIZE**2] and not touched.outside()
    else:
        with pytest.raises(Exception, match="int32 overflow"):
            run_last_program(launch)
