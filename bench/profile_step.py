"""Where a training step's time goes, recompute versus store: convolutions and the rest.

Profiles training steps of both memory modes, alternating (``torch.profiler``, CPU
activities; the median of each figure over ``--steps`` steps per mode), after warm-up,
on the model of ``memory_depth.py`` (B = 2, L = 4, C = 16, k = 7), and reports the self
time of the convolutions (forward and backward separately), of everything else, and the
number of convolution calls. This is what the recompute / store time ratio is made of:
recompute evaluates each parameter network once more (forward only), so with a
convolution backward costing about twice the forward the floor is 4/3; the profile
shows how close a run is to it and what the remainder costs. The pyramid's depthwise
blur is also a convolution; its calls are few and cheap, and they are included.

Writes ``profile_step_<device>.json`` under ``--out``.

Run: ``python bench/profile_step.py --size 256 --stacks 4``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from checkout import run_metadata  # noqa: E402
from memory_depth import MODES, build, synchronize, train_step  # noqa: E402

CONV_KERNELS = {"aten::mkldnn_convolution", "aten::cudnn_convolution"}  # one per call
CONV_FORWARD = CONV_KERNELS | {"aten::_convolution", "aten::convolution", "aten::conv2d"}
CONV_BACKWARD = {"aten::convolution_backward"}


def profile_mode(model, images, optimizer, mode: str, device: str) -> dict[str, Any]:
    """Self time (ms) of convolution forward, backward and the rest for one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with profile(activities=activities) as prof:
        train_step(model, images, optimizer, mode)
        synchronize(device)
    use_cuda = device.startswith("cuda")
    totals = {"conv_forward_ms": 0.0, "conv_backward_ms": 0.0, "other_ms": 0.0}
    calls = {"conv_forward_calls": 0, "conv_backward_calls": 0}
    for event in prof.key_averages():
        self_us = event.self_device_time_total if use_cuda else event.self_cpu_time_total
        if event.key in CONV_FORWARD:
            totals["conv_forward_ms"] += self_us / 1000
            if event.key in CONV_KERNELS:
                calls["conv_forward_calls"] += event.count
        elif event.key in CONV_BACKWARD:
            totals["conv_backward_ms"] += self_us / 1000
            calls["conv_backward_calls"] += event.count
        else:
            totals["other_ms"] += self_us / 1000
    return {**totals, **calls, "total_ms": sum(totals.values())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--stacks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index]")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    model, images, optimizer = build(args.size, args.stacks, args.device)
    for _ in range(args.warmup):
        for mode in MODES:
            train_step(model, images, optimizer, mode)
    samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for index in range(args.steps):
        for mode in MODES if index % 2 == 0 else MODES[::-1]:
            samples[mode].append(profile_mode(model, images, optimizer, mode, args.device))
    result = {
        mode: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
        for mode, runs in samples.items()
    }
    rec, sto = result["recompute"], result["store"]
    summary = {
        "conv_total_ratio": (rec["conv_forward_ms"] + rec["conv_backward_ms"])
        / (sto["conv_forward_ms"] + sto["conv_backward_ms"]),
        "store_conv_backward_over_forward": sto["conv_backward_ms"] / sto["conv_forward_ms"],
        "step_ratio": rec["total_ms"] / sto["total_ms"],
        "other_share_of_recompute": rec["other_ms"] / rec["total_ms"],
    }
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    report = {
        **run_metadata(args.device),
        "size": args.size,
        "stacks": args.stacks,
        "modes": result,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_step_{tag}.json").write_text(json.dumps(report, indent=1))
    for mode in MODES:
        r = result[mode]
        print(
            f"{mode:9s} conv forward {r['conv_forward_ms']:8.1f} ms ({r['conv_forward_calls']} "
            f"calls)  conv backward {r['conv_backward_ms']:8.1f} ms "
            f"({r['conv_backward_calls']} calls)  other {r['other_ms']:7.1f} ms  "
            f"total {r['total_ms']:8.1f} ms"
        )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
