"""Model-side levers on the accuracy suite: levels, channels, depth, kernel and epochs.

Every lever is one change of the suite's base model (``--levels``, ``--stacks``,
``--channels``, ``--kernel-size``, ``--epochs`` of ``bench/accuracy_suite.py``), trained
on every category and seed and scored with the given recipes exactly as the suite does
(statistics and thresholds from good images only). The table gives, per lever, the mean
training time of one model (CPU seconds of the training process, one thread by default so
that spinning threads on a loaded machine do not count; compare within one run of this
script, without ``--cache`` hits from other runs) and the mean over
categories of pixel AUROC, image AUROC and AUPRO@0.3 with its spread over seeds, plus the
image AUROC per category.

Writes ``model_levers.json`` and ``.md`` under ``--out``.

Run: ``python bench/model_levers.py --size 64 --seeds 0 1 2 --stacks 2 --kernel-size 5``
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from accuracy_suite import RECIPES, run_category, suite_parser, suite_runs, summary
from checkout import run_metadata

#: lever name -> the settings it changes from the base model
LEVERS: dict[str, dict[str, int]] = {
    "base": {},
    "epochs 20": {"epochs": 20},
    "levels 3": {"levels": 3},
    "levels 5": {"levels": 5},
    "channels 32": {"channels": 32},
    "epochs 5": {"epochs": 5},
    "stacks 4, kernel 7": {"stacks": 4, "kernel_size": 7},
    "channels 8": {"channels": 8},
}
METRICS = ("pixel_auroc", "image_auroc", "aupro")


def lever_rows(results: list[dict], recipe: str, metric: str, seeds: list[int]) -> list[float]:
    """The mean over categories of one metric, one value per seed."""
    return [
        statistics.mean(r["recipes"][recipe][metric] for r in results if r["seed"] == s)
        for s in seeds
    ]


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser(__doc__.splitlines()[0])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    parser.add_argument("--recipes", nargs="+", default=["paper", "fused"], choices=RECIPES)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU seconds count work, not spinning)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = run_metadata("cpu", argv)
    base = {"epochs": args.epochs, "levels": args.levels, "stacks": args.stacks,
            "channels": args.channels, "kernel_size": args.kernel_size}  # fmt: skip
    runs: dict[str, dict] = {}
    for lever in args.levers:
        settings = {**base, **LEVERS[lever]}
        lever_args = argparse.Namespace(**{**vars(args), **settings})
        results = []
        for folder, category, seed in suite_runs(lever_args):
            results.append(run_category(folder, category, seed, lever_args))
            row = results[-1]["recipes"]
            print(lever, category, seed, f"{results[-1]['train_cpu_seconds']:.0f} CPU s",
                  json.dumps({r: round(row[r]["image_auroc"], 3) for r in args.recipes}),
                  flush=True)  # fmt: skip
        runs[lever] = {"settings": settings, "results": results}
        write_report(runs, args, meta)  # after every lever: a long run keeps what it measured


def write_report(runs: dict[str, dict], args: argparse.Namespace, meta: dict) -> None:
    """``model_levers.json`` and ``.md`` of the levers measured so far."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_levers.json").write_text(
        json.dumps(
            {**meta, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1
        )
        + "\n"  # fmt: skip
    )
    lines = [
        f"Model-side levers on the accuracy suite, {args.size} px, {args.train} good training "
        f"images; base L {args.levels} S {args.stacks} C {args.channels} k {args.kernel_size}, "
        f"{args.epochs} epochs; mean over categories, ± std over seeds {args.seeds}; "
        f"`{meta['command']}`",
        "",
        "| lever | train CPU s / model | recipe | pixel AUROC | image AUROC | AUPRO@0.3 | "
        + " | ".join(f"image {c}" for c in args.categories)
        + " |",
        "|---" * (6 + len(args.categories)) + "|",
    ]
    for lever, run in runs.items():
        results = run["results"]
        seconds = statistics.mean(r["train_cpu_seconds"] for r in results)
        for recipe in args.recipes:
            cells = [summary(lever_rows(results, recipe, m, args.seeds)) for m in METRICS]
            cells += [
                "{:.3f}".format(statistics.mean(
                    r["recipes"][recipe]["image_auroc"] for r in results if r["category"] == c
                ))
                for c in args.categories
            ]  # fmt: skip
            lines.append(f"| {lever} | {seconds:.0f} | {recipe} | " + " | ".join(cells) + " |")
    (args.out / "model_levers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
