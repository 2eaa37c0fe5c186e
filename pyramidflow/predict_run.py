"""Prediction runs over many image files: streamed, atomic, resumable.

:func:`run_predict` scores images in small batches and writes, per image, into one output
folder:

* ``NAME_map.tiff``: the anomaly map, float32, at the image's own resolution;
* ``NAME_overlay.png``: the image blended with the map as a heatmap;
* ``NAME_mask.png``: 0/255 uint8, the map at or above the model's threshold (only when
  the model has a threshold);

and for the run: ``scores.jsonl`` (one JSON line per finished image, appended and
flushed as it goes: the journal ``resume=True`` continues from), and at the end
``scores.csv``, ``scores.json`` (one row per image: file, score, decision, map, overlay,
mask) and ``report.html``. Memory does not grow with the number of images: only one
batch of images and maps is held at a time. Every file is written to a temporary file in
the same folder and renamed into place, so a killed run never leaves half a file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from . import preprocess
from .errors import PyramidFlowError
from .io.atomic import atomic_write, remove_stale_temporaries
from .io.images import read_array
from .viz import colorize, heat_range, mask_image, overlay, to_display

if TYPE_CHECKING:
    from .api import Detector

JOURNAL = "scores.jsonl"
TABLE_CSV = "scores.csv"
TABLE_JSON = "scores.json"
REPORT = "report.html"
RUN_FILES = (TABLE_CSV, TABLE_JSON, JOURNAL, REPORT)
IMAGE_SUFFIXES = ("_map.tiff", "_overlay.png", "_mask.png")
COLUMNS = ("file", "score", "decision", "map", "overlay", "mask")
JOURNAL_VERSION = 1
MAX_NAME_CHARS = 80
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{prefix}{digit}" for prefix in ("COM", "LPT") for digit in "123456789"
}


class OutputExistsError(PyramidFlowError):
    """The output folder holds results of an earlier run and neither resume nor overwrite
    was asked for."""


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


# -- files ------------------------------------------------------------------------------------


# -- names ------------------------------------------------------------------------------------


def safe_stem(path: str | os.PathLike[str]) -> str:
    """A file-name stem from an input path that cannot leave the output folder.

    Letters and digits (any script) are kept, as are ``-``, ``_`` and single dots; every
    other character (separators, spaces, ``%``, control characters) becomes ``_``. No
    leading dot or dash (hidden files, options), no ``..``, at most 80 characters, never
    empty or a reserved device name.
    """
    stem = unicodedata.normalize("NFC", Path(path).stem)
    chars = [c if c.isalnum() or c in "-_." else "_" for c in stem]
    name = "".join(chars)
    while ".." in name:
        name = name.replace("..", ".")
    name = name.lstrip(".-").rstrip(". ")
    name = name[:MAX_NAME_CHARS].rstrip(". ")
    if not name:
        name = "image"
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        name = f"_{name}"
    return name


def output_names(paths: Sequence[Path]) -> list[str]:
    """Unique, safe output stems, the same for the same inputs (which resume relies on).

    A name is the file's sanitised stem; when several inputs share one (``000.png`` in
    ``good/`` and in ``crack/``; also case-insensitively, for macOS and Windows disks), the
    first keeps it and the others get a short hash of their full path appended.
    """
    names: list[str] = []
    seen: set[str] = set()
    for path in paths:
        stem = safe_stem(path)
        name = stem
        if name.casefold() in seen:
            digest = hashlib.sha256(str(Path(path).resolve()).encode("utf-8", "surrogatepass"))
            name = f"{stem}_{digest.hexdigest()[:8]}"
            counter = 2
            while name.casefold() in seen:
                name = f"{stem}_{digest.hexdigest()[:8]}_{counter}"
                counter += 1
        seen.add(name.casefold())
        names.append(name)
    return names


def mvtec_label(path: str | os.PathLike[str]) -> str | None:
    """The label an MVTec-layout test image carries in its folder (``test/<label>/x.png``):
    ``"good"`` or a defect type; ``None`` for images elsewhere."""
    parent = Path(path).parent
    if parent.parent.name == "test" and parent.name:
        return parent.name
    return None


def check_outputs(
    out: str | os.PathLike[str],
    names: Sequence[str],
    *,
    overwrite: bool,
    resume: bool,
    paths: Sequence[Path] | None = None,
) -> None:
    """Refuse to start when ``out`` holds results and neither ``resume`` nor ``overwrite``
    is set (raises :class:`OutputExistsError` naming the first such file), or when an
    output would replace one of the input ``paths`` (whatever the flags)."""
    out = Path(out)
    if overwrite and resume:
        raise PyramidFlowError("overwrite and resume exclude each other: pick one")
    if out.exists() and not out.is_dir():
        raise PyramidFlowError(f"{out}: exists and is not a folder; --out needs a folder")
    if paths is not None and out.is_dir():
        _check_no_input_replaced(out, paths, names)
    if overwrite or resume or not out.is_dir():
        return
    candidates = [out / f for f in RUN_FILES]
    candidates += [out / f"{n}{s}" for n in names for s in IMAGE_SUFFIXES]
    for candidate in candidates:
        if candidate.exists():
            raise OutputExistsError(
                f"{candidate} exists; pass --resume to continue or --overwrite to replace"
            )


def _check_no_input_replaced(out: Path, paths: Sequence[Path], names: Sequence[str]) -> None:
    inputs = {p.resolve() for p in paths}
    for name in names:
        for suffix in IMAGE_SUFFIXES:
            target = (out / f"{name}{suffix}").resolve()
            if target in inputs:
                raise PyramidFlowError(
                    f"{target}: an output would replace this input image; choose another --out"
                )


# -- journal ----------------------------------------------------------------------------------


def _model_key(detector: Detector) -> str:
    """A fingerprint of the model: rows of another model must not be resumed."""
    payload = json.dumps(
        {"config": detector.config.to_dict(), "info": detector.info, "t": detector.threshold},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_journal(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(header, rows by output name) of a journal; a torn last line is ignored."""
    header: dict[str, Any] | None = None
    rows: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, rows
    except (OSError, UnicodeDecodeError) as exc:
        raise PyramidFlowError(f"{path}: cannot read the run journal ({exc})") from None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line a killed run did not finish
        if not isinstance(record, dict):
            continue
        if "pyramidflow_predict" in record:
            header = record
        elif isinstance(record.get("name"), str) and isinstance(record.get("file"), str):
            rows[record["name"]] = record
    return header, rows


