"""``pyramidflow train`` end to end at high resolution on a folder of 16-bit images.

Writes ``--images`` 16-bit grayscale PNGs of ``--size`` px (a smooth random texture using
the whole 16-bit range, so the 8-bit ImageNet statistics do not apply), then runs the
command-line ``pyramidflow train`` on the folder with ``geometry = "native"`` (the model
trains at the images' own size), the paper's model otherwise (``--stacks`` may be
lowered to save time), and reports the exit code, the wall time, the child process's
peak RSS and what the model file holds.

Run: ``python bench/train_native.py --size 2048 --images 4 --epochs 1``
(writes ``results/train_native_<size>.json``).
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from checkout import run_metadata  # noqa: E402


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` 16-bit grayscale PNG textures of size x size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for index in range(count):
        field = np.zeros((size, size), np.float32)
        for _ in range(6):
            freq = rng.uniform(4, 40, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            field += np.sin(2 * np.pi * (freq[0] * yy + freq[1] * xx) + phase)
        field += 0.3 * rng.standard_normal((size, size)).astype(np.float32)
        field = (field - field.min()) / (field.max() - field.min())
        pixels = (field * 65535).round().astype(np.uint16)
        Image.fromarray(pixels).save(folder / f"good_{index:03d}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--stacks", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pyramidflow_native_") as tmp:
        data, model = Path(tmp) / "good", Path(tmp) / "model.safetensors"
        data.mkdir()
        write_images(data, args.images, args.size)
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"geometry": "native"}))
        command = [
            sys.executable, "-m", "pyramidflow", "train", str(data), "--out", str(model),
            "--config", str(config), "--epochs", str(args.epochs), "--stacks",
            str(args.stacks), "--no-progress",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result = {
            "command": " ".join(command[1:]), "size": args.size, "images": args.images,
            "epochs": args.epochs, "stacks": args.stacks, "returncode": done.returncode,
            "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
            "stderr_tail": done.stderr[-2000:],
        }  # fmt: skip
        if done.returncode == 0:
            sys.path.insert(0, str(ROOT))
            from pyramidflow import load_checkpoint

            loaded = load_checkpoint(model)
            cfg = loaded.config
            result["has_template"] = loaded.template is not None
            fields = ("image_size", "in_channels", "geometry", "normalization", "memory_budget")
            result["model_config"] = {k: getattr(cfg, k) for k in fields}
    print(json.dumps(result, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train_native_{args.size}.json"
    path.write_text(json.dumps({**run_metadata("cpu"), **result}, indent=1, default=str))
    if done.returncode != 0:
        raise SystemExit(f"pyramidflow train failed (exit {done.returncode})")


if __name__ == "__main__":
    main()
