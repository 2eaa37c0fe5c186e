"""Inference speed of a deployed model: eager PyTorch against onnxruntime, on the CPU.

The paper's model (L = 4, S = 4, C = 16, k = 7, CVN) at each ``--sizes`` value, random
weights (speed does not depend on them), batch 1: the exported inference graph
(:class:`pyramidflow.export.AnomalyGraph`: normalized image -> anomaly map and score,
template included) run eagerly under ``torch.inference_mode`` and, after
``export_onnx``, by onnxruntime's CPU execution provider with default settings. Both see
the same random images; every repeat runs one eager and one onnxruntime inference back to
back (order alternating), after one warm-up each, so both see the same machine load.
Reports the median seconds per image and images/s of each, their ratio, the export time,
the ONNX file size and the largest relative difference between the two maps.

Writes ``deploy_cpu.json`` under ``--out`` and prints a markdown table.

Run: ``python bench/bench_deploy.py --sizes 256 1024 --repeats 5``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from checkout import run_metadata  # noqa: E402

from pyramidflow import Config, PyramidFlow  # noqa: E402
from pyramidflow.io.export import AnomalyGraph, export_onnx  # noqa: E402


def paper_model(size: int, seed: int = 0) -> tuple[PyramidFlow, list[torch.Tensor]]:
    torch.manual_seed(seed)
    config = Config(image_size=size, levels=4, stacks=4, channels=16, volume_norm="CVN")
    model = PyramidFlow(config).eval()
    with torch.no_grad():  # random parameter networks: no block is the identity
        for name, param in model.named_parameters():
            if "param_net" in name:
                param.normal_(0.0, 0.02)
    template = [0.1 * torch.randn(16, size >> level, size >> level) for level in range(4)]
    return model, template


def bench_size(size: int, repeats: int, folder: Path) -> dict[str, Any]:
    import onnxruntime as ort

    model, template = paper_model(size)
    graph = AnomalyGraph(model, template)
    start = time.perf_counter()
    path = export_onnx(model, template, folder / f"paper_{size}.onnx")
    export_s = time.perf_counter() - start
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    gen = torch.Generator().manual_seed(size)
    images = [torch.randn(1, 3, size, size, generator=gen) for _ in range(repeats + 1)]

    def run_torch(x: torch.Tensor) -> tuple[float, np.ndarray]:
        begin = time.perf_counter()
        with torch.inference_mode():
            amap, _ = graph(x)
        return time.perf_counter() - begin, amap.numpy()

    def run_ort(x: torch.Tensor) -> tuple[float, np.ndarray]:
        feed = {"images": x.numpy()}
        begin = time.perf_counter()
        amap, _ = session.run(None, feed)
        return time.perf_counter() - begin, amap

    run_torch(images[0])  # warm-up (allocator, oneDNN primitives, ORT arenas)
    run_ort(images[0])
    torch_s, ort_s, max_rel = [], [], 0.0
    for i, x in enumerate(images[1:]):
        order = (run_torch, run_ort) if i % 2 == 0 else (run_ort, run_torch)
        outputs = {}
        for fn in order:
            seconds, amap = fn(x)
            (torch_s if fn is run_torch else ort_s).append(seconds)
            outputs[fn.__name__] = amap
        diff = np.abs(outputs["run_ort"] - outputs["run_torch"]).max()
        max_rel = max(max_rel, float(diff / np.abs(outputs["run_torch"]).max()))
    t_med, o_med = statistics.median(torch_s), statistics.median(ort_s)
    return {
        "size": size,
        "batch": 1,
        "repeats": repeats,
        "torch_s": t_med,
        "onnxruntime_s": o_med,
        "torch_images_per_s": 1.0 / t_med,
        "onnxruntime_images_per_s": 1.0 / o_med,
        "onnxruntime_speedup": t_med / o_med,
        "torch_s_all": torch_s,
        "onnxruntime_s_all": ort_s,
        "export_s": export_s,
        "onnx_mb": path.stat().st_size / 1e6,
        "max_rel_map_diff": max_rel,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per size (median)")
    parser.add_argument(
        "--repeats-large", type=int, help="timed runs for sizes above 512 (default --repeats)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    meta = run_metadata("cpu", argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            repeats = args.repeats_large if size > 512 and args.repeats_large else args.repeats
            rows.append(bench_size(size, repeats, Path(tmp)))
            print(f"{size} px done", file=sys.stderr, flush=True)
    result = {
        **meta,
        "onnxruntime": ort.__version__,
        "model": "paper: L=4, S=4, C=16, k=7, CVN, random weights, batch 1, float32",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy_cpu.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"{result['device_name']}, {result['threads']} threads, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")  # fmt: skip
    print("| size | runs | eager torch img/s | onnxruntime img/s | ORT / torch | export s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['size']} | {row['repeats']} | {row['torch_images_per_s']:.3g} "
            f"| {row['onnxruntime_images_per_s']:.3g} | {row['onnxruntime_speedup']:.2f} "
            f"| {row['export_s']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
