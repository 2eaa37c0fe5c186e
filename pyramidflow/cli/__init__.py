"""The ``pyramidflow`` command line, one module per command (``add_command`` registers
its arguments, ``run`` executes it) and :mod:`.common` for what they share:

- ``demo``: generate the synthetic demo data, train, evaluate, print the table;
- ``train``: train on good images, write one model file (torchrun aware);
- ``predict``: maps, masks, scores and a report for files, folders and globs;
- ``evaluate``: pixel and image metrics on MVTec AD / BTAD test folders;
- ``import-reference``: convert the authors' .npz checkpoint;
- ``export``: ONNX or torch.export inference graph;
- ``benchmark``: one model per category of a dataset root, trained and evaluated;
- ``check``: numerical health (reconstruction error) per image.

Exit codes: 0 success, 1 a run that failed (bad file, bad data, some predictions
failed), 2 a command-line mistake. User mistakes print one line, no traceback; set
``PYRAMIDFLOW_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import PyramidFlowError
from . import benchmark, check, demo, evaluate, export, import_reference, predict, train
from .common import PROG, UsageError

COMMANDS = (demo, train, predict, evaluate, import_reference, export, benchmark, check)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Find defects in images with PyramidFlow, trained on good images only.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyramidflow`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.environ.get("PYRAMIDFLOW_DEBUG"):
        # tifffile logs what it finds wrong in a damaged file; our one line says it already
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except UsageError as exc:
        parser.exit(2, f"{PROG}: error: {exc}\n")
    except (PyramidFlowError, OSError) as exc:
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
