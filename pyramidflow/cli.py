"""Command line: ``pyramidflow demo | train | predict | evaluate | import-reference``.

Exit codes: 0 success, 1 a run that failed (bad file, bad data, some predictions
failed), 2 a command-line mistake. User mistakes print one line, no traceback; set
``PYRAMIDFLOW_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointError
from .config import MEMORY_MODES, MVTEC_CATEGORIES, Config
from .errors import DataError, PyramidFlowError
from .reference_import import ReferenceImportError

PROG = "pyramidflow"


class UsageError(Exception):
    """A bad combination of command-line arguments (exit code 2)."""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="torch device to run on, e.g. cpu, cuda, cuda:1"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (they go to stderr)"
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and training (defaults: the paper's, or the preset)")
    g.add_argument(
        "--preset",
        choices=MVTEC_CATEGORIES,
        help="start from the paper's MVTec AD preset of this category (levels, VN, augment)",
    )
    g.add_argument(
        "--config", type=Path, help="JSON file with config fields (flags below override it)"
    )
    g.add_argument(
        "--image-size", type=int, nargs="+", metavar="PX", help="model input size: S or H W"
    )
    g.add_argument("--levels", type=int, help="pyramid levels L (>= 2; paper 4)")
    g.add_argument("--stacks", type=int, help="coupling stacks S (paper 4)")
    g.add_argument("--channels", type=int, help="latent channels C (paper 16)")
    g.add_argument("--kernel-size", type=int, help="parameter-network kernel k (paper 7)")
    g.add_argument("--volume-norm", choices=("CVN", "SVN"), help="volume normalization")
    g.add_argument("--epochs", type=int, help="training epochs (paper 15)")
    g.add_argument("--batch-size", type=int, help="training batch, >= 2 (paper 2)")
    g.add_argument("--lr", type=float, help="Adam learning rate (paper 2e-4)")
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="texture augmentation: random flips and rot90 (paper: textures only)",
    )
    g.add_argument("--seed", type=int, help="seed of initialisation, shuffling, augmentation")
    g.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        help="recompute: activation memory constant in depth (default); store: plain autograd",
    )
    g.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        help="op implementation; auto = Triton on CUDA, torch otherwise",
    )


_FIELD_FLAGS = (
    "levels", "stacks", "channels", "kernel_size", "volume_norm", "epochs", "batch_size", "lr",
    "augment", "seed", "memory", "backend",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> Config:
    """Config from --preset, --config and the individual flags (in that order)."""
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--config {args.config}: cannot read JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--config {args.config}: expected a JSON object of config fields")
        values.update(loaded)
    for name in _FIELD_FLAGS:
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.image_size is not None:
        if len(args.image_size) not in (1, 2):
            raise UsageError("--image-size takes one value (square) or two (height width)")
        values["image_size"] = tuple(args.image_size * (3 - len(args.image_size)))
    try:
        if args.preset is not None:
            return Config.for_category(args.preset, **values)
        return Config.from_dict(values)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def _check_new_file(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the path of a file to write")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")


def _print_table(rows: dict[str, dict[str, float]], mean: dict[str, float] | None) -> None:
    columns = ("pixel_auroc", "image_auroc", "aupro", "aupro_full_range")
    heads = ("pixel AUROC", "image AUROC", "AUPRO@0.3", "AUPRO full")
    print(f"{'category':<12}" + "".join(f"{h:>13}" for h in heads))
    for name, row in rows.items():
        print(f"{name:<12}" + "".join(f"{row[c]:>13.4f}" for c in columns))
    if mean is not None:
        print(f"{'mean':<12}" + "".join(f"{mean[c]:>13.4f}" for c in columns))


# -- commands ---------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .synthetic import DEMO_CATEGORIES

    categories = args.categories or list(DEMO_CATEGORIES)
    unknown = sorted(set(categories) - set(DEMO_CATEGORIES))
    if unknown:
        raise UsageError(
            f"--categories: unknown {', '.join(unknown)}; known: {', '.join(DEMO_CATEGORIES)}"
        )
    overrides = {"epochs": args.epochs} if args.epochs is not None else {}
    summary = run_demo(
        args.out,
        data_dir=args.data,
        categories=categories,
        overrides=overrides,
        device=args.device,
        progress=not args.no_progress,
    )
    print()
    _print_table(summary["categories"], summary["mean"])
    print(f"\nwrote {Path(args.out) / 'metrics.json'} ({summary['seconds']:.0f} s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .api import Detector
    from .data import training_images

    config = config_from_args(args)
    if config.batch_size < 2:
        raise UsageError(
            f"--batch-size must be >= 2 (the loss compares image pairs), got {config.batch_size}"
        )
    _check_new_file(args.out, args.overwrite)
    count = len(training_images(args.data))
    args.out.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after training
    if count < config.batch_size:
        raise DataError(
            f"{args.data}: {count} training image(s), fewer than one batch of {config.batch_size}"
        )
    detector = Detector(config, device=args.device).fit(args.data, progress=not args.no_progress)
    path = detector.save(args.out)
    losses = detector.info["epoch_losses"]
    print(f"trained {detector.info['steps']} steps, last epoch loss {losses[-1]:.4g}; wrote {path}")
    return 0


def _output_names(paths: Sequence[Path]) -> list[str]:
    """Unique, safe output stems (files of the same name in different folders differ)."""
    names, seen = [], set()
    for index, path in enumerate(paths):
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem) or "image"
        name, suffix = stem, index
        while name in seen:  # "a_2" given, then a second "a" at index 2: try further
            name = f"{stem}_{suffix}"
            suffix += 1
        seen.add(name)
        names.append(name)
    return names


def cmd_predict(args: argparse.Namespace) -> int:
    import tifffile
    from PIL import Image

    from . import data
    from .api import Detector
    from .progress import progress_bar
    from .viz import colorize, overlay

    paths = data.expand_inputs(args.inputs)
    out: Path = args.out
    table = out / "scores.csv"
    _check_new_file(table, args.overwrite)
    detector = Detector.load(args.model, device=args.device)
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    names = _output_names(paths)
    for path, name in progress_bar(
        list(zip(paths, names, strict=True)), "predicting", enabled=not args.no_progress
    ):
        try:
            pixels = data.read_array(path)
            pred = detector.predict(pixels)
        except PyramidFlowError as exc:
            print(f"{PROG}: skipped {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        assert not isinstance(pred, list)
        tifffile.imwrite(out / f"{name}_map.tiff", pred.anomaly_map)
        scale = np.percentile(pred.anomaly_map, 99.9)
        colour = pixels.ndim == 3 and pixels.shape[2] >= 3
        shown = data.to_channels(pixels, 3 if colour else 1, str(path))
        heat = colorize(pred.anomaly_map, 0.0, max(scale, 1e-12))
        Image.fromarray(overlay(shown, heat)).save(out / f"{name}_overlay.png")
        rows.append({"file": str(path), "score": pred.score, "map": f"{name}_map.tiff"})
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "score", "map"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "scores.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"scored {len(rows)} image(s) into {out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import Detector

    if args.json is not None:
        _check_new_file(args.json, args.overwrite)
        args.json.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after evaluating
    detector = Detector.load(args.model, device=args.device)
    rows = {}
    for folder in args.data:
        evaluation = detector.evaluate(folder, progress=not args.no_progress)
        name = Path(folder).resolve().name or str(folder)  # "." -> the folder's own name
        if name in rows:
            name = str(folder)
        rows[name] = evaluation.metrics
    names = ("pixel_auroc", "image_auroc", "aupro", "aupro_full_range")
    mean = {k: float(np.nanmean([r[k] for r in rows.values()])) for k in names}
    _print_table(rows, mean if len(rows) > 1 else None)
    if args.json is not None:
        args.json.write_text(json.dumps({"categories": rows, "mean": mean}, indent=2) + "\n")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .reference_import import load_reference_checkpoint

    _check_new_file(args.out, args.overwrite)
    image_size = args.image_size[0] if args.image_size and len(args.image_size) == 1 else None
    if args.image_size and len(args.image_size) == 2:
        image_size = tuple(args.image_size)
    model = load_reference_checkpoint(
        args.checkpoint, image_size=image_size, allow_pickle=args.allow_pickle
    )
    save_checkpoint(args.out, model, info={"imported_from": str(args.checkpoint)})
    print(
        f"wrote {args.out} (weights only: run `train` on good images or compute a template "
        "before predicting)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Find defects in images with PyramidFlow, trained on good images only.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="generate the synthetic demo data, train, evaluate and print a results table",
        description="Generate the built-in synthetic categories (if absent), train one model "
        "per category, evaluate on its test split, write models, overlays and metrics.json.",
    )
    p.add_argument("--out", type=Path, default=Path("pyramidflow-demo"), help="output folder")
    p.add_argument("--data", type=Path, help="where the demo data lives (default OUT/data)")
    p.add_argument("--categories", nargs="+", metavar="NAME", help="subset of the categories")
    p.add_argument("--epochs", type=int, help="override the demo's 8 epochs")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train",
        help="train a model on good images and write one .safetensors file",
        description="Train on DATA: an MVTec-layout category folder (uses train/good) or a "
        "folder of good images. Writes weights, template, config and preprocessing to --out.",
    )
    p.add_argument("data", type=Path, help="MVTec-layout category folder or folder of images")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_model_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "predict",
        help="anomaly maps and scores for image files, folders or glob patterns",
        description="Writes per image NAME_map.tiff (float32, original resolution) and "
        "NAME_overlay.png, and scores.csv / scores.json with one row per image. Unreadable "
        "files are reported and skipped (exit code 1).",
    )
    p.add_argument("model", type=Path, help="model file written by `train`")
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "evaluate",
        help="pixel/image AUROC and AUPRO on MVTec-layout test folders",
        description="Scores each category's test split at the model's resolution and prints "
        "pixel AUROC, image AUROC, AUPRO (FPR <= 0.3, normalised) and full-range AUPRO.",
    )
    p.add_argument("model", type=Path, help="model file written by `train`")
    p.add_argument("data", type=Path, nargs="+", help="MVTec-layout category folder(s)")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "import-reference",
        help="convert the authors' .npz checkpoint into a pyramidflow model file",
        description="Reads the authors' .npz (config from its keys, weights from "
        "state_dict_pixel). Their files hold pickles: --allow-pickle confirms you trust it.",
    )
    p.add_argument("checkpoint", type=Path, help="the authors' .npz file")
    p.add_argument("--out", type=Path, required=True, help="model file to write")
    p.add_argument(
        "--allow-pickle", action="store_true", help="trust the file and unpickle it fully"
    )
    p.add_argument("--image-size", type=int, nargs="+", metavar="PX", help="S or H W")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_import)

    from .export import add_export_command
    from .health import add_check_command

    add_export_command(sub)
    add_check_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyramidflow`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except (
        PyramidFlowError,
        CheckpointError,
        ReferenceImportError,
        OSError,
    ) as exc:
        if os.environ.get("PYRAMIDFLOW_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
