"""Shared by the commands: the program name, usage errors, argument types and groups,
the config built from flags, the metrics table."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import (
    BACKENDS,
    CONV_PRECISIONS,
    DEFAULT_MAX_PIXELS,
    MEMORY_MODES,
    MVTEC_CATEGORIES,
    SCORINGS,
    VOLUME_NORMS,
    Config,
)
from ..errors import PyramidFlowError
from ..metrics import REPORTED_METRICS

PROG = "pyramidflow"


class UsageError(PyramidFlowError):
    """A bad combination of command-line arguments (exit code 2)."""


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="cpu", help="torch device to run on, e.g. cpu, cuda, cuda:1"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (they go to stderr)"
    )


def add_max_pixels_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: int | None
) -> None:
    """``--max-pixels N``: image files whose header declares more pixels are refused before
    decoding (``default`` None: the config's, for commands that build one)."""
    parser.add_argument(
        "--max-pixels",
        type=positive(int),
        default=default,
        metavar="N",
        help="refuse image and mask files with more than N pixels, checked on the file "
        f"header before decoding (default {DEFAULT_MAX_PIXELS} = 16384 x 16384)",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
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
    g.add_argument("--volume-norm", choices=VOLUME_NORMS, help="volume normalization")
    g.add_argument("--epochs", type=int, help="training epochs (paper 15)")
    g.add_argument("--batch-size", type=int, help="training batch, >= 2 (paper 2)")
    g.add_argument("--lr", type=float, help="Adam learning rate (paper 2e-4)")
    g.add_argument(
        "--augment",
        nargs="?",
        const=True,
        default=None,
        type=_augment_choice,
        metavar="auto",
        help="texture augmentation: random flips and rot90 (paper: textures only); "
        "'--augment auto' decides from the good images (on for stationary textures)",
    )
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no augmentation")
    g.add_argument("--seed", type=int, help="seed of initialisation, shuffling, augmentation")
    g.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        help="recompute: activation memory constant in depth (default); store: plain autograd",
    )
    g.add_argument(
        "--memory-budget",
        type=int,
        metavar="MIB",
        help="MiB per row band of the coupling blocks at high resolution (default: from the "
        "device; 0: never tile); the results are the same, the peak memory is not",
    )
    g.add_argument(
        "--scoring",
        choices=SCORINGS,
        help="anomaly map recipe: paper (|z - T|, the paper's), znorm (residuals over the "
        "good images' spread, smoothed), relative (znorm on per-image standardized latents, "
        "the map over its own mean), fused (relative's map, the image score fused over the "
        "pyramid levels) or fused_peak (default: fused, or the unsmoothed relative map's "
        "peak when that stands out more); docs/method.md section 8",
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        help="op implementation; auto = Triton on CUDA, torch otherwise",
    )
    g.add_argument(
        "--conv-precision",
        choices=CONV_PRECISIONS,
        help="precision of the parameter networks' convolutions: fp32 (default), tf32 (CUDA "
        "only, fp32 elsewhere) or bf16 (autocast); the rest of the model stays float32",
    )
    add_max_pixels_option(g, None)


FIELD_FLAGS = (
    "levels", "stacks", "channels", "kernel_size", "volume_norm", "epochs", "batch_size", "lr",
    "augment", "seed", "memory", "memory_budget", "backend", "conv_precision", "scoring",
    "max_pixels",
)  # fmt: skip


def _augment_choice(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected 'auto' or nothing, got {text!r}")
    return text


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
    for name in FIELD_FLAGS:
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


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse ``type`` accepting only positive values of ``kind`` (int or float)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def check_new_file(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the path of a file to write")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")


def print_table(rows: dict[str, dict[str, float]], mean: dict[str, float] | None) -> None:
    heads = ("pixel AUROC", "image AUROC", "AUPRO@0.3", "AUPRO full", "pixel F1max", "image F1max")

    def cells(row: dict[str, float]) -> str:
        values = (row.get(c) for c in REPORTED_METRICS)
        return "".join(f"{float('nan') if v is None else v:>13.4f}" for v in values)

    print(f"{'category':<12}" + "".join(f"{h:>13}" for h in heads))
    for name, row in rows.items():
        print(f"{name:<12}" + cells(row))
    if mean is not None:
        print(f"{'mean':<12}" + cells(mean))
