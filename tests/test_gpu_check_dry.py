"""The prepared GPU check (``bench/gpu_check.py``) runs end to end on the CPU.

``--device cpu --tiny`` takes every code path of the CUDA run (copy bandwidth, op
benchmarks with byte counts and agreement, training steps for both backends and both
memory modes, the op checks against the float64 reference) with tiny shapes under
Triton's interpreter, in a subprocess; the JSON must have every section and key.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"

OP_ROWS = {
    ("pyramid_decompose", "forward"), ("pyramid_decompose", "backward"),
    ("pyramid_compose", "forward"), ("pyramid_compose", "backward"),
    ("fourier_loss", "forward"), ("fourier_loss", "backward"),
    ("anomaly_map", "forward"),
    ("affine_coupling train", "forward"), ("affine_coupling train", "backward"),
    ("affine_coupling eval", "forward"), ("affine_coupling eval", "backward"),
}  # fmt: skip


@pytest.mark.slow
def test_tiny_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(out.read_text())
    for key in ("device", "copy", "ops", "training", "resolution", "correctness", "errors",
                "skipped", "elapsed_s", "budget_s"):  # fmt: skip
        assert key in report, key
    assert report["errors"] == [] and report["skipped"] == []
    assert report["device"]["device"] == "cpu" and report["device"]["name"]
    assert report["device"]["triton_interpret"] == "1"
    assert report["copy"]["bytes_per_s"] > 0

    rows = {(r["op"], r["direction"], r["backend"]): r for r in report["ops"]}
    assert {(op, d) for op, d, _ in rows} == OP_ROWS
    for (op, direction, backend), row in rows.items():
        assert "error" not in row, row
        for key in ("median_s", "bytes", "gbytes_per_s", "pct_of_copy", "floor_s"):
            assert row[key] > 0, (op, direction, backend, key)
        if backend == "triton":
            assert row["rel_rms_vs_torch"] < 1e-4, (op, direction, row["rel_rms_vs_torch"])

    combos = {(r["backend"], r["memory"]) for r in report["training"]}
    assert combos == {(b, m) for b in ("torch", "triton") for m in ("recompute", "store")}
    for row in report["training"]:
        assert row["status"] == "ok", row
        assert row["median_step_s"] > 0 and row["finite"]

    # peak memory against resolution: the tiled and the untiled step both ran
    tiled, untiled = report["resolution"]
    assert tiled["status"] == untiled["status"] == "ok", report["resolution"]
    assert tiled["tiled_blocks"] and not untiled["tiled_blocks"]
    assert tiled["loss"] == pytest.approx(untiled["loss"], rel=1e-5)

    # the suite's pyramid op tests, run by the script (on a GPU: every Triton op test)
    assert len(report["correctness"]) >= 10
    assert all(c["op"].startswith("test_triton_pyramid::") for c in report["correctness"])
    failed = [c for c in report["correctness"] if not c["ok"]]
    assert not failed, failed
    assert "op checks on the device" in done.stdout.strip().splitlines()[-2]


def test_shell_entry_point_runs_with_python3_only(tmp_path):
    """The lent GPU machine has ``python3`` and no ``python``: the shell script must use it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    out = tmp_path / "gpu_check.json"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(SCRIPT.with_suffix(".sh")), "--device", "cpu", "--tiny",
         "--sections", "copy", "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    report = json.loads(out.read_text())
    assert report["device"]["device"] == "cpu" and report["copy"]["bytes_per_s"] > 0
