"""The convolution precision policy (``Config.conv_precision``) on the built-in demo.

Two measurements, each side by side in this one run:

1. Accuracy: the demo (``pyramidflow demo``'s data, settings and seed) trained and
   evaluated once per precision (``fp32`` and ``bf16`` by default) on the same data; per
   category the pixel AUROC (image AUROC and AUPRO too) and the difference to ``fp32``.
2. Step time: one demo-sized model (B = 2, 64 px, L = 4, S = 2, C = 16, k = 7, recompute)
   alternating training steps between the precisions (order ABBA..., after one warm-up step
   of each), so every precision sees the same machine load; the median of the per-round
   ratios to ``fp32``.

Also records whether the CPU has native bfloat16 arithmetic (``avx512_bf16`` or
``amx_bf16`` in /proc/cpuinfo): without it oneDNN emulates bfloat16 convolutions and the
CPU step-time ratio says nothing about a machine that has it (or about a GPU).

Run: ``nice -n 10 python bench/precision_check.py`` (writes
``results/precision_<device>.json``; ``--categories grain tile`` for fewer categories).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from checkout import ensure_kernels_importable, run_metadata

ensure_kernels_importable()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pyramidflow import Config, PyramidFlow  # noqa: E402
from pyramidflow.config import CONV_PRECISIONS  # noqa: E402
from pyramidflow.demo import DEMO_SETTINGS, run_demo  # noqa: E402
from pyramidflow.synthetic import DEMO_CATEGORIES  # noqa: E402

METRICS = ("pixel_auroc", "image_auroc", "aupro")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: The README's promise for bf16: within this much pixel AUROC of fp32 on every category.
AUROC_TOLERANCE = 0.01


def cpu_bf16_flags() -> dict[str, bool]:
    """Which native bfloat16 instruction sets the CPU reports (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return {name: name in flags for name in NATIVE_BF16_FLAGS}


def accuracy(out: Path, categories: list[str], precisions: list[str], device: str) -> dict:
    """The demo once per precision on the same data; metrics per category and precision."""
    data = out / "data"
    rows: dict[str, dict[str, dict[str, float]]] = {c: {} for c in categories}
    seconds = {}
    for precision in precisions:
        start = time.perf_counter()
        summary = run_demo(
            out / precision, data_dir=data, categories=categories, device=device,
            overrides={"conv_precision": precision}, progress=False,
        )  # fmt: skip
        seconds[precision] = round(time.perf_counter() - start, 1)
        for category in categories:
            row = summary["categories"][category]
            rows[category][precision] = {k: row[k] for k in METRICS}
    baseline = precisions[0]
    for category in categories:
        for precision in precisions[1:]:
            row = rows[category][precision]
            row["pixel_auroc_minus_" + baseline] = (
                row["pixel_auroc"] - rows[category][baseline]["pixel_auroc"]
            )
    differences = [abs(row[p]["pixel_auroc_minus_" + baseline]) for row in rows.values()
                   for p in precisions[1:]]  # fmt: skip
    return {
        "per_category": rows,
        "max_abs_pixel_auroc_difference": max(differences, default=0.0),
        "within_tolerance": max(differences, default=0.0) <= AUROC_TOLERANCE,
        "demo_seconds": seconds,
    }


def step_times(precisions: list[str], rounds: int, device: str) -> dict[str, Any]:
    """Median training-step seconds per precision, alternated on one model, and the
    median per-round ratio to the first precision."""
    torch.manual_seed(0)
    settings = {k: v for k, v in DEMO_SETTINGS.items() if k != "epochs"}
    model = PyramidFlow(Config(**settings)).to(device).train()
    for block in model.blocks:  # the zero-initialised last convolution would hide the flow
        torch.nn.init.normal_(block.param_net[2].weight, std=1e-3)
    size = DEMO_SETTINGS["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    images = images.to(device)
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for index in range(rounds + 1):
        order = precisions if index % 2 == 0 else precisions[::-1]
        for precision in order:
            model.set_conv_precision(precision)
            model.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model.loss(model(images)).backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            if index > 0:
                times[precision].append(time.perf_counter() - start)
    base = times[precisions[0]]
    return {
        "step_s": {p: statistics.median(v) for p, v in times.items()},
        "step_s_all": times,
        "ratio_to_" + precisions[0]: {
            p: statistics.median(t / b for t, b in zip(v, base, strict=True))
            for p, v in times.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES),
                        choices=DEMO_CATEGORIES)  # fmt: skip
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=CONV_PRECISIONS, help="the first is the baseline")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per precision")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--skip-accuracy", action="store_true", help="step times only")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pyramidflow-precision"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        **run_metadata(args.device, argv),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "settings": DEMO_SETTINGS,
        "categories": args.categories,
        "auroc_tolerance": AUROC_TOLERANCE,
    }
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"precision_{tag}.json"
    report["step_time"] = step_times(args.precisions, args.rounds, args.device)
    print("step time", json.dumps(report["step_time"]["ratio_to_" + args.precisions[0]]))
    path.write_text(json.dumps(report, indent=1) + "\n")
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(args.out, args.categories, args.precisions, args.device)
        for category, row in report["accuracy"]["per_category"].items():
            cells = "  ".join(f"{p} {v['pixel_auroc']:.4f}" for p, v in row.items())
            print(f"{category:<8} pixel AUROC  {cells}")
        path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
