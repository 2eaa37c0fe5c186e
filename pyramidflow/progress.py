"""Progress bars with ETA on every long loop (tqdm on stderr, off when not wanted)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

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
