"""Exact, sort-based anomaly-detection and localization metrics.

Every metric here is computed exactly from one global sort of the scores (no threshold grid),
with tied scores handled as a single threshold:

* :func:`auroc` / :func:`pixel_auroc` / :func:`image_auroc`: ROC AUC (Mann-Whitney statistic,
  ties count 1/2), computed with integer arithmetic.
* :func:`aupro`: area under the per-region-overlap curve up to ``max_fpr`` (MVTec AD, Bergmann
  et al.), the standard localization metric.
* :func:`aupro_full_range`: the same curve over FPR in [0, 1], as reported by PyramidFlow.
* :func:`f1_max`: best F1 over all thresholds.
* :func:`evaluate_maps`: all of the above for a stack of anomaly maps.

Inputs may be numpy arrays or torch tensors (any device). Scores keep float32/float64 precision
(others are converted to float64), labels and masks must be boolean or 0/1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "REPORTED_METRICS",
    "json_safe",
    "mean_metrics",
    "auroc",
    "aupro",
    "aupro_full_range",
    "evaluate_maps",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
]

_EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------
# Input conversion and validation
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and moved to the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:  # float16 / bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _as_scores(x: Any, name: str = "scores") -> np.ndarray:
    """Convert to a float32/float64 array and reject NaN and empty input."""
    a = _to_numpy(x)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
        if np.iscomplexobj(a):
            raise ValueError(f"{name} must be real-valued, got dtype {a.dtype}")
        a = a.astype(np.float64)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN values")
    return a


def _as_labels(x: Any, name: str = "labels") -> np.ndarray:
    """Convert to a boolean array; values must be boolean or exactly 0/1."""
    a = _to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be boolean or 0/1, got dtype {a.dtype}")
    if ((a != 0) & (a != 1)).any():
        raise ValueError(f"{name} must contain only 0/1 (or boolean) values")
    return a != 0


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {name_a} {a.shape} vs {name_b} {b.shape}")


def _as_stack(a: np.ndarray, name: str) -> np.ndarray:
    """Bring a map/mask array to (N, H, W); accepts (H, W), (N, H, W) and (N, 1, H, W)."""
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3:
        return a
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    raise ValueError(f"{name} must have shape (N, H, W), (N, 1, H, W) or (H, W), got {a.shape}")


def _maps_and_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _as_scores(maps, "maps")
    g = _as_labels(masks, "masks")
    _check_same_shape(m, g, "maps", "masks")
    return _as_stack(m, "maps"), _as_stack(g, "masks")


def _require_both_classes(labels: np.ndarray, name: str) -> tuple[int, int]:
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        kind = "positive" if n_pos == 0 else "negative"
        raise ValueError(
            f"only one class present in {name} (no {kind} samples); the metric is undefined"
        )
    return n_pos, n_neg


# --------------------------------------------------------------------------------------------
# Core: one descending sort, cumulative counts at distinct thresholds
# --------------------------------------------------------------------------------------------


@dataclass
class _Ranked:
    """Cumulative counts at each distinct threshold, thresholds in descending order.

    Entry ``i`` describes the prediction ``score >= thresholds[i]``.
    """

    thresholds: np.ndarray  # (T,) distinct scores, descending
    tp: np.ndarray  # (T,) int64, positives with score >= threshold
    fp: np.ndarray  # (T,) int64, negatives with score >= threshold
    weight: np.ndarray | None  # (T,) float64, cumulative per-sample weight (PRO), if requested
    n_pos: int
    n_neg: int


def _rank(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> _Ranked:
    """Sort once (descending) and accumulate counts at the last index of each tie group.

    ``weights`` is an optional lookup table indexed by ``labels`` (then an integer region-id
    array, 0 = negative); its cumulative sum is returned in ``_Ranked.weight``.
    """
    s = scores.reshape(-1)
    y = labels.reshape(-1)
    n = s.size
    order = np.argsort(s)[::-1]  # descending; order within ties is irrelevant
    s_sorted = s[order]
    y_sorted = y[order]
    del order

    # Last index of every group of tied scores (the groups are contiguous after sorting).
    ends = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    ends = np.append(ends, n - 1)
    thresholds = s_sorted[ends]
    del s_sorted

    is_pos = y_sorted if y_sorted.dtype == np.bool_ else y_sorted > 0
    count_dtype = np.int32 if n < 2**31 - 1 else np.int64
    tp = np.cumsum(is_pos, dtype=count_dtype)[ends].astype(np.int64)
    del is_pos
    fp = ends.astype(np.int64) + 1 - tp
    n_pos = int(tp[-1])
    n_neg = int(fp[-1])

    weight = None
    if weights is not None:
        w = weights[y_sorted]
        del y_sorted
        np.cumsum(w, out=w)
        weight = w[ends]
    return _Ranked(thresholds, tp, fp, weight, n_pos, n_neg)


def _auroc_from_ranked(r: _Ranked) -> float:
    """Exact ROC AUC (trapezoid over distinct thresholds == Mann-Whitney with ties as 1/2)."""
    tp_prev = np.concatenate(([0], r.tp[:-1]))
    fp_prev = np.concatenate(([0], r.fp[:-1]))
    # Twice the trapezoid area in count units; exact in int64 (bounded by 2 * n_pos * n_neg).
    twice_area = int(np.dot(r.fp - fp_prev, r.tp + tp_prev))
    return float(twice_area / (2 * r.n_pos * r.n_neg))


def _f1_from_ranked(r: _Ranked) -> tuple[float, float]:
    """Best F1 = 2 TP / (TP + FP + P) over distinct thresholds; ties go to the highest threshold."""
    f1 = 2.0 * r.tp / (r.tp + r.fp + r.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(r.thresholds[best])


def _pro_curve(r: _Ranked) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold with (0, 0) prepended; FPR is non-decreasing."""
    assert r.weight is not None
    fpr = np.concatenate(([0.0], r.fp / r.n_neg))
    pro = np.concatenate(([0.0], r.weight))
    return fpr, pro


