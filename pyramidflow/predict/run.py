"""Prediction runs over many image files: streamed, atomic, resumable.

:func:`run_predict` scores images in small batches and writes, per image, into one output
folder:

* ``NAME_map.tiff``: the anomaly map, float32, at the image's own resolution;
* ``NAME_overlay.png``: the image, tinted with the map's heat colours where the map is
  high (from half the threshold on) and left as it is elsewhere;
* ``NAME_mask.png``: 0/255 uint8, the map at or above the model's map threshold
  (:meth:`~pyramidflow.api.Detector.map_threshold`; only when the model has a threshold);

overlay and mask at most ``overlay_size`` pixels on their longer side (the image's own
resolution when it is smaller, or with ``overlay_size=None``);

and for the run: ``scores.jsonl`` (one JSON line per finished image, appended and
flushed as it goes: the journal ``resume=True`` continues from), and at the end
``scores.csv``, ``scores.json`` (one row per image: file, score, decision, map, overlay,
mask) and ``report.html``. Memory does not grow with the number of images: only one
batch of model inputs and model-size maps is held at a time. Nor does it hold several
full-resolution float copies of an image: each file is decoded once, converted and
resized in row strips, and the map is written to its TIFF in row strips computed from
the model-size map. Every file is written to a temporary file in
the same folder and renamed into place, so a killed run never leaves half a file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import preprocess
from ..errors import PyramidFlowError
from ..io.atomic import atomic_write, remove_stale_temporaries
from ..io.images import read_array
from ..progress import counter_bar, write_line
from ..viz import heat_overlay, heat_range, mask_image, to_display
from .journal import JOURNAL_VERSION, Journal, model_key, read_journal, write_tables
from .naming import JOURNAL, REPORT, check_outputs, output_names

if TYPE_CHECKING:
    from ..api import Detector


@dataclass
class PredictSummary:
    """What a run did. ``failed`` lists (file, reason) of the images that were skipped."""

    out: Path
    scored: int = 0
    resumed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    threshold: float | None = None
    report: Path | None = None


# -- one image --------------------------------------------------------------------------------


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


#: Default longest side of the overlay and mask PNGs; larger images get a reduced preview.
OVERLAY_SIZE = 2048


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


def _write_map(path: Path, strips: Iterator[np.ndarray], shape: tuple[int, int]) -> None:
    """The float32 map TIFF, fed row by row from ``strips`` (tifffile streams an iterator
    to the file: the whole map is never in memory)."""
    import tifffile

    def rows() -> Iterator[np.ndarray]:
        for strip in strips:
            yield from strip

    atomic_write(path, lambda f: tifffile.imwrite(f, rows(), shape=shape, dtype=np.float32))


def preview_shape(shape: tuple[int, int], longest: int | None) -> tuple[int, int]:
    """``shape`` scaled down so that its longer side is at most ``longest`` (``None``: the
    shape itself)."""
    height, width = int(shape[0]), int(shape[1])
    if longest is None or max(height, width) <= longest:
        return height, width
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class _Scored:
    """One image of a batch between reading and writing: the model-size input is in the
    batch; of the pixels only what the overlay needs is kept (a preview, unless the
    overlay is full size)."""

    path: Path
    name: str
    shape: tuple[int, int]
    display: np.ndarray  # the pixels at the overlay's size


def _display_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The pixels at the overlay's size: as they are, or reduced (antialiased, in strips)
    with their type's meaning kept (8-bit stays 8-bit, so it is shown unstretched)."""
    if tuple(pixels.shape[:2]) == tuple(size):
        return pixels
    if pixels.dtype == np.bool_:
        pixels = pixels.astype(np.uint8) * np.uint8(255)
    reduced = preprocess.shrink_array(pixels, size)
    if pixels.dtype == np.uint8:
        return np.clip(np.rint(reduced), 0, 255).astype(np.uint8)
    return reduced


