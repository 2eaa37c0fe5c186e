"""Prediction runs over many image files: streamed, atomic, resumable.

:mod:`.naming` names the outputs and refuses to replace earlier results, :mod:`.journal`
keeps the ``scores.jsonl`` journal and writes the score tables, :mod:`.run` scores the
images (:func:`run_predict`; its module doc lists what a run writes).
"""

from __future__ import annotations

from .journal import COLUMNS, JOURNAL_VERSION
from .naming import (
    IMAGE_SUFFIXES,
    JOURNAL,
    MAX_NAME_CHARS,
    REPORT,
    RUN_FILES,
    TABLE_CSV,
    TABLE_JSON,
    OutputExistsError,
    check_outputs,
    key_stem,
    mvtec_label,
    output_names,
    safe_stem,
)
from .run import PredictSummary, run_predict

__all__ = [
    "COLUMNS",
    "IMAGE_SUFFIXES",
    "JOURNAL",
    "JOURNAL_VERSION",
    "MAX_NAME_CHARS",
    "REPORT",
    "RUN_FILES",
    "TABLE_CSV",
    "TABLE_JSON",
    "OutputExistsError",
    "PredictSummary",
    "check_outputs",
    "mvtec_label",
    "key_stem",
    "output_names",
    "run_predict",
    "safe_stem",
]
