"""The Triton kernels build for real GPUs (sm_80, sm_90) on a machine without one.

``bench/gpu_build_check.py`` compiles every ``@triton.jit`` entry kernel with the
configurations its launchers use, in child processes without ``TRITON_INTERPRET`` (so
this works when the test run itself sets ``TRITON_INTERPRET=1``). The test fails on a
compile error, on any local memory (spills, stack frame) and on a kernel that no
scenario launches; vectorization is printed, not asserted. Skipped only when Triton's
NVIDIA toolchain (backend, ptxas) is unavailable.

Also checks the byte model against the byte counts of the op benchmarks, and the
report parsing on synthetic inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import BENCH, bench_module

byte_model = bench_module("byte_model")
build_check = bench_module("gpu_build_check")


# --------------------------------------------------------------------------- byte model


def test_documented_benchmark_numbers_and_floor():
    mb = {
        ("pyramid_decompose", "forward"): 617,
        ("pyramid_compose", "forward"): 396,
        ("pyramid_compose", "backward"): 220,
        ("fourier_loss", "forward"): 209,
        ("fourier_loss", "backward"): 403,
        ("anomaly_map", "forward"): 303,
    }
    for (op, direction), expected in mb.items():
        assert round(byte_model.op_bytes(op, direction=direction) / 1e6) == expected
    # the decompose op is its two kernels per level; the coupling forward is one kernel
    s, _ = byte_model.BENCH_SHAPE.level_sums()
    per_level = byte_model.kernel_bytes("down") + byte_model.kernel_bytes("band")
    assert byte_model.op_bytes("pyramid_decompose") == pytest.approx(per_level * s, rel=1e-6)
    eval_fwd = byte_model.op_bytes("affine_coupling", training=False)
    assert byte_model.kernel_bytes("coupling_fwd") == eval_fwd
    assert byte_model.floor_seconds(4.3e12) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        byte_model.op_bytes("anomaly_map", direction="backward")
    with pytest.raises(ValueError):
        byte_model.kernel_bytes("no_such_kernel")


# --------------------------------------------------------------------------- report parsing


def test_vector_widths_and_problems_on_synthetic_input():
    ptx = """
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        @%p2 ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];
        @%p3 ld.global.b32 { %r7 }, [ %rd3 + 0 ];
        @%p4 st.global.v4.b32 [ %rd4 + 0 ], { %r1, %r2, %r3, %r4 };
    """
    counts = build_check.vector_widths(ptx)
    assert counts == {"ld": {"v4": 1, "v2": 1, "scalar": 1}, "st": {"v4": 1, "v2": 0, "scalar": 0}}
    clean = {"kernel": "_k", "variant": "down", "target": "sm_90", "shape": "bench",
             "error": None, "spill": False, "stack": 0, "local": 0, "spill_stores": 0,
             "spill_loads": 0}  # fmt: skip
    report = {"not_launched": [], "results": [clean]}
    assert build_check.problems(report) == []
    spilled = {**clean, "spill": True, "stack": 16, "spill_stores": 16, "spill_loads": 16}
    assert any("local memory" in p for p in build_check.problems({**report, "results": [spilled]}))
    broken = {**clean, "error": "PTXASError: boom"}
    assert any("compile error" in p for p in build_check.problems({**report, "results": [broken]}))
    assert build_check.problems({"not_launched": ["_x_kernel"], "results": [clean]})


def test_every_kernel_mode_has_a_byte_model_entry():
    assert build_check.variant("_window_kernel", {"MODE": 0}) == "down"
    assert build_check.variant("_window_kernel", {"MODE": 1}) == "up_adjoint"
    assert build_check.variant("_window_kernel", {"MODE": 2}) == "down_route"
    up = {"WRITE_MAX": False, "HAS_FINE": True, "SIGN": -1.0}
    assert build_check.variant("_up_kernel", up) == "band"
    assert build_check.variant("_up_kernel", {**up, "SIGN": 1.0}) == "up_add"
    assert build_check.variant("_up_kernel", {**up, "HAS_FINE": False}) == "up_only"
    assert build_check.variant("_up_kernel", {**up, "WRITE_MAX": True}) == "up_max"
    assert build_check.variant("_coupling_inv_bwd_kernel", {}) == "coupling_inv_bwd"
    with pytest.raises(KeyError):
        build_check.variant("_unknown_kernel", {})


# --------------------------------------------------------------------------- the build


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    out, table = tmp_path / "gpu_build_check.json", tmp_path / "KERNELS_table.md"
    command = [sys.executable, str(BENCH / "gpu_build_check.py"), "--out", str(out),
               "--markdown", str(table)]  # fmt: skip
    # the script removes TRITON_INTERPRET for its compile processes itself
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode == build_check.EXIT_TOOLCHAIN:
        reason = json.loads(out.read_text())["toolchain"].get("reason")
        pytest.skip(f"Triton's NVIDIA toolchain is unavailable: {reason}")
    assert out.exists(), f"no report (exit {done.returncode}):\n{done.stderr[-4000:]}"
    report = json.loads(out.read_text())
    print(done.stdout)  # the table: registers, spills, vectorization per configuration
    assert not report["worker_failures"], report["worker_failures"]
    results = report["results"]
    compiled = {(r["kernel"], r["capability"]) for r in results if r["error"] is None}
    missing = [
        (kernel, cap)
        for kernel in report["defined_kernels"]
        for cap in (80, 90)
        if (kernel, cap) not in compiled
    ]
    assert len(report["defined_kernels"]) >= 13
    assert not missing, f"kernels without a successful build: {missing}"
    assert {r["shape"] for r in results} == {"bench", "small"}
    found = build_check.problems(report)
    assert not found, "\n".join(found)
    assert done.returncode == 0, done.stderr[-4000:]
    assert table.read_text().count("\n| `") == len(
        {r["variant"] for r in results if r["error"] is None}
    )
