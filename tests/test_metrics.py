"""Tests for pyramidflow.metrics: fast sort-based metrics vs slow, obviously correct versions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from pyramidflow.metrics import (
    aupro,
    aupro_full_range,
    auroc,
    evaluate_maps,
    f1_max,
    image_auroc,
    pixel_auroc,
)

TOL = 1e-10
SEEDS = [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------
# Slow reference implementations (definitions, written for clarity, not speed)
# --------------------------------------------------------------------------------------------


def slow_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(s_pos > s_neg) + 0.5 P(s_pos == s_neg) over all positive/negative pairs."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    pos, neg = s[y], s[~y]
    total = 0.0
    for p in pos:
        total += np.count_nonzero(p > neg) + 0.5 * np.count_nonzero(p == neg)
    return total / (len(pos) * len(neg))


def slow_pro_curve(maps: np.ndarray, masks: np.ndarray) -> list[tuple[float, float]]:
    """(FPR, PRO) at every distinct threshold, highest threshold first, with (0, 0) prepended."""
    masks = masks.astype(bool)
    regions = []  # boolean (N, H, W) mask of every 8-connected region
    for i in range(masks.shape[0]):
        lab, k = ndimage.label(masks[i], structure=np.ones((3, 3)))
        for r in range(1, k + 1):
            full = np.zeros(masks.shape, dtype=bool)
            full[i] = lab == r
            regions.append(full)
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        pred = maps >= t
        fpr = np.count_nonzero(pred & normal) / np.count_nonzero(normal)
        overlaps = [np.count_nonzero(pred & reg) / np.count_nonzero(reg) for reg in regions]
        points.append((fpr, float(np.mean(overlaps))))
    return points


def slow_trapezoid(points: list[tuple[float, float]], max_fpr: float) -> float:
    """Trapezoid rule over consecutive points up to max_fpr, interpolating the endpoint."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < max_fpr:
            y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_end) / 2
            break
        else:
            break
    return area


def slow_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    return slow_trapezoid(slow_pro_curve(maps, masks), max_fpr) / max_fpr


