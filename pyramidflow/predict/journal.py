"""The run's journal and score tables.

``scores.jsonl`` gets one JSON line per finished image, appended and flushed as it goes;
``resume`` reads it back. At the end of a run the rows go, atomically, to ``scores.csv``
and ``scores.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import PyramidFlowError
from ..io.atomic import atomic_write
from .naming import TABLE_CSV, TABLE_JSON

if TYPE_CHECKING:
    from ..api import Detector

COLUMNS = ("file", "score", "decision", "map", "overlay", "mask")
JOURNAL_VERSION = 1


def model_key(detector: Detector) -> str:
    """A fingerprint of the model: rows of another model must not be resumed (the reading
    policy ``max_pixels`` is not part of the model)."""
    config = {k: v for k, v in detector.config.to_dict().items() if k != "max_pixels"}
    payload = json.dumps(
        {"config": config, "info": detector.info, "t": detector.threshold},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_journal(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
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


class Journal:
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
        """Write one line and flush it."""
        self._handle.write(json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n")
        self._handle.flush()

    def sync(self) -> None:
        """Force the lines written so far to disk."""
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Sync and close."""
        self.sync()
        self._handle.close()


# A spreadsheet evaluates a cell that starts with one of these as a formula (tab and
# carriage return too: some programs strip them and read on).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_text(value: Any) -> Any:
    """A text cell as a spreadsheet shows it without evaluating it: text starting with
    ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a leading apostrophe (the
    convention spreadsheets read as "this is text"); numbers are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def write_tables(out: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``scores.csv`` and ``scores.json`` (the :data:`COLUMNS` of ``rows``) atomically.
    Text cells of the CSV are guarded against formula evaluation (:func:`spreadsheet_text`);
    the JSON keeps them as they are."""
    records = [{c: row.get(c, "") for c in COLUMNS} for row in rows]

    def write_csv(handle: IO[bytes]) -> None:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=list(COLUMNS))
        writer.writeheader()
        for record in records:
            cells = {k: spreadsheet_text(v) for k, v in record.items()}
            writer.writerow({**cells, "score": "" if record["score"] is None else record["score"]})
        text.flush()
        text.detach()

    atomic_write(out / TABLE_CSV, write_csv)
    payload = json.dumps(records, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    atomic_write(out / TABLE_JSON, lambda f: f.write(payload.encode("utf-8")))
