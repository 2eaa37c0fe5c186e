"""The long fuzz campaign of the image readers and the model loader (the mutations and
the rules are in tests/fuzz_inputs.py; CI runs 150 cases of seed 0).

Each seed runs in a fresh process, which reports its own peak RSS (VmHWM), and a
process that runs past ``--timeout`` is killed and counted as a hang. Writes
``bench/results/fuzz_campaign.json`` (counts per seed and in total, the slowest case,
every ``bad`` case) and prints the totals.

    nice -n 10 python bench/fuzz_campaign.py --seeds 100 101 --cases 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from checkout import run_metadata  # noqa: E402


def run_seed(seed: int, cases: int, max_pixels: int, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    command = [
        sys.executable, str(ROOT / "tests" / "fuzz_inputs.py"), "--seed", str(seed),
        "--cases", str(cases), "--max-pixels", str(max_pixels),
    ]  # fmt: skip
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, env=env)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        _, status = os.waitpid(process.pid, 0)
        hung = not timer.is_alive()
        timer.cancel()
        out.seek(0)
        text = out.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if hung or code != 0:
        return {"seed": seed, "cases": cases, "failed": "hang" if hung else f"exit {code}"}
    report = json.loads(text)
    report["peak_rss_mb"] = round(report["peak_rss_mb"], 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--max-pixels", type=int, default=2**22)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "fuzz_campaign.json"
    )
    args = parser.parse_args()
    runs = []
    total: Counter[str] = Counter()
    for seed in args.seeds:
        report = run_seed(seed, args.cases, args.max_pixels, args.timeout)
        runs.append(report)
        total.update(report.get("counts", {}))
        if "failed" in report:
            total["process failed (hang or crash)"] += 1
        print(json.dumps({k: v for k, v in report.items() if k != "bad"}), flush=True)
    summary = {
        "meta": run_metadata("cpu"),
        "total": dict(sorted(total.items())),
        "cases": sum(r["cases"] for r in runs),
        "bad": [b for r in runs for b in r.get("bad", [])],
        "slowest_case_s": max((r.get("slowest_case_s", 0.0) for r in runs), default=0.0),
        "peak_rss_mb": max((r.get("peak_rss_mb", 0.0) for r in runs), default=0.0),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("total", "cases", "slowest_case_s", "peak_rss_mb")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
