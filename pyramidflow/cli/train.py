"""``pyramidflow train``: train on good images and write one model file (torchrun aware)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import DataError
from .common import (
    PROG,
    UsageError,
    add_common_options,
    add_model_options,
    check_new_file,
    config_from_args,
    positive,
)


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on the ``pyramidflow`` parser's subparsers."""
    p = subparsers.add_parser(
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
    add_model_options(p)
    add_common_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Train; under ``torchrun`` (WORLD_SIZE > 1) every process trains one share of each
    global batch with DistributedDataParallel and rank 0 writes the files."""
    from ..training import distributed

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
    from ..api import Detector
    from ..io.datasets import training_images
    from ..progress import write_line
    from ..training import distributed

    config = config_from_args(args)
    if config.batch_size < 2:
        raise UsageError(
            f"--batch-size must be >= 2 (the loss compares image pairs), got {config.batch_size}"
        )
    check_new_file(args.out, args.overwrite)
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
            # its own line under the training bar, on stdout as before
            write_line(f"epoch {epoch + 1}/{config.epochs}  loss {loss:.4g}  {shown}", sys.stdout)

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
        if detector.threshold is not None:
            print(f"threshold {detector.threshold:.4g}: {detector.threshold_origin()}")
        warning = detector.threshold_warning()
        if warning is not None:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    distributed.barrier()  # no rank exits (and tears the group down) before the file exists
    return 0


def train_state_path(out: Path) -> Path:
    """Where ``train --out OUT`` keeps its resumable training state: ``OUT.train-state``."""
    return out.with_name(out.name + ".train-state")
