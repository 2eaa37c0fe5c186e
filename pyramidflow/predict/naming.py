"""Output names of a prediction run: safe, unique stems, the run's files, and the check
that refuses to replace earlier results or input images."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from ..errors import PyramidFlowError

JOURNAL = "scores.jsonl"
TABLE_CSV = "scores.csv"
TABLE_JSON = "scores.json"
REPORT = "report.html"
RUN_FILES = (TABLE_CSV, TABLE_JSON, JOURNAL, REPORT)
IMAGE_SUFFIXES = ("_map.tiff", "_overlay.png", "_mask.png")
MAX_NAME_CHARS = 80
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{prefix}{digit}" for prefix in ("COM", "LPT") for digit in "123456789"
}


class OutputExistsError(PyramidFlowError):
    """The output folder holds results of an earlier run and neither resume nor overwrite
    was asked for."""


def safe_stem(path: str | os.PathLike[str]) -> str:
    """A file-name stem from an input path that cannot leave the output folder.

    Letters and digits (any script) are kept, as are ``-``, ``_`` and single dots; every
    other character (separators, spaces, ``%``, control characters) becomes ``_``. No
    leading dot or dash (hidden files, options), no ``..``, at most 80 characters, never
    empty or a reserved device name.
    """
    return _safe_name(Path(path).stem)


def _safe_name(text: str) -> str:
    stem = unicodedata.normalize("NFC", text)
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


def key_stem(key: str) -> str:
    """The output stem of an input key (its path inside the input folder, see
    ``expand_named_inputs``): the folders joined to the file's stem with ``_``
    (``crack/000.png`` -> ``crack_000``), then made safe by :func:`safe_stem`."""
    parts = Path(key).parts
    if not parts:
        return _safe_name(key)
    return _safe_name("_".join([*parts[:-1], Path(parts[-1]).stem]))


def output_names(paths: Sequence[Path], keys: Sequence[str] | None = None) -> list[str]:
    """Unique, safe output stems, the same for the same inputs (which resume relies on).

    A name is made from the input's key (:func:`key_stem`; without ``keys``, the file's
    name): ``crack/000.png`` -> ``crack_000``. When several inputs still share one (also
    case-insensitively, for macOS and Windows disks), the first keeps it and the others get
    a short hash of their full path appended.
    """
    if keys is not None and len(keys) != len(paths):
        raise ValueError(f"{len(keys)} keys for {len(paths)} paths")
    names: list[str] = []
    seen: set[str] = set()
    for index, path in enumerate(paths):
        stem = safe_stem(path) if keys is None else key_stem(keys[index])
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