def slow_f1_all(scores: np.ndarray, labels: np.ndarray) -> dict[float, float]:
    """F1 of the rule `score >= t` for every distinct score t."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    out = {}
    for t in np.unique(s):
        pred = s >= t
        tp = np.count_nonzero(pred & y)
        fp = np.count_nonzero(pred & ~y)
        fn = np.count_nonzero(~pred & y)
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        out[float(t)] = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    return out


# --------------------------------------------------------------------------------------------
# Random data with ties
# --------------------------------------------------------------------------------------------


def random_maps(seed: int, decimals: int = 1, n: int = 6, h: int = 9, w: int = 11):
    """Maps rounded to `decimals` (many ties) and blobby masks with several regions each."""
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_dilation(rng.random((n, h, w)) < 0.04, structure=np.ones((1, 2, 2)))
    masks[0] = False  # at least one fully normal image
    masks[1, 2:4, 3:6] = True  # and at least one region
    maps = np.round(rng.random((n, h, w)) * 0.7 + 0.4 * masks, decimals)
    return maps, masks


# --------------------------------------------------------------------------------------------
# Fast vs slow
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_matches_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=300), 1)
    labels = rng.random(300) < 0.3
    scores[labels] += 0.5
    assert auroc(scores, labels) == pytest.approx(slow_auroc(scores, labels), abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_and_image_auroc_match_pairwise_definition(seed: int) -> None:
    maps, masks = random_maps(seed)
    assert pixel_auroc(maps, masks) == pytest.approx(slow_auroc(maps, masks), abs=TOL)
    img_scores = np.round(maps.reshape(6, -1).mean(1), 2)
    img_labels = masks.reshape(6, -1).any(1)
    expected = slow_auroc(img_scores, img_labels)
    assert image_auroc(img_scores, img_labels) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [1, 3])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_matches_threshold_loop(seed: int, decimals: int, max_fpr: float) -> None:
    maps, masks = random_maps(seed, decimals)
    expected = slow_aupro(maps, masks, max_fpr)
    assert aupro(maps, masks, max_fpr=max_fpr) == pytest.approx(expected, abs=TOL)
    unnormalized = aupro(maps, masks, max_fpr=max_fpr, normalize=False)
    assert unnormalized == pytest.approx(expected * max_fpr, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_max_matches_threshold_loop(seed: int) -> None:
    maps, masks = random_maps(seed)
    table = slow_f1_all(maps, masks)
    best, threshold = f1_max(maps, masks)
    assert best == pytest.approx(max(table.values()), abs=TOL)
    assert table[threshold] == pytest.approx(best, abs=TOL)  # the threshold really achieves it


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=-3, max_value=3), st.booleans()), min_size=2, max_size=40
    )
)
def test_auroc_property_fast_equals_slow(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([p[0] for p in pairs])
    labels = np.array([p[1] for p in pairs])
    assume(labels.any() and not labels.all())
    assert auroc(scores, labels) == pytest.approx(slow_auroc(scores, labels), abs=TOL)


# --------------------------------------------------------------------------------------------
# Known values
# --------------------------------------------------------------------------------------------


def test_auroc_known_values() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 0.0
    assert auroc(np.full(5, 0.42), labels) == 0.5
    # one tie between a positive and a negative: 5.5 of 6 pairs are correctly ordered
    assert auroc([0.1, 0.2, 0.5, 0.5, 0.9], [0, 0, 0, 1, 1]) == pytest.approx(5.5 / 6, abs=TOL)


def test_aupro_perfect_reversed_and_constant_maps() -> None:
    _, masks = random_maps(0)
    perfect = masks.astype(np.float64)
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=TOL)
    assert aupro_full_range(perfect, masks) == pytest.approx(1.0, abs=TOL)
    assert aupro(1.0 - perfect, masks) == pytest.approx(0.0, abs=TOL)
    # A constant map has the single curve point (FPR, PRO) = (1, 1): PRO == FPR, so the
    # normalized area up to max_fpr is exactly max_fpr / 2.
    for max_fpr in (0.3, 0.1, 1.0):
        const = np.zeros_like(perfect)
        assert aupro(const, masks, max_fpr=max_fpr) == pytest.approx(max_fpr / 2, abs=TOL)


def test_aupro_weights_regions_equally() -> None:
    # Two regions, 1 pixel and 8 pixels; the map detects only the small one with no false
    # positives. Curve: (0, 0) -> (0, 0.5) -> (1, 1). Pixel-wise recall would be only 1/9.
    masks = np.zeros((1, 4, 8), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 3, :] = True
    maps = np.zeros((1, 4, 8))
    maps[0, 0, 0] = 1.0
    area = 0.3 * (0.5 + 0.65) / 2  # trapezoid from (0, 0.5) to (0.3, 0.65)
    assert aupro(maps, masks) == pytest.approx(area / 0.3, abs=TOL)
    assert aupro_full_range(maps, masks) == pytest.approx(0.75, abs=TOL)


def test_aupro_regions_use_8_connectivity() -> None:
    # Diagonal neighbours form one region: regions {(0,0), (1,1)} and {(5,5)}. Detecting (0,0)
    # only gives PRO = mean(1/2, 0) = 1/4 (4-connectivity would give 1/3).
    masks = np.zeros((1, 7, 7), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 5, 5] = True
    maps = np.zeros((1, 7, 7))
    maps[0, 0, 0] = 1.0
    assert aupro_full_range(maps, masks) == pytest.approx((0.25 + 1.0) / 2, abs=TOL)


def test_regions_do_not_merge_across_images() -> None:
    # The same pixel anomalous in two images is two regions, not one.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[:, 1, 1] = True
    maps = np.zeros((2, 3, 3))
    maps[0, 1, 1] = 1.0
    assert aupro_full_range(maps, masks) == pytest.approx((0.5 + 1.0) / 2, abs=TOL)


def test_f1_max_known_values() -> None:
    best, threshold = f1_max([0.1, 0.2, 0.7, 0.9], [0, 0, 1, 1])
    assert (best, threshold) == (1.0, 0.7)
    # Constant scores: only one threshold, everything predicted positive.
    best, threshold = f1_max([3, 3, 3, 3], [0, 1, 0, 1])
    assert best == pytest.approx(2 * 0.5 * 1 / 1.5, abs=TOL)
    assert threshold == 3.0


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_aupro_full_range_equals_aupro_at_max_fpr_one(seed: int) -> None:
    maps, masks = random_maps(seed, decimals=2)
    assert aupro_full_range(maps, masks) == aupro(maps, masks, max_fpr=1.0)


# --------------------------------------------------------------------------------------------
# Invariance and input types
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_invariant_under_strictly_increasing_transform(seed: int) -> None:
    maps, masks = random_maps(seed, decimals=2)
    warped = np.exp(3.0 * maps) + maps**3  # strictly increasing, keeps ties and distinctness
    same_ranks = (
        np.unique(maps, return_inverse=True)[1] == np.unique(warped, return_inverse=True)[1]
    )
    assert same_ranks.all()
    assert pixel_auroc(warped, masks) == pytest.approx(pixel_auroc(maps, masks), abs=1e-12)
    assert aupro(warped, masks) == pytest.approx(aupro(maps, masks), abs=1e-12)
    assert aupro_full_range(warped, masks) == pytest.approx(
        aupro_full_range(maps, masks), abs=1e-12
    )
    assert f1_max(warped, masks)[0] == pytest.approx(f1_max(maps, masks)[0], abs=1e-12)


def test_torch_and_float32_inputs_give_same_results() -> None:
    maps, masks = random_maps(3, decimals=3)
    t_maps, t_masks = torch.from_numpy(maps), torch.from_numpy(masks)
    assert pixel_auroc(t_maps, t_masks) == pixel_auroc(maps, masks)
    assert aupro(t_maps, t_masks) == aupro(maps, masks)
    assert aupro(maps, masks.astype(np.uint8)) == aupro(maps, masks)
    # float32 keeps the ordering of these values, so results are identical
    assert aupro(maps.astype(np.float32), masks) == pytest.approx(aupro(maps, masks), abs=TOL)
    assert pixel_auroc(t_maps.half(), t_masks.float()) == pytest.approx(
        slow_auroc(t_maps.half().float().numpy(), masks), abs=TOL
    )
    # (N, 1, H, W) masks and maps are accepted
    assert aupro(maps[:, None], masks[:, None]) == aupro(maps, masks)


def test_returns_python_floats() -> None:
    maps, masks = random_maps(0)
    for value in (auroc(maps, masks), pixel_auroc(maps, masks), aupro(maps, masks)):
        assert type(value) is float
    best, threshold = f1_max(maps, masks)
    assert type(best) is float and type(threshold) is float


# --------------------------------------------------------------------------------------------
# evaluate_maps
# --------------------------------------------------------------------------------------------


def test_evaluate_maps_matches_individual_metrics() -> None:
    maps, masks = random_maps(4, decimals=2)
    out = evaluate_maps(maps, masks)
    img_scores = maps.reshape(6, -1).max(1)
    img_labels = masks.reshape(6, -1).any(1)
    assert set(out) == {
        "pixel_auroc",
        "image_auroc",
        "aupro",
        "aupro_full_range",
        "pixel_f1_max",
        "image_f1_max",
    }
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(maps, masks), abs=TOL)
    assert out["aupro"] == pytest.approx(aupro(maps, masks), abs=TOL)
    assert out["aupro_full_range"] == pytest.approx(aupro_full_range(maps, masks), abs=TOL)
    assert out["pixel_f1_max"] == pytest.approx(f1_max(maps, masks)[0], abs=TOL)
    assert out["image_auroc"] == pytest.approx(image_auroc(img_scores, img_labels), abs=TOL)
    assert out["image_f1_max"] == pytest.approx(f1_max(img_scores, img_labels)[0], abs=TOL)
    custom = np.arange(6.0)
    out2 = evaluate_maps(maps, masks, image_scores=custom)
    assert out2["image_auroc"] == pytest.approx(slow_auroc(custom, img_labels), abs=TOL)


def test_evaluate_maps_undefined_metrics_are_nan() -> None:
    maps, masks = random_maps(1)
    defective_only = evaluate_maps(maps[1:2], masks[1:2])  # one image, with a defect
    assert math.isnan(defective_only["image_auroc"])
    assert math.isnan(defective_only["image_f1_max"])
    assert not math.isnan(defective_only["aupro"])
    good_only = evaluate_maps(maps[0:1], masks[0:1])  # no anomalous pixel at all
    assert all(math.isnan(v) for v in good_only.values())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors_on_bad_input() -> None:
    maps, masks = random_maps(0)
    with pytest.raises(ValueError, match="shape mismatch"):
        pixel_auroc(maps, masks[:, :-1])
    with pytest.raises(ValueError, match="shape mismatch"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="only one class"):
        auroc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="only one class"):
        aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="only one class"):
        f1_max([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="only one class"):
        image_auroc([0.1, 0.2], [True, True])
    bad = maps.copy()
    bad[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aupro(bad, masks)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_maps(bad, masks)
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([0.1, float("nan")]), [0, 1])
    with pytest.raises(ValueError, match="empty"):
        auroc([], [])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(maps, masks, max_fpr=0.0)
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(maps, masks, max_fpr=1.5)
    with pytest.raises(ValueError, match="shape"):
        aupro(maps.ravel(), masks.ravel())
    with pytest.raises(ValueError, match="image_scores"):
        evaluate_maps(maps, masks, image_scores=np.zeros(5))


def test_decision_threshold_is_a_log_normal_prediction_bound_for_small_sets():
    """From few good images, a new good image exceeds the threshold about 1 - quantile of
    the time (log-normal scores), where the empirical quantile (about the maximum) would be
    exceeded about 1 / (n + 1) of the time."""
    from pyramidflow.metrics import decision_threshold

    rng = np.random.default_rng(0)
    exceeded = {"log-normal bound": [], "quantile": []}
    for _ in range(2000):
        held_out = rng.lognormal(0.5, 0.3, size=6)
        new = rng.lognormal(0.5, 0.3, size=50)
        bound, rule = decision_threshold(held_out, 0.99)
        assert rule == "log-normal bound"
        exceeded[rule].append((new > bound).mean())
        exceeded["quantile"].append((new > np.quantile(held_out, 0.99)).mean())
    assert abs(np.mean(exceeded["log-normal bound"]) - 0.01) < 0.004
    assert np.mean(exceeded["quantile"]) > 0.1
    # many scores, too few, or not all positive: the empirical quantile
    many = rng.lognormal(size=500)
    assert decision_threshold(many, 0.99) == (float(np.quantile(many, 0.99)), "quantile")
    assert decision_threshold([1.0, 2.0], 0.99) == (float(np.quantile([1.0, 2.0], 0.99)),
                                                   "quantile")  # fmt: skip
    assert decision_threshold([0.0, 1.0, 2.0], 0.99)[1] == "quantile"
