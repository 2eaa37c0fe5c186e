"""Property tests of the public API on arbitrary inputs: a correct result or the documented
error (DataError / ValueError with a message), never a crash of another kind."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyramidflow import Config, Detector
from pyramidflow.errors import DataError
from pyramidflow.metrics import evaluate_maps

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SMALLEST_SIDE = 2  # 2^(levels - 1) for the detector below (levels = 2)
DTYPES = (np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_)


@pytest.fixture(scope="module")
def detector() -> Detector:
    rng = np.random.default_rng(0)
    good = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(6)]
    config = Config(image_size=32, levels=2, stacks=1, channels=4, kernel_size=3, epochs=1)
    return Detector(config).fit(good)


def _pixels(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    if dtype is np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.random(shape).astype(dtype)


@st.composite
def pixel_arrays(draw: st.DrawFn) -> tuple[np.ndarray, str]:
    """An array and what it is: "ok", "huge" (finite but far out of range) or "bad"."""
    kind = "ok"
    shape_kind = draw(st.sampled_from(["small", "tiny", "wide", "tall", "empty", "rank"]))
    if shape_kind == "small":
        height, width = draw(st.integers(2, 48)), draw(st.integers(2, 48))
    elif shape_kind == "tiny":
        height, width = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    elif shape_kind == "wide":
        height, width = draw(st.integers(1, 3)), draw(st.integers(100, 600))
    elif shape_kind == "tall":
        height, width = draw(st.integers(100, 600)), draw(st.integers(1, 3))
    else:
        height, width = (0, draw(st.integers(0, 5))) if shape_kind == "empty" else (4, 4)
        kind = "bad"
    if min(height, width) < SMALLEST_SIDE:
        kind = "bad"  # fewer pixels per side than the pyramid has levels to halve
    channels = draw(st.sampled_from([None, 1, 2, 3, 4, 0, 5]))
    shape: tuple[int, ...] = (height, width) if channels is None else (height, width, channels)
    if channels in (0, 5):
        kind = "bad"
    if shape_kind == "rank":
        shape = draw(st.sampled_from([(), (7,), (2, 4, 4, 3), (1, 1, 1, 1, 1)]))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    array = np.asarray(_pixels(rng, shape, dtype))
    if array.dtype.kind == "f" and array.size:
        special = draw(st.sampled_from([None, None, "nan", "inf", "-inf", "scale"]))
        if special == "scale":
            array = np.asarray(array * draw(st.sampled_from([-1.0, 1e3, 1e30, -1e38])))
            kind = "huge" if kind == "ok" else kind
        elif special is not None:
            array.flat[draw(st.integers(0, array.size - 1))] = float(special)
            kind = "bad"
    return array, kind


@FAST
@given(case=pixel_arrays())
def test_predict_on_any_pixel_array_gives_a_full_size_map_or_a_data_error(
    detector: Detector, case: tuple[np.ndarray, str]
) -> None:
    array, kind = case
    try:
        prediction = detector.predict(array)
    except DataError as exc:
        assert kind != "ok", f"rejected a usable {array.dtype} {array.shape} array: {exc}"
        assert str(exc).startswith("array 0:") and "\n" not in str(exc)
        return
    assert kind != "bad", f"accepted an unusable {array.dtype} {array.shape} array"
    assert not isinstance(prediction, list)
    assert prediction.anomaly_map.shape == array.shape[:2]
    assert prediction.anomaly_map.dtype == np.float32
    assert np.isfinite(prediction.anomaly_map).all() and math.isfinite(prediction.score)
    assert prediction.mask is not None and prediction.mask.shape == array.shape[:2]


@FAST
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    model_shape=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int32, torch.bool]),
    fill=st.sampled_from([0.0, 1.0, -3.5, float("nan"), float("inf"), 1e38]),
)
def test_predict_on_any_tensor_gives_maps_or_a_value_error(
    detector: Detector, shape: list[int], model_shape: bool, dtype: torch.dtype, fill: float
) -> None:
    if model_shape:  # reach the usable case often
        shape = [min(shape[0], 3), 3, 32, 32]
    batch = torch.full(shape, fill).to(dtype)
    usable = len(shape) == 4 and shape[1:] == [3, 32, 32] and batch.is_floating_point()
    try:
        predictions = detector.predict(batch)
    except ValueError as exc:  # DataError is one
        assert str(exc) and "\n" not in str(exc)
        moderate = math.isfinite(fill) and abs(fill) <= 10
        assert not (usable and moderate), f"rejected a usable {dtype} batch {shape}: {exc}"
        return
    assert usable, f"accepted {dtype} {shape}"
    assert isinstance(predictions, list) and len(predictions) == shape[0]
    for prediction in predictions:
        assert prediction.anomaly_map.shape == (32, 32)
        assert np.isfinite(prediction.anomaly_map).all() and math.isfinite(prediction.score)


def test_predict_rejects_items_that_are_not_images(detector: Detector) -> None:
    with pytest.raises(TypeError, match="item 1 is a list"):
        detector.predict([np.zeros((4, 4)), [[0.0]]])
    assert detector.predict([]) == []
    assert detector.predict(torch.zeros(0, 3, 32, 32)) == []


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = [
    "levels", "stacks", "channels", "kernel_size", "volume_norm", "image_size", "in_channels",
    "memory", "memory_budget", "backend", "conv_precision", "mean", "std", "normalization",
    "geometry",
    "holdout_fraction", "threshold_quantile", "batch_size", "epochs", "lr", "betas", "augment",
    "seed", "clamp", "eps", "weight_decay", "grad_clip", "category", "extra",
]  # fmt: skip


@FAST
@given(
    values=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON_VALUES, max_size=4)
)
def test_config_from_any_dict_is_a_config_or_a_value_error_naming_a_field(
    values: dict[str, Any],
) -> None:
    try:
        config = Config.from_dict(values)
    except ValueError as exc:
        assert any(name in str(exc) for name in FIELDS + ["unknown config keys", "image_size"])
        return
    config.validate()
    assert Config.from_json(config.to_json()) == config  # a valid config survives the file


@FAST
@given(
    n=st.integers(0, 4),
    size=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    mask_shape_off=st.booleans(),
    map_fill=st.sampled_from(["random", "constant", "nan"]),
    mask_kind=st.sampled_from(["random", "none", "all", "ints"]),
    seed=st.integers(0, 1000),
)
def test_metrics_on_any_maps_give_bounded_numbers_or_a_value_error(
    n: int, size: tuple[int, int], mask_shape_off: bool, map_fill: str, mask_kind: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    maps = rng.random((n, *size)).astype(np.float32)
    if map_fill == "constant":
        maps[:] = 0.5
    elif map_fill == "nan" and maps.size:
        maps.flat[0] = np.nan
    masks = rng.random((n, size[0] + mask_shape_off, size[1])) < 0.3
    if mask_kind == "none":
        masks[:] = False
    elif mask_kind == "all":
        masks[:] = True
    masks_in: np.ndarray = masks.astype(np.int64) * 2 if mask_kind == "ints" else masks
    try:
        metrics = evaluate_maps(maps, masks_in, maps.reshape(n, -1).max(1) if n else None)
    except ValueError as exc:
        assert str(exc)
        return
    assert not mask_shape_off and map_fill != "nan"
    assert not (mask_kind == "ints" and masks.any())  # 0/2 masks are not 0/1 labels
    for name, value in metrics.items():
        assert isinstance(value, float), name
        assert math.isnan(value) or (name.endswith("threshold") or 0.0 <= value <= 1.0), name


def test_an_empty_tensor_batch_is_checked_like_any_other(detector: Detector) -> None:
    """No image means no map, but a batch of the wrong shape is refused even when empty
    (found by the fuzz test above: an empty batch never reached the model's checks)."""
    assert detector.predict(torch.zeros(0, 3, 32, 32)) == []
    with pytest.raises(ValueError, match="3-channel images, got 0 channels"):
        detector.predict(torch.zeros(0, 0, 0, 0))
