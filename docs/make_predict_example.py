"""Make docs/predict_example.png: what `pyramidflow predict` writes, on synthetic data.

Trains the demo's model on the synthetic "grain" category (about a minute on two CPU
cores), runs ``pyramidflow predict`` on one good and two defective test images, and puts
image, overlay and mask of each side by side::

    python docs/make_predict_example.py [--work DIR] [--out docs/predict_example.png]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pyramidflow.api import Detector
from pyramidflow.cli import main as cli_main
from pyramidflow.demo import DEMO_DATA_SIZE, demo_config
from pyramidflow.synthetic import generate_category
from pyramidflow.viz import to_display

CATEGORY = "grain"
PICKS = ("good", "crack", "stain")  # test/<type>/000.png of each
CELL, GAP, HEAD, LEFT = 128, 4, 18, 150


def _tile(path: Path) -> Image.Image:
    with Image.open(path) as image:
        pixels = to_display(np.asarray(image))
    return Image.fromarray(pixels).resize((CELL, CELL), Image.Resampling.NEAREST)


def compose(out_dir: Path, target: Path) -> Path:
    """Rows of (image, overlay, mask) with the file's type, score and decision."""
    with open(out_dir / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    width = LEFT + 3 * CELL + 2 * GAP
    height = HEAD + len(rows) * CELL + (len(rows) - 1) * GAP
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(("image", "NAME_overlay.png", "NAME_mask.png")):
        draw.text((LEFT + col * (CELL + GAP) + 4, 3), title, fill="black")
    for i, row in enumerate(rows):
        y = HEAD + i * (CELL + GAP)
        kind = Path(row["file"]).parent.name
        draw.text((6, y + 40), f"test/{kind}", fill="black")
        draw.text((6, y + 56), f"score {float(row['score']):.3g}", fill="black")
        draw.text(
            (6, y + 72),
            row["decision"],
            fill="#c0392b" if row["decision"] == "anomalous" else "black",
        )
        for col, path in enumerate(
            (Path(row["file"]), out_dir / row["overlay"], out_dir / row["mask"])
        ):
            sheet.paste(_tile(path), (LEFT + col * (CELL + GAP), y))
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target, optimize=True)
    return target


def make_example(work: Path, target: Path) -> Path:
    """Generate data, train, predict, compose; returns the picture's path."""
    folder = generate_category(work / "data", CATEGORY, size=DEMO_DATA_SIZE)
    model = work / f"{CATEGORY}.safetensors"
    if not model.is_file():
        Detector(demo_config(CATEGORY)).fit(folder, progress=True).save(model)
    images = [folder / "test" / kind / "000.png" for kind in PICKS]
    out_dir = work / "predictions"
    argv = ["predict", str(model), *map(str, images), "--out", str(out_dir), "--overwrite"]
    if cli_main(argv) != 0:
        raise SystemExit("predict failed")
    return compose(out_dir, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep data, model and outputs here")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("predict_example.png"))
    args = parser.parse_args()
    if args.work is not None:
        path = make_example(args.work, args.out)
    else:
        with tempfile.TemporaryDirectory() as work:
            path = make_example(Path(work), args.out)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
