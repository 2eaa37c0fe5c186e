"""Large and hostile images: time and peak memory of ``pyramidflow predict`` per input, and
the memory per pixel of each geometry.

Every case runs in a fresh process (``python -m pyramidflow ...``, as a user runs it); its
peak RSS is the ``ru_maxrss`` that ``os.wait4`` returns for exactly that process. Cases:

- ``bomb_png``: a 20000 x 20000 PNG of zeros (0.4 MB): must be refused in one line;
- ``bomb_tiff``: a real 40000 x 40000 zlib TIFF of zeros (tiled, ~2 MB on the disk): must
  be refused in one line within 5 s (the process runs under a 6 GB address-space limit, so
  a regression fails here instead of taking the machine down); ``seconds`` is the whole
  command (Python, torch and the model load included), ``refusal_in_process_s`` the
  reader's refusal alone;
- ``gray_8000``: an 8000 x 8000 8-bit gray PNG of noise, scored (target < 1.2 GB peak);
- ``gray_8000_full``: the same with ``--overlay-size full`` (full-size overlay and mask);
- ``gray_16384``: a 16384 x 16384 8-bit gray PNG (noise), scored;
- ``read_8000`` / ``read_16384``: the process that only imports pyramidflow and decodes
  the file: the floor the predict numbers sit on;
- ``native_S`` / ``native_train_S``: a native-geometry model (paper size: L 4, S 4, C 16,
  k 7, gray) scoring one S x S image, and one training step on two S x S images (B 2):
  the memory per pixel when the model itself runs at full size.

The model of the predict cases is trained here, at 64 px on 8 gray images (seconds).
Writes ``bench/results/large_images.json``. Heavy: run it behind ``nice``:

    nice -n 10 python bench/large_images.py          # all cases, ~3-5 minutes on 2 cores
    python bench/large_images.py --cases bomb_png bomb_tiff
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from checkout import ensure_kernels_importable, run_metadata  # noqa: E402

CASES = (
    "bomb_png", "bomb_tiff", "read_8000", "gray_8000", "gray_8000_full", "read_16384",
    "gray_16384", "native_256", "native_512", "native_train_256", "native_train_512",
)  # fmt: skip
ADDRESS_LIMIT = 6 * 2**30  # the hostile cases' safety net


def measure(command: list[str], *, address_limit: int | None = None) -> dict[str, Any]:
    """Run ``command`` in a fresh process: exit code, seconds, peak RSS (MB) and the last
    lines of its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")])}

    def limit() -> None:
        if address_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_limit, address_limit))

    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=err, env=env, preexec_fn=limit
        )
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode("utf-8", "replace").strip().splitlines()
    return {
        "exit": process.returncode,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "stderr": lines[-3:],
        "stderr_lines": len(lines),
    }


def make_inputs(folder: Path, cases: list[str]) -> dict[str, Path]:
    import numpy as np
    import tifffile
    from PIL import Image

    paths: dict[str, Path] = {}
    rng = np.random.default_rng(0)
    if "bomb_png" in cases:
        paths["bomb_png"] = folder / "zeros_20000.png"
        Image.new("L", (20000, 20000)).save(paths["bomb_png"], compress_level=9)
    if "bomb_tiff" in cases:
        paths["bomb_tiff"] = folder / "zeros_40000.tif"
        tile = np.zeros((1024, 1024), np.uint8)
        count = (40000 // 1024 + 1) ** 2
        tifffile.imwrite(
            paths["bomb_tiff"], (tile for _ in range(count)), shape=(40000, 40000),
            dtype=np.uint8, tile=(1024, 1024), compression="zlib",
        )  # fmt: skip
    for size in (8000, 16384):
        if any(c.endswith(str(size)) or c.startswith(f"gray_{size}") for c in cases):
            path = folder / f"noise_{size}.png"
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels).save(path, compress_level=1)
            del pixels
            paths[f"noise_{size}"] = path
    return paths


def train_model(folder: Path) -> Path:
    ensure_kernels_importable()
    import numpy as np

    from pyramidflow import Config, Detector

    rng = np.random.default_rng(1)
    images = [rng.integers(60, 200, (96, 96), dtype=np.uint8) for _ in range(8)]
    config = Config(image_size=64, levels=3, stacks=1, channels=8, kernel_size=3, epochs=1)
    return Detector(config).fit(images).save(folder / "gray64.safetensors")


def native_child(size: int, train: bool) -> None:
    """One native-geometry inference (or training step) at ``size``: run in a child."""
    ensure_kernels_importable()
    import numpy as np
    import torch

    from pyramidflow import Config, Detector, PyramidFlow
    from pyramidflow.model.flow import level_sizes

    config = Config(
        image_size=size, in_channels=1, geometry="native", epochs=1, normalization="fixed",
        mean=(0.5,), std=(0.25,), holdout_fraction=0.0,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    if train:
        images = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(2)]
        Detector(config).fit(images)
        return
    det = Detector(config)
    det.model = PyramidFlow(config).eval()
    det.template = [
        torch.zeros(config.channels, h, w) for h, w in level_sizes(config.image_size, config.levels)
    ]
    det.predict(rng.integers(0, 256, (size, size), dtype=np.uint8))


def refusal_seconds(path: Path) -> float:
    """Seconds ``read_array`` takes to refuse ``path`` in this process (imports done)."""
    ensure_kernels_importable()
    from pyramidflow.errors import DataError
    from pyramidflow.io.images import read_array

    start = time.perf_counter()
    try:
        read_array(path)
    except DataError:
        return round(time.perf_counter() - start, 4)
    raise AssertionError(f"{path} was not refused")


def read_child(path: str) -> None:
    ensure_kernels_importable()
    from pyramidflow.io.images import read_array

    read_array(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "large_images.json"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, value = args.child[0], args.child[1]
        if kind == "read":
            read_child(value)
        else:
            native_child(int(value), train=kind == "native_train")
        return

    results: dict[str, Any] = {"meta": run_metadata("cpu"), "cases": {}}
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = make_inputs(folder, args.cases)
        model = train_model(folder) if any(
            c.startswith(("bomb", "gray")) for c in args.cases
        ) else None  # fmt: skip
        predict = [sys.executable, "-m", "pyramidflow", "predict", str(model), "--no-progress"]
        for case in args.cases:
            out = ["--out", str(folder / f"out_{case}")]
            if case.startswith("bomb"):
                row = measure([*predict, str(inputs[case]), *out], address_limit=ADDRESS_LIMIT)
                row["file_mb"] = round(inputs[case].stat().st_size / 2**20, 2)
                row["refusal_in_process_s"] = refusal_seconds(inputs[case])
            elif case.startswith("read_"):
                row = measure([*me, "read", str(inputs[f"noise_{case[5:]}"])])
            elif case.startswith("gray_"):
                size = case.split("_")[1]
                extra = ["--overlay-size", "full"] if case.endswith("_full") else []
                row = measure([*predict, str(inputs[f"noise_{size}"]), *out, *extra])
                written = folder / f"out_{case}"
                row["outputs_mb"] = {
                    p.name: round(p.stat().st_size / 2**20, 1)
                    for p in sorted(written.iterdir())
                    if p.suffix in (".tiff", ".png")
                }
            else:
                kind, size = case.rsplit("_", 1)
                row = measure([*me, kind, size])
                row["pixels"] = int(size) ** 2
            results["cases"][case] = row
            print(case, json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
