"""Command line: ``pyramidflow demo | train | predict | evaluate | import-reference``.

Exit codes: 0 success, 1 a run that failed (bad file, bad data, some predictions
failed), 2 a command-line mistake. User mistakes print one line, no traceback; set
``PYRAMIDFLOW_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def _check_new_file(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the path of a file to write")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")


def _print_table(rows: dict[str, dict[str, float]], mean: dict[str, float] | None) -> None:
    from .metrics import REPORTED_METRICS

    heads = ("pixel AUROC", "image AUROC", "AUPRO@0.3", "AUPRO full", "pixel F1max", "image F1max")

    def cells(row: dict[str, float]) -> str:
        values = (row.get(c) for c in REPORTED_METRICS)
        return "".join(f"{float('nan') if v is None else v:>13.4f}" for v in values)

    print(f"{'category':<12}" + "".join(f"{h:>13}" for h in heads))
    for name, row in rows.items():
        print(f"{name:<12}" + cells(row))
    if mean is not None:
        print(f"{'mean':<12}" + cells(mean))


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
    """Train; under ``torchrun`` (WORLD_SIZE > 1) every process trains one share of each
    global batch with DistributedDataParallel and rank 0 writes the files."""
    from . import distributed

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        return _train(args, args.device, main_rank=True)
    backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
    device = distributed.init_from_env(backend)
    try:
        return _train(args, device, main_rank=distributed.rank() == 0)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, device: Any, *, main_rank: bool) -> int:
    from . import distributed
    from .api import Detector
    from .data import training_images

    config = config_from_args(args)
    if config.batch_size < 2:
        raise UsageError(
            f"--batch-size must be >= 2 (the loss compares image pairs), got {config.batch_size}"
        )
    _check_new_file(args.out, args.overwrite)
    state = train_state_path(args.out)
    if state.exists() and not args.resume:
        if not args.overwrite:
            raise UsageError(
                f"{state} holds a saved training run: pass --resume to continue it or "
                "--overwrite to start over"
            )
        distributed.barrier()  # every rank has seen the file before rank 0 removes it
        if main_rank:
            state.unlink()
    count = len(training_images(args.data))
    args.out.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after training
    if count < config.batch_size:
        raise DataError(
            f"{args.data}: {count} training image(s), fewer than one batch of {config.batch_size}"
        )
    if args.resume and not state.exists() and main_rank:
        print(f"{PROG}: no {state}; training from the start", file=sys.stderr)

    def report_epoch(epoch: int, loss: float, metrics: dict[str, float] | None) -> None:
        if metrics is not None and main_rank:
            shown = "  ".join(
                f"{name} {metrics[name]:.4f}"
                for name in ("pixel_auroc", "image_auroc", "aupro")
                if name in metrics
            )
            print(f"epoch {epoch + 1}/{config.epochs}  loss {loss:.4g}  {shown}", flush=True)

    detector = Detector(config, device=device).fit(
        args.data,
        progress=not args.no_progress and main_rank,
        checkpoint_path=state,
        resume=args.resume,
        checkpoint_every_steps=args.checkpoint_every,
        eval_data=args.eval_data,
        on_epoch=report_epoch if args.eval_data is not None else None,
    )
    if main_rank:
        path = detector.save(args.out)
        if not args.keep_state:
            state.unlink(missing_ok=True)
        losses = detector.info["epoch_losses"]
        print(
            f"trained {detector.info['steps']} steps, last epoch loss {losses[-1]:.4g}; "
            f"wrote {path}"
        )
    distributed.barrier()  # no rank exits (and tears the group down) before the file exists
    return 0


def train_state_path(out: Path) -> Path:
    """Where ``train --out OUT`` keeps its resumable training state: ``OUT.train-state``."""
    return out.with_name(out.name + ".train-state")


def _output_names(paths: Sequence[Path]) -> list[str]:
    """Unique, safe output stems, stable for the same inputs (see predict_run.output_names)."""
    from .predict_run import output_names

    return output_names(paths)


def cmd_predict(args: argparse.Namespace) -> int:
    from . import data
    from .api import Detector
    from .predict_run import OutputExistsError, check_outputs, mvtec_label, run_predict

    paths = data.expand_inputs(args.inputs)
    try:  # before loading the model: a usage mistake should cost nothing
        names = _output_names(paths)
        check_outputs(args.out, names, overwrite=args.overwrite, resume=args.resume, paths=paths)
    except OutputExistsError as exc:
        raise UsageError(str(exc)) from None
    detector = Detector.load(args.model, device=args.device)
    summary = run_predict(
        detector,
        paths,
        args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        labels=mvtec_label,
        report=not args.no_report,
        title=f"pyramidflow predictions: {Path(args.model).name}",
        log=lambda message: print(f"{PROG}: {message}", file=sys.stderr),
    )
    done = f"scored {summary.scored} image(s) into {summary.out}"
    if summary.resumed:
        done += f" ({summary.resumed} done earlier, kept)"
    if summary.failed:
        done += f"; {len(summary.failed)} failed"
    print(done)
    if summary.report is not None:
        print(f"report: {summary.report}")
    return 1 if summary.failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import Detector
    from .atomic import atomic_write_text
    from .data import find_categories
    from .metrics import json_safe, mean_metrics

    if args.json is not None:
        _check_new_file(args.json, args.overwrite)
        args.json.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after evaluating
    folders = [f for root in args.data for f in find_categories(root)]  # check all first
    detector = Detector.load(args.model, device=args.device)
    rows = {}
    for folder in folders:
        evaluation = detector.evaluate(folder, progress=not args.no_progress)
        name = Path(folder).resolve().name or str(folder)  # "." -> the folder's own name
        if name in rows:
            name = str(folder)
        rows[name] = evaluation.metrics
    mean = mean_metrics(rows)
    _print_table(rows, mean if len(rows) > 1 else None)
    if args.json is not None:
        summary = json_safe({"categories": rows, "mean": mean})
        atomic_write_text(args.json, json.dumps(summary, indent=2, allow_nan=False) + "\n")
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
        description="Train on DATA: an MVTec or BTAD category folder (uses train/good or "
        "train/ok) or a folder of good images. Writes weights, template, config, "
        "preprocessing and threshold to --out. Under torchrun each process trains its "
        "share of every batch (DistributedDataParallel); --batch-size is per process.",
    )
    p.add_argument("data", type=Path, help="MVTec-layout category folder or folder of images")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out file; without --resume also discard a saved "
        "OUT.train-state",
    )
    g = p.add_argument_group("checkpoints and monitoring")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in OUT.train-state (written after every epoch); same "
        "data and config required, --epochs may grow; ends with the weights of an "
        "uninterrupted run",
    )
    g.add_argument(
        "--checkpoint-every",
        type=positive(int),
        metavar="STEPS",
        help="also write OUT.train-state every STEPS optimizer steps (default: every epoch)",
    )
    g.add_argument(
        "--keep-state",
        action="store_true",
        help="keep OUT.train-state after success (to --resume later with more --epochs); "
        "by default it is deleted once --out is written",
    )
    g.add_argument(
        "--eval-data",
        type=Path,
        metavar="CATEGORY",
        help="MVTec-layout category: print test metrics after every epoch and store them in "
        "the model's info. Monitoring only: the saved model is always the last epoch's",
    )
    _add_model_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "predict",
        help="anomaly maps, masks, scores and an HTML report for image files, folders, globs",
        description="Writes per image NAME_map.tiff (float32, original resolution), "
        "NAME_overlay.png and NAME_mask.png (0/255 at the model's threshold), and "
        "scores.csv / scores.json (file, score, decision, map, overlay, mask) and "
        "report.html. Images are processed in batches and every result is written as it "
        "is done (scores.jsonl), so a long run can be continued with --resume. Unreadable "
        "files are reported and skipped (exit code 1).",
    )
    p.add_argument("model", type=Path, help="model file written by `train`")
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue an earlier run into --out: images already done are kept, not rescored",
    )
    p.add_argument(
        "--batch-size", type=positive(int), default=8, help="images scored together (default 8)"
    )
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "evaluate",
        help="pixel/image AUROC and AUPRO on MVTec AD or BTAD test folders",
        description="Scores each category's test split at the model's resolution and prints "
        "pixel AUROC, image AUROC, AUPRO (FPR <= 0.3, normalised) and full-range AUPRO. A "
        "dataset root stands for all its categories.",
    )
    p.add_argument("model", type=Path, help="model file written by `train`")
    p.add_argument(
        "data", type=Path, nargs="+", help="MVTec AD or BTAD category folder(s) or root(s)"
    )
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

    from .benchmark import add_benchmark_command
    from .export import add_export_command
    from .health import add_check_command

    add_export_command(sub)
    add_benchmark_command(sub)
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
