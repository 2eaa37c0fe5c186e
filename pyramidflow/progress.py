"""Progress bars with ETA on every long loop (tqdm on stderr, off when not wanted)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(
    items: Iterable[T], description: str, *, enabled: bool = True, total: int | None = None
) -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar (description, count, rate, ETA) when ``enabled``."""
    if not enabled:
        return items
    return tqdm(items, desc=description, total=total, leave=False, dynamic_ncols=True)


def counter_bar(total: int, description: str, *, enabled: bool = True) -> tqdm:
    """A manually advanced bar (``update``/``set_postfix``/``close``); silent when disabled."""
    return tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, disable=not enabled)


def write_line(message: str, file: TextIO | None = None) -> None:
    """Print ``message`` (to stderr by default) as a line of its own: active bars are
    cleared first and redrawn below it, so the message never lands on a bar's line."""
    tqdm.write(message, file=sys.stderr if file is None else file)
