"""Scoring recipes side by side on the accuracy suite (``bench/accuracy_data.py``).

For every category and seed: one model trained on the good images with the paper's
training recipe (``pyramidflow.Detector``; augmentation for the textures, as the paper
does for MVTec textures), then every scoring recipe applied to the same latents:

- ``paper``: map = mean_c Compose(|z - T|), score = max of the map (method section 8);
- ``znorm``: each level's residual divided by the good images' standard deviation of
  that latent element, |z - T| / s, composed and smoothed (Gaussian, sigma 4 px per 256);
- ``relative``: ``znorm`` on latents standardized per image and channel, the smoothed map
  divided by its own mean (method section 8);
- ``fused``: ``relative``'s map; image score = the mean over pyramid levels of each
  level's own relative map maximum over its mean on the good training images;
- ``fused_peak``: ``fused``, or the unsmoothed ``relative`` map's peak over its mean on
  the good training images when that ratio is the larger (the library's default);
- ``fused+tta``: ``fused`` averaged over the 8 flips and quarter turns of the image
  (the texture augmentation's group), each map turned back first, the 8 scores averaged.

T and s come from the good training images only. Also: a trivial baseline that needs no
model (per-pixel mean and standard deviation of the raw pixels over the good training
images, map = mean over colours of |x - mean| / std, smoothed like the others), and the
recipe a label-free rule picks per category: synthetic defects (a noise blob, a patch
cut from elsewhere in the same image, a line) pasted into the held-out good images, the
recipe with the best mean of pixel and image AUROC on them; the report says how often
that pick is the recipe that is best on the real test labels. Per recipe, the threshold is
the library's (``pyramidflow.metrics.decision_threshold`` of the held-out good images'
scores); the tables give the share of good test images above it (false alarms) and of
defective ones (detected).

Writes ``accuracy_suite.json`` and ``.md`` under ``--out``.

Run: ``python bench/accuracy_suite.py --size 64 --seeds 0 1 2``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from accuracy_data import CATEGORIES, write_category
from checkout import ensure_kernels_importable, run_metadata

ensure_kernels_importable()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyramidflow import Config, Detector  # noqa: E402
from pyramidflow.io.datasets import open_category  # noqa: E402
from pyramidflow.io.images import read_mask  # noqa: E402
from pyramidflow.metrics import aupro, decision_threshold, image_auroc, pixel_auroc  # noqa: E402
from pyramidflow.model.scoring import (  # noqa: E402
    batch_slices,
    gaussian_blur,
    level_maxima,
    recipe_latents,
    score_latents,
    smoothing_sigma,
)
from pyramidflow.preprocess import load_stack, model_mask  # noqa: E402
from pyramidflow.training.template import LatentMoments  # noqa: E402

RECIPES = ("paper", "znorm", "relative", "fused", "fused_peak", "fused+tta")
TEXTURES = ("fractal", "pebbles", "fibres")


@torch.no_grad()
def latents_of(detector: Detector, images: torch.Tensor) -> list[torch.Tensor]:
    model = detector.model.eval()
    parts = [model(images[i : i + 8]) for i in range(0, images.shape[0], 8)]
    return [torch.cat(level) for level in zip(*parts, strict=True)]


def dihedral(images: torch.Tensor, index: int) -> torch.Tensor:
    """One of the 8 flips and quarter turns (the texture augmentation's group)."""
    flipped = images.flip(-1) if index >= 4 else images
    return torch.rot90(flipped, index % 4, (-2, -1))


def undo_dihedral(maps: torch.Tensor, index: int) -> torch.Tensor:
    turned = torch.rot90(maps, -(index % 4), (-2, -1))
    return turned.flip(-1) if index >= 4 else turned


class Scorer:
    """Every recipe's template and spread from the good training images of one model; the
    latents of every image set are computed once and shared by the recipes (the turned
    copies of ``+tta`` are encoded when asked for)."""

    def __init__(self, detector: Detector, train_images: torch.Tensor) -> None:
        self.detector = detector
        self.model = detector.model.eval()
        self.latents: dict[int, list[torch.Tensor]] = {}
        train = self._latents(train_images, 0)
        self.stats = {}
        for recipe in ("paper", "znorm", "relative", "fused", "fused_peak"):
            moments = LatentMoments(self.model.config, squares=recipe != "paper", device="cpu")
            moments.add(recipe_latents(train, recipe))
            dtype = train_images.dtype
            self.stats[recipe] = (
                (moments.template(dtype), None) if recipe == "paper"
                else moments.template_and_spread(dtype)
            )  # fmt: skip
        # as compute_level_scale, from the latents at hand (fused's are fused_peak's first L)
        _, maxima = level_maxima(self.model, train, *self.stats["fused_peak"], "fused_peak")
        self.level_scale = {
            "fused_peak": maxima.double().mean(0).to(train_images.dtype),
            "fused": maxima[:, :-1].double().mean(0).to(train_images.dtype),
        }

    def _latents(self, images: torch.Tensor, view: int) -> list[torch.Tensor]:
        if view:
            return latents_of(self.detector, dihedral(images, view))
        if id(images) not in self.latents:
            self.latents[id(images)] = latents_of(self.detector, images)
        return self.latents[id(images)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (N, H, W), scores (N,)) of one recipe; ``+tta``: the maps of the 8 flipped
        and turned copies turned back and averaged, and their scores averaged."""
        base, _, tta = recipe.partition("+")
        template, spread = self.stats[base]
        maps, scores = [], []
        for view in range(8 if tta else 1):
            latents = self._latents(images, view)
            parts = [
                score_latents(self.model, [z[part] for z in latents], template, spread, base,
                              self.level_scale.get(base))
                for part in batch_slices(images.shape[0], 8)
            ]  # fmt: skip
            maps.append(undo_dihedral(torch.cat([m for m, _ in parts]), view))
            scores.append(torch.cat([s for _, s in parts]))
        return torch.stack(maps).mean(0), torch.stack(scores).mean(0)


def baseline_maps(
    train: torch.Tensor, test: torch.Tensor, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0) + 1e-3
    maps = gaussian_blur(((test - mean) / std).abs().mean(1), sigma)
    return maps, maps.flatten(1).amax(1)


def metrics(
    maps: torch.Tensor,
    scores: torch.Tensor,
    masks: np.ndarray,
    threshold: float | None = None,
) -> dict[str, float]:
    """Pixel and image AUROC, AUPRO@0.3 and, given the threshold, the false-alarm rate
    (good images scored above it) and the detection rate (defective images above it)."""
    labels = masks.reshape(masks.shape[0], -1).any(1)
    maps_np = maps.numpy()
    out = {
        "pixel_auroc": pixel_auroc(maps_np, masks),
        "image_auroc": image_auroc(scores.numpy(), labels),
        "aupro": aupro(maps_np, masks),
    }
    if threshold is not None:
        above = scores.numpy() > threshold
        out["false_alarms"] = float(above[~labels].mean())
        out["detected"] = float(above[labels].mean())
    return out


def synthetic_defects(
    images: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """Held-out good images, each once as it is and once with each label-free synthetic
    defect (a noise blob, a patch cut from elsewhere in the same image and mirrored, a
    line), with their masks."""
    n, _, size, _ = images.shape
    yy, xx = np.mgrid[0:size, 0:size]
    out, masks = [images], [np.zeros((n, size, size), bool)]
    for kind in range(3):
        copies, copy_masks = images.clone(), np.zeros((n, size, size), bool)
        for i in range(n):
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            if kind == 0:
                mask = np.hypot(yy - cy, xx - cx) < rng.uniform(0.04, 0.08) * size
                noise = torch.from_numpy(rng.normal(0, 1.0, (3, size, size))).float()
                copies[i] = torch.where(torch.from_numpy(mask), images[i] + noise, images[i])
            elif kind == 1:
                side = max(2, int(rng.uniform(0.1, 0.18) * size))
                y0, x0 = (int(np.clip(c - side / 2, 0, size - side)) for c in (cy, cx))
                sy, sx = rng.integers(0, size - side, 2)
                patch = images[i, :, sy : sy + side, sx : sx + side].flip(-1)
                copies[i, :, y0 : y0 + side, x0 : x0 + side] = patch
                mask = np.zeros((size, size), bool)
                mask[y0 : y0 + side, x0 : x0 + side] = True
            else:
                angle = rng.uniform(0, np.pi)
                across = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
                along = np.abs((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle))
                mask = (across < 1.0) & (along < 0.2 * size)
                shift = float(rng.choice([-2.0, 2.0]))
                copies[i] = torch.where(torch.from_numpy(mask), images[i] + shift, images[i])
            copy_masks[i] = mask
        out.append(copies)
        masks.append(copy_masks)
    return torch.cat(out), np.concatenate(masks)


def trained_detector(
    folder: Path, config: Config, cache: Path | None
) -> tuple[Detector, float, float]:
    """(detector trained on ``folder``, training wall seconds, training CPU seconds of this
    process); with ``cache``, reused from an earlier run with the same data and settings
    (the file name holds every setting that changes training; the times are the run's that
    trained it)."""
    key = "-".join(
        f"{name}{getattr(config, name)}"
        for name in ("image_size", "epochs", "seed", "augment", "levels", "stacks",
                     "channels", "kernel_size", "volume_norm", "batch_size", "lr")
    )  # fmt: skip
    path = None
    if cache is not None:
        path = cache / folder.parent.name / folder.name / f"{key}.safetensors"
    if path is not None and path.exists():
        detector = Detector.load(path)
        info = detector.info
        return (detector, float(info.get("suite_train_seconds", float("nan"))),
                float(info.get("suite_train_cpu_seconds", float("nan"))))  # fmt: skip
    start, start_cpu = time.perf_counter(), time.process_time()
    detector = Detector(config).fit(folder)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        detector.info["suite_train_seconds"] = seconds
        detector.info["suite_train_cpu_seconds"] = cpu_seconds
        detector.save(path)
    return detector, seconds, cpu_seconds


def suite_detector(
    folder: Path, category: str, seed: int, args: argparse.Namespace
) -> tuple[Detector, float, float]:
    """The suite's model of one category and seed (trained, or reused from ``--cache``), its
    training wall and CPU seconds."""
    config = Config(
        image_size=args.size, epochs=args.epochs, seed=seed, augment=category in TEXTURES,
        levels=args.levels, stacks=args.stacks, channels=args.channels,
        kernel_size=args.kernel_size,
    )  # fmt: skip
    return trained_detector(folder, config, args.cache)


def suite_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every suite bench shares: data, model settings, cache and output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", type=int, default=60, help="good training images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--stacks", type=int, default=4)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--data", type=Path, default=Path("/tmp/pyramidflow-accuracy-suite"))
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder to keep trained models in and reuse them from")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser


def suite_runs(args: argparse.Namespace) -> Iterator[tuple[Path, str, int]]:
    """(data folder, category, seed) of every run, the data written on first use."""
    for category in args.categories:
        folder = write_category(args.data / str(args.size), category, size=args.size,
                                n_train=args.train)  # fmt: skip
        for seed in args.seeds:
            yield folder, category, seed


def run_category(folder: Path, category: str, seed: int, args: argparse.Namespace) -> dict:
    detector, train_seconds, train_cpu_seconds = suite_detector(folder, category, seed, args)
    data = open_category(folder)
    n = len(data.train)
    fit_part, held_out = detector._split(n)
    config = detector.model.config
    train_images = load_stack([data.train[i] for i in fit_part], config)
    held_images = load_stack([data.train[i] for i in held_out], config)
    test_images = load_stack([s.path for s in data.test], config)
    masks = np.stack([
        model_mask(read_mask(s.mask_path), config) if s.mask_path else
        np.zeros(config.image_size, bool)
        for s in data.test
    ])  # fmt: skip
    scorer = Scorer(detector, train_images)
    quantile = config.threshold_quantile
    rows = {}
    for r in args.recipes:
        _, held_scores = scorer(held_images, r)
        threshold, _ = decision_threshold(held_scores.numpy(), quantile)
        rows[r] = metrics(*scorer(test_images, r), masks, threshold)
    sigma = smoothing_sigma(args.size)
    _, held_scores = baseline_maps(train_images, held_images, sigma)
    threshold, _ = decision_threshold(held_scores.numpy(), quantile)
    rows["baseline"] = metrics(*baseline_maps(train_images, test_images, sigma), masks, threshold)
    synthetic, synthetic_masks = synthetic_defects(held_images, np.random.default_rng(seed))
    picks = {}
    for r in args.recipes:
        m = metrics(*scorer(synthetic, r), synthetic_masks)
        picks[r] = (m["pixel_auroc"] + m["image_auroc"]) / 2
    chosen = max(picks, key=picks.get)
    rows["auto"] = dict(rows[chosen])
    best_on_test = max(args.recipes, key=lambda r: rows[r]["pixel_auroc"] + rows[r]["image_auroc"])
    return {
        "category": category, "seed": seed, "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds, "recipes": rows,
        "auto_choice": chosen, "auto_is_best_on_test": chosen == best_on_test,
        "synthetic_scores": picks,
    }  # fmt: skip


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = suite_parser(__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="recipes to compare and pick from (+tta: 8 encodings)")  # fmt: skip
    args = parser.parse_args(argv)
    meta = run_metadata("cpu", argv)
    results = []
    for folder, category, seed in suite_runs(args):
        results.append(run_category(folder, category, seed, args))
        row = results[-1]
        print(category, seed, f"{row['train_seconds']:.0f} s", "auto:", row["auto_choice"],
              json.dumps({r: round(m["pixel_auroc"], 3) for r, m in row["recipes"].items()}),
              flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy_suite.json").write_text(
        json.dumps(
            {**meta, "args": {k: str(v) for k, v in vars(args).items()}, "results": results},
            indent=1,
        )
        + "\n"  # fmt: skip
    )
    names = ("baseline", *args.recipes, "auto")
    lines = [
        f"Accuracy suite, {args.size} px, {args.train} good training images, {args.epochs} "
        f"epochs, L {args.levels} S {args.stacks} C {args.channels} k {args.kernel_size}; "
        f"mean ± std over seeds {args.seeds}; `{meta['command']}`",
        "",
    ]
    for metric in ("pixel_auroc", "image_auroc", "aupro", "false_alarms", "detected"):
        lines += [f"**{metric}**", "", "| category | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]  # fmt: skip
        for category in [*args.categories, "mean"]:
            cells = []
            for name in names:
                if category == "mean":
                    values = [
                        statistics.mean(
                            r["recipes"][name][metric] for r in results if r["seed"] == s
                        )
                        for s in args.seeds
                    ]
                else:
                    values = [r["recipes"][name][metric] for r in results
                              if r["category"] == category]  # fmt: skip
                cells.append(summary(values))
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
        lines.append("")
    agree = sum(r["auto_is_best_on_test"] for r in results)
    picks = ", ".join(f"{r['category']}/{r['seed']}: {r['auto_choice']}" for r in results)
    lines.append(
        f"Label-free pick = best recipe on the test labels in {agree} of {len(results)} "
        f"(category, seed) runs; picks: {picks}"
    )
    (args.out / "accuracy_suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