class _Journal:
    """Append-only JSON lines, flushed after every line."""

    def __init__(self, path: Path, header: dict[str, Any] | None) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as exc:
            raise PyramidFlowError(f"{path}: cannot write the run journal ({exc})") from None
        self._handle = os.fdopen(fd, "a", encoding="utf-8", newline="\n")
        if os.fstat(fd).st_size:
            with open(path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                if existing.read(1) != b"\n":
                    self._handle.write("\n")  # end a line torn by a killed run
        if header is not None:
            self.append(header)

    def append(self, record: Mapping[str, Any]) -> None:
        self._handle.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
        self._handle.flush()

    def sync(self) -> None:
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self.sync()
        self._handle.close()


# -- one image --------------------------------------------------------------------------------


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"))


def _write_outputs(
    out: Path, name: str, pixels: np.ndarray, amap: np.ndarray, threshold: float | None
) -> dict[str, str]:
    import tifffile

    files = {"map": f"{name}_map.tiff", "overlay": f"{name}_overlay.png", "mask": ""}
    atomic_write(out / files["map"], lambda f: tifffile.imwrite(f, amap))
    heat = colorize(amap, *heat_range(amap, threshold))
    _write_png(out / files["overlay"], overlay(to_display(pixels), heat))
    if threshold is not None:
        files["mask"] = f"{name}_mask.png"
        _write_png(out / files["mask"], mask_image(amap >= threshold))
    return files


def _outputs_exist(out: Path, row: Mapping[str, Any]) -> bool:
    files = [row.get(k) for k in ("map", "overlay", "mask")]
    if not all(isinstance(f, str) for f in files) or not row.get("map"):
        return False
    return all((out / f).is_file() for f in files if f)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


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
    log: Callable[[str], None] = _stderr,
) -> PredictSummary:
    """Score ``paths`` with ``detector`` into the folder ``out`` (see the module doc).

    Unreadable or unusable images are logged (``log``) and listed in the summary's
    ``failed``; the others go on. ``resume`` skips images whose row is in the journal and
    whose output files exist; without ``resume`` or ``overwrite`` earlier results in
    ``out`` raise :class:`OutputExistsError` before any work. ``labels`` (a function of the
    path, or a mapping from ``str(path)``) give the report's good/defective histogram,
    e.g. :func:`mvtec_label`.
    """
    if batch_size < 1:
        raise PyramidFlowError(f"batch size must be >= 1, got {batch_size}")
    out = Path(out)
    paths = [Path(p) for p in paths]
    names = output_names(paths)
    check_outputs(out, names, overwrite=overwrite, resume=resume, paths=paths)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PyramidFlowError(f"{out}: cannot create the output folder ({exc})") from None
    remove_stale_temporaries(out)

    threshold = detector.threshold
    summary = PredictSummary(out=out, threshold=threshold)
    key = _model_key(detector)
    journal_path = out / JOURNAL
    done: dict[str, dict[str, Any]] = {}
    if resume:
        header, done = _read_journal(journal_path)
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
    journal = _Journal(journal_path, header if write_header else None)
    from .progress import counter_bar

    bar = counter_bar(len(todo), "predicting", enabled=progress)
    try:
        for batch in _batches(todo, batch_size):
            for row in _score_batch(detector, batch, out, threshold, summary, log):
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
    _write_tables(out, rows)
    if report:
        summary.report = _write_report(out, rows, paths, names, threshold, label_of, title)
    return summary


