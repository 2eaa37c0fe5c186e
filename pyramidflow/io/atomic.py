"""Files written all at once or not at all (checkpoints, predictions, reports, tables)."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".pyramidflow-tmp"


def _new_file_mode(path: Path) -> int:
    """The existing file's permissions, else what a plain ``open(path, "w")`` would give."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``writer(handle)`` on a temporary file in the same folder.

    The temporary file is flushed to disk and renamed onto ``path`` (replacing a file or
    a symlink there, never what it points to), then the rename is made durable. On any
    error, including a full disk or an interrupt, the temporary file is removed and an
    existing ``path`` is left untouched.
    """
    path = Path(path)
    mode = _new_file_mode(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)  # reopened by name: some writers (tifffile) want a named file
    try:
        with open(tmp_name, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)  # mkstemp makes 0600 files
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    _sync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); harmless to skip where folders cannot be opened."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files a killed run left in ``folder`` (only ours, by their suffix)."""
    for leftover in folder.glob(f".*{TMP_SUFFIX}"):
        try:
            leftover.unlink()
        except OSError:
            pass