def _integrate(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under ``pro(fpr)`` on [0, max_fpr], interpolating PRO at ``max_fpr``."""
    k = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr
    x = fpr[:k]
    y = pro[:k]
    area = float(np.dot(np.diff(x), (y[1:] + y[:-1]) * 0.5))
    if k < fpr.size:  # fpr[k-1] <= max_fpr < fpr[k]: add the partial segment
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += float((max_fpr - x0) * (y0 + y_end) * 0.5)
    return area


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Globally numbered 8-connected components of each mask (0 = normal pixel)."""
    ids = np.zeros(masks.shape, dtype=np.int32 if masks.size < 2**31 - 1 else np.int64)
    n_regions = 0
    for i in range(masks.shape[0]):
        lab, k = ndimage.label(masks[i], structure=_EIGHT_CONNECTIVITY)
        if k:
            ids[i] = np.where(lab > 0, lab + n_regions, 0)
            n_regions += k
    return ids, n_regions


def _rank_regions(maps: np.ndarray, masks: np.ndarray) -> _Ranked:
    """Rank pixels with PRO weights: a pixel of region k weighs 1 / (|k| * n_regions)."""
    ids, n_regions = _region_ids(masks)
    sizes = np.bincount(ids.reshape(-1), minlength=n_regions + 1)
    table = np.zeros(n_regions + 1, dtype=np.float64)
    if n_regions:
        table[1:] = 1.0 / (sizes[1:].astype(np.float64) * n_regions)
    return _rank(maps, ids, table)


def _check_max_fpr(max_fpr: float) -> float:
    max_fpr = float(max_fpr)
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    return max_fpr


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def auroc(scores: Any, labels: Any) -> float:
    """Exact ROC AUC of ``scores`` for binary ``labels`` (tied scores count 1/2).

    Equals P(s_pos > s_neg) + 0.5 P(s_pos == s_neg); one O(n log n) sort, no threshold grid.
    """
    s = _as_scores(scores, "scores")
    y = _as_labels(labels, "labels")
    _check_same_shape(s, y, "scores", "labels")
    _require_both_classes(y, "labels")
    return _auroc_from_ranked(_rank(s, y))


def pixel_auroc(maps: Any, masks: Any) -> float:
    """Pixel-level ROC AUC of anomaly ``maps`` (N, H, W) against ground-truth ``masks``."""
    m, g = _maps_and_masks(maps, masks)
    _require_both_classes(g, "masks")
    return _auroc_from_ranked(_rank(m, g))


def image_auroc(image_scores: Any, image_labels: Any) -> float:
    """Image-level ROC AUC of per-image anomaly scores against per-image labels."""
    s = _as_scores(image_scores, "image_scores")
    y = _as_labels(image_labels, "image_labels")
    _check_same_shape(s, y, "image_scores", "image_labels")
    _require_both_classes(y, "image_labels")
    return _auroc_from_ranked(_rank(s, y))


def aupro(maps: Any, masks: Any, max_fpr: float = 0.3, normalize: bool = True) -> float:
    """Area under the per-region-overlap (PRO) curve for FPR in [0, ``max_fpr``].

    Standard MVTec AD definition (Bergmann et al.): regions are the 8-connected components of
    each mask; PRO(t) is the mean over all regions of the fraction of the region with
    ``map >= t``; FPR(t) is the fraction of normal pixels with ``map >= t``. The curve is
    computed exactly at every distinct score, integrated with the trapezoid rule (PRO linearly
    interpolated at ``max_fpr``), and divided by ``max_fpr`` when ``normalize``.
    """
    max_fpr = _check_max_fpr(max_fpr)
    m, g = _maps_and_masks(maps, masks)
    _require_both_classes(g, "masks")
    fpr, pro = _pro_curve(_rank_regions(m, g))
    area = _integrate(fpr, pro, max_fpr)
    return float(area / max_fpr) if normalize else float(area)


def aupro_full_range(maps: Any, masks: Any) -> float:
    """AUPRO integrated over the whole FPR range [0, 1] (= ``aupro(maps, masks, max_fpr=1.0)``).

    This is the PyramidFlow authors' definition. It is not comparable with the standard
    FPR <= 0.3 AUPRO of :func:`aupro`: the high-FPR part of the curve, where PRO is close to 1
    for any reasonable map, dominates the area and inflates the numbers.
    """
    return aupro(maps, masks, max_fpr=1.0, normalize=True)


def f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 over all thresholds (positive when ``score >= threshold``) and its threshold.

    Exact: every distinct score is tried. If several thresholds reach the maximum, the highest
    one is returned.
    """
    s = _as_scores(scores, "scores")
    y = _as_labels(labels, "labels")
    _check_same_shape(s, y, "scores", "labels")
    _require_both_classes(y, "labels")
    return _f1_from_ranked(_rank(s, y))


def evaluate_maps(maps: Any, masks: Any, image_scores: Any | None = None) -> dict[str, float]:
    """All metrics for anomaly ``maps`` (N, H, W) and ground-truth ``masks`` (N, H, W).

    Image scores default to the maximum of each map; image labels are ``mask.any()`` per image.
    Metrics undefined for the data (single-class image labels, or no anomalous / no normal
    pixels) are ``nan`` instead of raising. Pixel metrics share a single sort.
    """
    m, g = _maps_and_masks(maps, masks)
    n = m.shape[0]
    if image_scores is None:
        s_img = m.reshape(n, -1).max(axis=1)
    else:
        s_img = _as_scores(image_scores, "image_scores").reshape(-1)
        if s_img.shape != (n,):
            raise ValueError(f"image_scores must have {n} values (one per map), got {s_img.size}")
    y_img = g.reshape(n, -1).any(axis=1)

    nan = float("nan")
    out = {
        "pixel_auroc": nan,
        "image_auroc": nan,
        "aupro": nan,
        "aupro_full_range": nan,
        "pixel_f1_max": nan,
        "image_f1_max": nan,
    }
    n_anom = int(np.count_nonzero(g))
    if 0 < n_anom < g.size:
        r = _rank_regions(m, g)
        fpr, pro = _pro_curve(r)
        out["pixel_auroc"] = _auroc_from_ranked(r)
        out["aupro"] = _integrate(fpr, pro, 0.3) / 0.3
        out["aupro_full_range"] = _integrate(fpr, pro, 1.0)
        out["pixel_f1_max"] = _f1_from_ranked(r)[0]
    if 0 < int(np.count_nonzero(y_img)) < n:
        r_img = _rank(s_img, y_img)
        out["image_auroc"] = _auroc_from_ranked(r_img)
        out["image_f1_max"] = _f1_from_ranked(r_img)[0]
    return {k: float(v) for k, v in out.items()}


REPORTED_METRICS = (
    "pixel_auroc", "image_auroc", "aupro", "aupro_full_range", "pixel_f1_max", "image_f1_max",
)  # fmt: skip
"""The per-category metrics of ``evaluate``, ``benchmark`` and ``demo`` tables."""


def mean_metrics(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per-metric mean over categories; missing or NaN entries (no defective images, or
    null in a JSON file) are skipped, NaN where no category has the metric."""
    means = {}
    for key in REPORTED_METRICS:
        values = [r.get(key) for r in rows.values()]
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        means[key] = float(np.mean(finite)) if finite else float("nan")
    return means


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that ``json.dumps(...,
    allow_nan=False)`` writes strict JSON (``null``, not the non-standard ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def decision_threshold(scores: Any, quantile: float) -> tuple[float, str]:
    """The image-score threshold from good images' scores, and the rule used.

    Fewer than ``1 / (1 - quantile)`` positive scores (at least 3): the one-sided
    ``quantile`` prediction bound of a log-normal fit, ``exp(m + t * s * sqrt(1 + 1/n))``
    with ``m``, ``s`` the mean and standard deviation (n - 1) of the log scores and ``t``
    Student's ``quantile`` point with n - 1 degrees of freedom: a new good image exceeds it
    with probability ``1 - quantile`` when the log scores are normal. (The empirical
    quantile of so few scores is about their maximum, which a new good image exceeds with
    probability ~1 / (n + 1).) Otherwise the empirical ``quantile``."""
    values = _as_scores(scores)
    n = values.size
    if 3 <= n < 1.0 / (1.0 - quantile) and bool((values > 0).all()):
        from scipy import stats

        logs = np.log(values.astype(np.float64))
        spread = logs.std(ddof=1) * math.sqrt(1.0 + 1.0 / n)
        bound = logs.mean() + float(stats.t.ppf(quantile, n - 1)) * spread
        return float(math.exp(bound)), "log-normal bound"
    return float(np.quantile(values, quantile)), "quantile"