def _write_outputs(
    out: Path,
    item: _Scored,
    small: Any,
    config: Any,
    map_threshold: float | None,
) -> dict[str, str]:
    files = {"map": f"{item.name}_map.tiff", "overlay": f"{item.name}_overlay.png", "mask": ""}
    _write_map(out / files["map"], preprocess.map_strips(small, item.shape, config), item.shape)
    size = tuple(item.display.shape[:2])
    if size == tuple(item.shape):
        amap = preprocess.restore_map(small, item.shape, config)
    else:
        amap = preprocess.reduced_map(small, item.shape, size, config)
    low, high = heat_range(amap, map_threshold)
    picture = to_display(item.display)
    mask = None if map_threshold is None else np.empty(amap.shape, np.uint8)
    # colouring and blending take ~50 bytes per pixel: a strip of rows at a time
    rows = max(1, 2**20 // max(1, amap.shape[1]))
    for start in range(0, amap.shape[0], rows):
        part = slice(start, start + rows)
        picture[part] = heat_overlay(picture[part], amap[part], low, high)
        if mask is not None:
            mask[part] = mask_image(amap[part] >= map_threshold)
    _write_png(out / files["overlay"], picture)
    del picture
    if mask is not None:
        files["mask"] = f"{item.name}_mask.png"
        _write_png(out / files["mask"], mask)
    return files


def _outputs_exist(out: Path, row: Mapping[str, Any]) -> bool:
    files = [row.get(k) for k in ("map", "overlay", "mask")]
    if not all(isinstance(f, str) for f in files) or not row.get("map"):
        return False
    return all((out / f).is_file() for f in files if f)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- the run ----------------------------------------------------------------------------------


def run_predict(
    detector: Detector,
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    resume: bool = False,
    batch_size: int = 8,
    progress: bool = False,
    labels: Callable[[Path], str | None] | Mapping[str, str] | None = None,
    report: bool = True,
    title: str | None = None,
    log: Callable[[str], None] = write_line,
    overlay_size: int | None = OVERLAY_SIZE,
    keys: Sequence[str] | None = None,
) -> PredictSummary:
    """Score ``paths`` with ``detector`` into the folder ``out`` (see the module doc).

    Unreadable or unusable images are logged (``log``; the default prints each message on
    a line of its own, also while the progress bar is shown) and listed in the summary's
    ``failed``; the others go on. ``resume`` skips images whose row is in the journal and
    whose output files exist; without ``resume`` or ``overwrite`` earlier results in
    ``out`` raise :class:`OutputExistsError` before any work. ``labels`` (a function of the
    path, or a mapping from ``str(path)``) give the report's good/defective histogram,
    e.g. :func:`mvtec_label`. ``overlay_size``: the longest side of overlay and mask PNGs
    (``None``: the image's own size; the map TIFF is always at the image's own size).
    Image files above ``detector.config.max_pixels`` pixels are refused on their header.
    ``keys``: each input's path inside the folder it was found in (``crack/000.png``, from
    :func:`~pyramidflow.io.images.expand_named_inputs`), which output names and the
    report's captions are made of (default: the file names).
    """
    if batch_size < 1:
        raise PyramidFlowError(f"batch size must be >= 1, got {batch_size}")
    if overlay_size is not None and overlay_size < 1:
        raise PyramidFlowError(f"overlay size must be >= 1 pixel, got {overlay_size}")
    out = Path(out)
    paths = [Path(p) for p in paths]
    names = output_names(paths, keys)
    captions = [p.name for p in paths] if keys is None else list(keys)
    check_outputs(out, names, overwrite=overwrite, resume=resume, paths=paths)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PyramidFlowError(f"{out}: cannot create the output folder ({exc})") from None
    remove_stale_temporaries(out)

    threshold = detector.threshold
    summary = PredictSummary(out=out, threshold=threshold)
    key = model_key(detector)
    journal_path = out / JOURNAL
    done: dict[str, dict[str, Any]] = {}
    if resume:
        header, done = read_journal(journal_path)
        if header is not None and header.get("model") != key:
            raise PyramidFlowError(
                f"{journal_path}: written with another model; pass --overwrite to start over"
            )
        write_header = header is None
    else:
        if journal_path.is_symlink() or journal_path.exists():
            journal_path.unlink()
        write_header = True

    if threshold is None:
        log("note: the model has no threshold (imported weights?): no masks, empty decisions")

    todo: list[tuple[Path, str]] = []
    for path, name in zip(paths, names, strict=True):
        row = done.get(name)
        if row is not None and row.get("file") == str(path) and _outputs_exist(out, row):
            summary.resumed += 1
        else:
            done.pop(name, None)
            todo.append((path, name))

    header = {"pyramidflow_predict": JOURNAL_VERSION, "model": key, "threshold": threshold}
    journal = Journal(journal_path, header if write_header else None)
    bar = counter_bar(len(todo), "predicting", enabled=progress)
    try:
        for batch in _batches(todo, batch_size):
            scored = _score_batch(detector, batch, out, threshold, summary, log, overlay_size)
            for row in scored:
                journal.append(row)
                done[row["name"]] = row
                summary.scored += 1
            journal.sync()
            bar.update(len(batch))
    except KeyboardInterrupt:
        log(f"interrupted after {summary.scored} image(s); rerun with --resume to continue")
        raise
    finally:
        bar.close()
        journal.close()

    label_of = _label_function(labels)
    rows = [done[n] for n in names if n in done]
    summary.rows = len(rows)
    write_tables(out, rows)
    if report:
        sources = dict(zip(names, zip(paths, captions, strict=True), strict=True))
        summary.report = _write_report(out, rows, sources, detector, label_of, title)
    return summary


def _score_batch(
    detector: Detector,
    batch: Sequence[tuple[Path, str]],
    out: Path,
    threshold: float | None,
    summary: PredictSummary,
    log: Callable[[str], None],
    overlay_size: int | None,
) -> Iterator[dict[str, Any]]:
    """Read, score and write one batch; yields the journal row of each finished image."""
    import torch

    config = detector.config
    ready: list[_Scored] = []
    tensors = []
    for path, name in batch:
        try:
            pixels = read_array(path, config.max_pixels)
            tensor = preprocess.prepare(pixels, config, str(path))
            size = preview_shape(pixels.shape[:2], overlay_size)
            item = _Scored(path, name, pixels.shape[:2], _display_pixels(pixels, size))
        except PyramidFlowError as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"skipped {path}: {message.removeprefix(f'{path}: ')}")
            summary.failed.append((str(path), message))
            continue
        finally:
            pixels = None  # the raw image is not kept beside the batch
        tensors.append(tensor)
        ready.append(item)
    if not ready:
        return
    maps, scores = detector.score_batch(torch.stack(tensors), batch_size=len(tensors))
    del tensors
    for item, small, score in zip(ready, maps, scores, strict=True):
        files = _write_outputs(out, item, small, config, detector.map_threshold())
        value = float(score)
        decision = ""
        if threshold is not None and math.isfinite(value):
            decision = "anomalous" if value >= threshold else "good"
        yield {
            "file": str(item.path),
            "name": item.name,
            "score": _number(value),
            "decision": decision,
            **files,
        }


