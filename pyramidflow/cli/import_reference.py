"""``pyramidflow import-reference``: convert the authors' .npz checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import (
    check_new_file,
)


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``import-reference`` on the ``pyramidflow`` parser's subparsers."""
    p = subparsers.add_parser(
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
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..io.checkpoint import save_checkpoint
    from ..io.reference_import import load_reference_checkpoint

    check_new_file(args.out, args.overwrite)
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
