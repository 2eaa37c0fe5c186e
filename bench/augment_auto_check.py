"""What ``augment="auto"`` decides on the accuracy suite's and the demo's categories.

For each category: the stationarity ratio of its good training images (as
``Detector.fit`` computes it: on the prepared model-size images) and the decision, next
to the paper's choice for that kind of category (textures augmented, objects not).

Run: ``python bench/augment_auto_check.py``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accuracy_data import CATEGORIES, write_category
from checkout import ensure_kernels_importable

ensure_kernels_importable()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyramidflow import Config  # noqa: E402
from pyramidflow.io.datasets import open_category  # noqa: E402
from pyramidflow.preprocess import load_stack  # noqa: E402
from pyramidflow.synthetic import TEXTURE_CATEGORIES, generate_category  # noqa: E402
from pyramidflow.training.loop import resolve_augment  # noqa: E402

SUITE_TEXTURES = ("fractal", "pebbles", "fibres")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--data", type=Path, default=Path("/tmp/pyramidflow-augment-auto"))
    args = parser.parse_args(argv)
    folders = {c: write_category(args.data / "suite", c, size=args.size, n_train=60)
               for c in CATEGORIES}  # fmt: skip
    for category in ("weave", "grain", "tile", "disc"):
        folders[category] = generate_category(args.data / "demo", category, size=args.size)
    config = Config(image_size=args.size, augment="auto")
    print("| category | stationarity ratio | auto augments | paper's choice |")
    print("|---|---|---|---|")
    for category, folder in folders.items():
        images = load_stack(open_category(folder).train, config)
        resolved, ratio = resolve_augment(config, images)
        paper = category in SUITE_TEXTURES or category in TEXTURE_CATEGORIES
        print(f"| {category} | {ratio:.3f} | {resolved.augment} | {paper} |")


if __name__ == "__main__":
    main()
