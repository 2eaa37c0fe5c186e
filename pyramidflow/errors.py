"""Errors for user mistakes: the CLI prints their message as one line, without a traceback."""

from __future__ import annotations


class PyramidFlowError(Exception):
    """Base of every error caused by input, files or arguments rather than by a bug."""


class DataError(PyramidFlowError, ValueError):
    """An image, mask or dataset folder that cannot be used; the message names it."""


class TrainingError(PyramidFlowError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""
