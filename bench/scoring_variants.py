"""Image-score and map variants tried on the accuracy suite, beside the library's recipes.

Every variant is computed from the latents of the same trained models as
``bench/accuracy_suite.py`` (pass the same settings and ``--cache`` to reuse them), with
statistics from the good training images only:

- ``relative``: the library's recipe (map over its own mean, score = max);
- ``top1%``: ``relative``'s map, score = mean of its top 1 % pixels;
- ``median``: ``relative`` with the per-element median of the good latents as template;
- ``squared``: ``relative`` composing (|u - T| / s)^2 instead of |u - T| / s;
- ``pooled``: template 0 and spread 1 of the standardized latents (a template pooled over
  positions, for stationary textures);
- ``levels-z``: every level's own relative map maximum, z-scored against the good
  training images' maxima of that level, summed over levels;
- ``fused``: the library's recipe (every level's maximum over its good mean, averaged).

Writes ``scoring_variants.json`` and ``.md`` under ``--out``.

Run: ``python bench/scoring_variants.py --size 64 --seeds 0 1 2 --stacks 2 --kernel-size 5``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from accuracy_suite import latents_of, suite_detector, suite_parser, suite_runs
from checkout import run_metadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyramidflow.io.datasets import open_category  # noqa: E402
from pyramidflow.io.images import read_mask  # noqa: E402
from pyramidflow.metrics import image_auroc, pixel_auroc  # noqa: E402
from pyramidflow.model.scoring import (  # noqa: E402
    gaussian_blur,
    level_maxima,
    smoothing_sigma,
    standardize_per_image,
)
from pyramidflow.preprocess import load_stack, model_mask  # noqa: E402
from pyramidflow.training.template import SPREAD_FLOOR  # noqa: E402

VARIANTS = ("relative", "top1%", "median", "squared", "pooled", "levels-z", "fused")


def moments(latents: list[torch.Tensor], median: bool = False) -> tuple[list, list]:
    """Template (mean or median) and floored spread of every latent element, as the library."""
    template, spread = [], []
    for z in latents:
        z = z.double()
        variance = z.var(0, unbiased=False)
        variance = variance + SPREAD_FLOOR * variance.mean()
        template.append((z.median(0).values if median else z.mean(0)).float())
        spread.append(variance.sqrt().float())
    return template, spread


def relative_map(model, latents, template, spread, power: int = 1) -> torch.Tensor:
    residuals = [
        ((z - t) / s).abs() ** power for z, t, s in zip(latents, template, spread, strict=True)
    ]
    amap, _ = model.anomaly_map(residuals, [torch.zeros_like(t) for t in template])
    amap = gaussian_blur(amap, smoothing_sigma(amap.shape[-2]))
    return amap / amap.mean(dim=(-2, -1), keepdim=True)


@torch.no_grad()
def run_category(folder: Path, category: str, seed: int, args: argparse.Namespace) -> dict:
    detector, *_ = suite_detector(folder, category, seed, args)
    model, config = detector.model.eval(), detector.model.config
    data = open_category(folder)
    fit_part, _ = detector._split(len(data.train))
    train = standardize_per_image(
        latents_of(detector, load_stack([data.train[i] for i in fit_part], config))
    )
    test = standardize_per_image(latents_of(detector, load_stack([s.path for s in data.test],
                                                                    config)))  # fmt: skip
    masks = np.stack([
        model_mask(read_mask(s.mask_path), config) if s.mask_path else
        np.zeros(config.image_size, bool)
        for s in data.test
    ])  # fmt: skip
    labels = masks.reshape(masks.shape[0], -1).any(1)
    template, spread = moments(train)
    maps = {
        "relative": relative_map(model, test, template, spread),
        "median": relative_map(model, test, moments(train, median=True)[0], spread),
        "squared": relative_map(model, test, template, spread, power=2),
        "pooled": relative_map(
            model,
            test,
            [torch.zeros_like(t) for t in template],
            [torch.ones_like(s) for s in spread],
        ),  # fmt: skip
    }
    scores = {name: m.flatten(1).amax(1) for name, m in maps.items()}
    flat = maps["relative"].flatten(1)
    scores["top1%"] = flat.topk(max(1, flat.shape[1] // 100), 1).values.mean(1)
    maps["top1%"] = maps["relative"]
    _, good_maxima = level_maxima(model, train, template, spread)
    fused_map, test_maxima = level_maxima(model, test, template, spread)
    z = (test_maxima - good_maxima.mean(0)) / good_maxima.std(0)
    scores["levels-z"], maps["levels-z"] = z.sum(1), fused_map
    scores["fused"], maps["fused"] = (test_maxima / good_maxima.mean(0)).mean(1), fused_map
    row = {
        name: {"pixel_auroc": pixel_auroc(maps[name].numpy(), masks),
               "image_auroc": image_auroc(scores[name].numpy(), labels)}
        for name in VARIANTS
    }  # fmt: skip
    return {"category": category, "seed": seed, "variants": row}


def main(argv: list[str] | None = None) -> None:
    args = suite_parser(__doc__.splitlines()[0]).parse_args(argv)
    meta = run_metadata("cpu", argv)
    results = []
    for folder, category, seed in suite_runs(args):
        results.append(run_category(folder, category, seed, args))
        print(category, seed, json.dumps(results[-1]["variants"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scoring_variants.json").write_text(
        json.dumps({**meta, "results": results}, indent=1) + "\n"
    )
    lines = [
        f"Scoring variants on the accuracy suite, {args.size} px, mean over seeds "
        f"{args.seeds}, pixel / image AUROC; `{meta['command']}`",
        "",
        "| category | " + " | ".join(VARIANTS) + " |",
        "|---" * (len(VARIANTS) + 1) + "|",
    ]
    for category in [*args.categories, "mean"]:
        rows = [r for r in results if category in ("mean", r["category"])]
        cells = [
            "{:.3f} / {:.3f}".format(
                *(statistics.mean(r["variants"][v][m] for r in rows)
                  for m in ("pixel_auroc", "image_auroc"))
            )
            for v in VARIANTS
        ]  # fmt: skip
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    (args.out / "scoring_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
