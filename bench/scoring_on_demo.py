"""The ``paper`` and ``znorm`` scoring recipes on the demo's categories, same models.

Trains the demo (``pyramidflow demo``'s models and data, into ``--out``), then evaluates
every category's test split with the paper's recipe and with ``znorm`` (the spread from
the same good images the template comes from). Writes ``scoring_on_demo.json`` and
``.md`` under ``--results``.

Run: ``python bench/scoring_on_demo.py``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from checkout import ensure_kernels_importable, run_metadata

ensure_kernels_importable()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyramidflow import Detector  # noqa: E402
from pyramidflow.demo import run_demo  # noqa: E402
from pyramidflow.io.datasets import open_category  # noqa: E402
from pyramidflow.preprocess import load_stack  # noqa: E402
from pyramidflow.training.template import compute_template_and_spread  # noqa: E402

METRICS = ("pixel_auroc", "image_auroc", "aupro")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/pyramidflow-scoring-demo"))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    meta = run_metadata("cpu", argv)
    summary = run_demo(args.out, progress=False)
    rows = {}
    for category in summary["categories"]:
        detector = Detector.load(args.out / category / "model.safetensors")
        folder = args.out / "data" / category
        data = open_category(folder)
        fit_part, _ = detector._split(len(data.train))
        images = load_stack([data.train[i] for i in fit_part], detector.config)
        paper = detector.evaluate(folder).metrics
        detector.template, detector.spread = compute_template_and_spread(detector.model, images)
        detector.config = detector.config.replace(scoring="znorm")
        znorm = detector.evaluate(folder).metrics
        rows[category] = {"paper": {k: paper[k] for k in METRICS},
                          "znorm": {k: znorm[k] for k in METRICS}}  # fmt: skip
        print(category, json.dumps(rows[category]), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "scoring_on_demo.json").write_text(
        json.dumps({**meta, "categories": rows}, indent=1) + "\n"
    )
    lines = [
        f"Demo categories, same models, paper vs znorm scoring; {meta['device_name']}, torch "
        f"{meta['torch']}. `{meta['command']}`",
        "",
        "| category | " + " | ".join(f"{m} paper | {m} znorm" for m in METRICS) + " |",
        "|---" * (1 + 2 * len(METRICS)) + "|",
    ]
    for category, row in rows.items():
        cells = " | ".join(f"{row['paper'][m]:.4f} | {row['znorm'][m]:.4f}" for m in METRICS)
        lines.append(f"| {category} | {cells} |")
    (args.results / "scoring_on_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