def _label_function(
    labels: Callable[[Path], str | None] | Mapping[str, str] | None,
) -> Callable[[Path], str | None]:
    if labels is None:
        return lambda path: None
    if callable(labels):
        return labels
    mapping = dict(labels)
    return lambda path: mapping.get(str(path))


def _write_report(
    out: Path,
    rows: Sequence[Mapping[str, Any]],
    sources: Mapping[str, tuple[Path, str]],
    detector: Detector,
    label_of: Callable[[Path], str | None],
    title: str | None,
) -> Path:
    from ..report import ReportItem, label_metrics, write_report

    threshold = detector.threshold
    warning = detector.threshold_warning()
    items = []
    for row in rows:
        source, caption = sources[row["name"]]
        decision = row.get("decision") or ""
        items.append(
            ReportItem(
                source=row["file"],
                score=float("nan") if row["score"] is None else float(row["score"]),
                overlay=row["overlay"],
                is_anomalous=None if not decision else decision == "anomalous",
                label=label_of(source),
                links={k: row[k] for k in ("map", "mask") if row.get(k)},
                caption=caption,
            )
        )
    return write_report(
        out / REPORT,
        items,
        title=title or "pyramidflow predictions",
        threshold=threshold,
        metrics=label_metrics(items, threshold),
        threshold_origin=detector.threshold_origin(),
        warnings=[warning] if warning else [],
    )