def _score_batch(
    detector: Detector,
    batch: Sequence[tuple[Path, str]],
    out: Path,
    threshold: float | None,
    summary: PredictSummary,
    log: Callable[[str], None],
) -> Iterator[dict[str, Any]]:
    """Read, score and write one batch; yields the journal row of each finished image."""
    import torch

    ready: list[tuple[Path, str, np.ndarray]] = []
    tensors = []
    for path, name in batch:
        try:
            pixels = read_array(path)
            tensors.append(preprocess.prepare(pixels, detector.config, str(path)))
        except PyramidFlowError as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"skipped {path}: {message.removeprefix(f'{path}: ')}")
            summary.failed.append((str(path), message))
            continue
        ready.append((path, name, pixels))
    if not ready:
        return
    maps, scores = detector.score_batch(torch.stack(tensors), batch_size=len(tensors))
    for (path, name, pixels), small, score in zip(ready, maps, scores, strict=True):
        amap = preprocess.restore_map(small, pixels.shape[:2], detector.config)
        files = _write_outputs(out, name, pixels, amap, threshold)
        value = float(score)
        decision = ""
        if threshold is not None and math.isfinite(value):
            decision = "anomalous" if value >= threshold else "good"
        yield {
            "file": str(path),
            "name": name,
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


def _write_tables(out: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    records = [{c: row.get(c, "") for c in COLUMNS} for row in rows]

    def write_csv(handle: IO[bytes]) -> None:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=list(COLUMNS))
        writer.writeheader()
        for record in records:
            writer.writerow({**record, "score": "" if record["score"] is None else record["score"]})
        text.flush()
        text.detach()

    atomic_write(out / TABLE_CSV, write_csv)
    payload = json.dumps(records, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    atomic_write(out / TABLE_JSON, lambda f: f.write(payload.encode("utf-8")))


def _write_report(
    out: Path,
    rows: Sequence[Mapping[str, Any]],
    paths: Sequence[Path],
    names: Sequence[str],
    threshold: float | None,
    label_of: Callable[[Path], str | None],
    title: str | None,
) -> Path:
    from .report import ReportItem, label_metrics, write_report

    path_of = dict(zip(names, paths, strict=True))
    items = []
    for row in rows:
        source = path_of[row["name"]]
        decision = row.get("decision") or ""
        items.append(
            ReportItem(
                source=row["file"],
                score=float("nan") if row["score"] is None else float(row["score"]),
                overlay=row["overlay"],
                is_anomalous=None if not decision else decision == "anomalous",
                label=label_of(source),
                links={k: row[k] for k in ("map", "mask") if row.get(k)},
            )
        )
    return write_report(
        out / REPORT,
        items,
        title=title or "pyramidflow predictions",
        threshold=threshold,
        metrics=label_metrics(items, threshold),
    )
