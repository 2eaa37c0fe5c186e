"""Comparing results in tests and checks: one relative error, computed in float64."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def _float64(value: ArrayLike) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64)
    return torch.from_numpy(np.asarray(value, dtype=np.float64))


def relative_error(
    actual: ArrayLike | Sequence[ArrayLike], expected: ArrayLike | Sequence[ArrayLike]
) -> float:
    """||actual - expected|| / ||expected|| in float64 (equal to RMS(error) / RMS(expected)).

    Tensors (any device) or arrays of one shape, or two equally long sequences of them,
    taken together as one vector. An all-zero ``expected`` gives the absolute error.
    """
    if isinstance(actual, (torch.Tensor, np.ndarray)):
        actual, expected = [actual], [expected]
    if len(actual) != len(expected):
        raise ValueError(f"{len(actual)} results against {len(expected)} expected ones")
    squared_error = squared_norm = 0.0
    for a, e in zip(actual, expected, strict=True):
        a, e = _float64(a), _float64(e)
        if a.shape != e.shape:
            raise ValueError(f"shape {tuple(a.shape)} against expected {tuple(e.shape)}")
        squared_error += float((a - e).pow(2).sum())
        squared_norm += float(e.pow(2).sum())
    if squared_norm == 0.0:
        return squared_error**0.5
    return (squared_error / squared_norm) ** 0.5
