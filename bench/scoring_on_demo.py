"""Every scoring recipe (``paper``, ``znorm``, ``relative``, ``fused``) on the demo's
categories, same models.

Trains the demo (``pyramidflow demo``'s models and data, into ``--out``), then evaluates
every category's test split with each recipe (template, spread and level scale from the
same good images, the threshold from the same held-out ones). Writes ``scoring_on_demo.json`` and
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
from pyramidflow.config import SCORINGS  # noqa: E402
from pyramidflow.demo import run_demo  # noqa: E402
from pyramidflow.io.datasets import open_category  # noqa: E402
from pyramidflow.metrics import decision_threshold  # noqa: E402
from pyramidflow.preprocess import load_stack  # noqa: E402

METRICS = ("pixel_auroc", "image_auroc", "aupro", "good_flagged")


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
        fit_part, held_out = detector._split(len(data.train))
        images = load_stack([data.train[i] for i in fit_part], detector.config)
        held = load_stack([data.train[i] for i in held_out], detector.config)
        rows[category] = {}
        for recipe in SCORINGS:
            detector.config = detector.config.replace(scoring=recipe)
            detector._compute_template(detector.model, images, progress=False)
            _, held_scores = detector.score_batch(held)
            quantile = detector.config.threshold_quantile
            detector.threshold, _ = decision_threshold(held_scores.numpy(), quantile)
            metrics = detector.evaluate(folder).metrics
            rows[category][recipe] = {k: metrics[k] for k in METRICS}
        print(category, json.dumps(rows[category]), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "scoring_on_demo.json").write_text(
        json.dumps({**meta, "categories": rows}, indent=1) + "\n"
    )
    lines = [
        f"Demo categories, same models, every scoring recipe; {meta['device_name']}, torch "
        f"{meta['torch']}. `{meta['command']}`",
        "",
        "| category | " + " | ".join(f"{m} {r}" for m in METRICS for r in SCORINGS) + " |",
        "|---" * (1 + len(SCORINGS) * len(METRICS)) + "|",
    ]
    for category, row in rows.items():
        cells = " | ".join(f"{row[r][m]:.4f}" for m in METRICS for r in SCORINGS)
        lines.append(f"| {category} | {cells} |")
    (args.results / "scoring_on_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
