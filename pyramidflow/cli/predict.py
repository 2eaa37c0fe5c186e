"""``pyramidflow predict``: maps, masks, scores and a report for image files and folders."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MAX_PIXELS
from ..predict.run import OVERLAY_SIZE
from .common import (
    PROG,
    UsageError,
    add_common_options,
    add_max_pixels_option,
    positive,
)


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``predict`` on the ``pyramidflow`` parser's subparsers."""
    p = subparsers.add_parser(
        "predict",
        help="anomaly maps, masks, scores and an HTML report for image files, folders "
        "(with their subfolders), globs",
        description="Writes per image NAME_map.tiff (float32, original resolution), "
        "NAME_overlay.png and NAME_mask.png (0/255 at the model's threshold), and "
        "scores.csv / scores.json (file, score, decision, map, overlay, mask) and "
        "report.html. Images are processed in batches and every result is written as it "
        "is done (scores.jsonl), so a long run can be continued with --resume. Unreadable "
        "files are reported and skipped (exit code 1).",
    )
    p.add_argument("model", type=Path, help="model file written by `train`")
    p.add_argument(
        "inputs",
        nargs="+",
        help="image files, folders (subfolders included: test/crack/000.png is written as "
        "crack_000_*) or glob patterns",
    )
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
    p.add_argument(
        "--overlay-size",
        type=_overlay_size,
        default=OVERLAY_SIZE,
        metavar="PX|full",
        help="longest side of NAME_overlay.png and NAME_mask.png: larger images get reduced "
        f"previews (default {OVERLAY_SIZE}); 'full' writes them at the image's own size "
        "(NAME_map.tiff always is)",
    )
    add_max_pixels_option(p, DEFAULT_MAX_PIXELS)
    add_common_options(p)
    p.set_defaults(func=run)
    return p


def _overlay_size(text: str) -> int | None:
    """``--overlay-size``: a positive pixel count, or ``full`` (None: no reduction)."""
    if text.strip().lower() == "full":
        return None
    return int(positive(int)(text))


def run(args: argparse.Namespace) -> int:
    from ..api import Detector
    from ..io.images import expand_named_inputs
    from ..predict import OutputExistsError, check_outputs, mvtec_label, output_names, run_predict
    from ..progress import write_line

    # an --out inside an input folder is not read back as input on a rerun
    named = expand_named_inputs(args.inputs, exclude=[args.out])
    paths = [path for path, _ in named]
    keys = [key for _, key in named]
    try:  # before loading the model: a usage mistake should cost nothing
        names = output_names(paths, keys)
        check_outputs(args.out, names, overwrite=args.overwrite, resume=args.resume, paths=paths)
    except OutputExistsError as exc:
        raise UsageError(str(exc)) from None
    detector = Detector.load(args.model, device=args.device, max_pixels=args.max_pixels)
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
        log=lambda message: write_line(f"{PROG}: {message}"),
        overlay_size=args.overlay_size,
        keys=keys,
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
