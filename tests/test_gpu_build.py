"""The Triton kernels build for real GPUs (sm_80, sm_90) on a machine without one.

``bench/gpu_build_check.py --shapes range`` compiles every ``@triton.jit`` entry kernel
with the configurations its launchers use over the supported range (C 1..64, B 2..64,
float32 and float64) and records each configuration's static facts (registers, spills,
``bar.sync``, ``ttg.convert_layout``, scalar / vector global accesses) in
``bench/results/kernel_facts.json``: a bench command of ~15 minutes. CI checks the
recorded facts (of the current sources, covering every kernel and the range, the table
made from them) and compiles the heaviest configuration of every kernel live (slow,
~1 minute; skipped only without Triton's NVIDIA toolchain or with another Triton
version than recorded), failing when one regresses past its recorded facts.

Also checks the byte model against the byte counts of the op benchmarks, and the
report parsing on synthetic inputs.
"""

from __future__ import annotations

import json
import re

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


def test_fact_counters_and_regressions_on_synthetic_input():
    ptx = """
        bar.sync 0;
        @%p3 bar.sync 0;
        barrier.sync 1;
        membar.gl;
        // bar.sync in a comment
    """
    assert build_check.barrier_count(ptx) == 3
    ttgir = "%1 = ttg.convert_layout %0 : a -> b\n%2 = ttg.convert_layout %1 : b -> c\n"
    assert build_check.convert_layout_count(ttgir) == 2
    result = {
        "kernel": "_k", "variant": "down", "target": "sm_90", "capability": 90,
        "shape": "bench", "error": None, "constexprs": {"BLOCK": 64},
        "signature": {"x": "*fp32", "n": "i32", "BLOCK": "constexpr"}, "divisible_by_16": ["x"],
        "facts": {fact: 4 for fact in build_check.FACTS},
    }  # fmt: skip
    key = build_check.config_key(result)
    assert key == "sm_90 _k [BLOCK=64] (*fp32,i32) div16[x]"
    report = {"results": [result]}
    same = {"configs": {key: dict(result["facts"])}}
    assert build_check.regressions(report, same) == []
    for fact in build_check.HELD_FACTS:
        tighter = {"configs": {key: {**result["facts"], fact: 3}}}
        assert [f"{fact} 4 > 3" in p for p in build_check.regressions(report, tighter)] == [True]
    looser_vectors = {"configs": {key: {**result["facts"], "ld_vector": 9}}}
    assert build_check.regressions(report, looser_vectors) == []  # recorded, not held
    assert "not in the recorded facts" in build_check.regressions(report, {"configs": {}})[0]


# --------------------------------------------------------------------------- recorded facts

RECORDED = json.loads(build_check.BASELINE.read_text())
REPORT = json.loads(build_check.DEFAULT_OUT.read_text())
KERNEL_SOURCES = [BENCH.parent / "kernels" / name for name in build_check.FACT_SOURCES]


def test_recorded_facts_are_of_the_current_kernels():
    """The facts were recorded from these kernel sources (after a kernel change, rerun
    ``python bench/gpu_build_check.py --shapes range --record-baseline --markdown
    bench/KERNELS_table.md``)."""
    stale = [
        name
        for name, digest in build_check.source_digests().items()
        if RECORDED["sources"].get(name) != digest
    ]
    assert not stale, f"kernels changed since bench/results/kernel_facts.json: {stale}"


def test_recorded_facts_cover_every_kernel_and_the_supported_range():
    defined = set()
    for path in KERNEL_SOURCES:
        defined |= set(re.findall(r"^def (_\w+_kernel)\(", path.read_text(), re.MULTILINE))
    configs = RECORDED["configs"]
    for target in ("sm_80", "sm_90"):
        built = {key.split()[1] for key in configs if key.startswith(target + " ")}
        assert built == defined, f"{target}: {sorted(defined ^ built)}"
        for kernel in defined:  # every kernel at both dtypes
            for dtype in ("fp32", "fp64"):
                assert any(
                    key.startswith(f"{target} {kernel} ") and f"*{dtype}" in key for key in configs
                ), (target, kernel, dtype)
    assert RECORDED["shape_set"] == "range"
    limits = build_check.RANGE_LIMITS
    channels, batches = RECORDED["range_channels"], RECORDED["range_batches"]
    assert (min(channels), max(channels)) == tuple(limits["channels"])
    assert (min(batches), max(batches)) == tuple(limits["batch"])
    # every padded power of two of the range is compiled (the coupling kernels' binaries
    # depend on C through it only; the pair kernels' on B the same way)
    assert {triton_pow2(c) for c in channels} == {triton_pow2(c) for c in range(1, 65)}
    assert {triton_pow2(b) for b in batches} == {triton_pow2(b) for b in range(2, 65)}


def triton_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_no_recorded_configuration_spills():
    """No configuration of the supported range (C 1..64, B 2..64, float32 and float64,
    sm_80 and sm_90) uses local memory."""
    spilled = sorted(key for key, facts in RECORDED["configs"].items() if facts["spill_bytes"])
    assert not spilled, "\n".join(spilled)


def test_kernels_table_is_the_recorded_report():
    assert REPORT["shape_set"] == "range"
    table = (BENCH / "KERNELS_table.md").read_text()
    assert table == build_check.markdown_table(REPORT)
    facts = {build_check.config_key(r): r["facts"] for r in REPORT["results"] if not r["error"]}
    assert facts == {
        k: {f: v[f] for f in build_check.FACTS} for k, v in RECORDED["configs"].items()
    }


# --------------------------------------------------------------------------- live compiles


def worst_configurations() -> list[str]:
    """Per kernel and target, the recorded configuration with the most registers."""
    worst: dict[tuple[str, str], tuple[int, str]] = {}
    for key, facts in RECORDED["configs"].items():
        target, kernel = key.split()[:2]
        best = worst.get((target, kernel))
        if best is None or facts["registers"] > best[0]:
            worst[(target, kernel)] = (facts["registers"], key)
    return sorted(key for _, key in worst.values())


@pytest.mark.slow
def test_live_compiles_hold_the_recorded_facts():
    """The heaviest configuration of every kernel, compiled now for sm_80 and sm_90, has
    no more registers, spills, barriers, layout conversions or scalar accesses than
    recorded (the whole range: ``--shapes range``, a bench command of ~15 minutes)."""
    chain = build_check.toolchain()
    if not chain["ok"]:
        pytest.skip(f"Triton's NVIDIA toolchain is unavailable: {chain['reason']}")
    if chain["triton"] != RECORDED["triton"]:
        pytest.skip(f"facts recorded with Triton {RECORDED['triton']}, this is {chain['triton']}")
    keys = worst_configurations()
    report = build_check.run_check(shape_set="range", keys=keys, jobs=1)
    assert not report["worker_failures"], report["worker_failures"]
    compiled = {build_check.config_key(r) for r in report["results"] if r["error"] is None}
    assert compiled == set(keys), sorted(set(keys) ^ compiled)
    found = build_check.regressions(report, RECORDED)
    assert not found, "\n".join(found)
