"""Real-image preprocessing: channels kept, bit depth kept, native size, thresholds, report."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from pyramidflow import Config, Detector
from pyramidflow.errors import DataError
from pyramidflow.preprocess import padded_size, restore_map
from pyramidflow.report import ReportItem, write_report
from pyramidflow.synthetic import generate_category

TINY = dict(image_size=32, levels=3, stacks=1, channels=8, kernel_size=3, epochs=1, batch_size=2)


def _textures(n: int, shape: tuple[int, ...], scale: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = 0.5 + 0.25 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    out = []
    for _ in range(n):
        img = base + 0.02 * rng.standard_normal(shape[:2])
        if len(shape) == 3:
            img = np.stack([img * f for f in (1.0, 0.9, 0.8)[: shape[2]]], axis=2)
        out.append(np.clip(img, 0, 1) * scale)
    return out


def test_gray_images_get_a_one_channel_model_with_their_own_statistics() -> None:
    arrays = [a.astype(np.uint8) for a in _textures(6, (32, 32), 255)]
    det = Detector(Config(**TINY)).fit(arrays)
    assert det.config.in_channels == 1
    assert det.config.normalization == "dataset"
    pixels = np.concatenate([a.ravel() / 255.0 for a in arrays])
    assert det.config.mean[0] == pytest.approx(pixels.mean(), rel=1e-5)
    assert det.config.std[0] == pytest.approx(pixels.std(), rel=1e-4)
    pred = det.predict(arrays[0])
    assert pred.anomaly_map.shape == (32, 32)
    with pytest.raises(DataError, match="array 0: image has 3 channel"):
        det.predict(np.zeros((32, 32, 3), np.uint8))


def test_rgb_8bit_uses_imagenet_statistics() -> None:
    arrays = [a.astype(np.uint8) for a in _textures(6, (32, 32, 3), 255)]
    det = Detector(Config(**TINY)).fit(arrays)
    assert det.config.in_channels == 3 and det.config.normalization == "imagenet"
    assert det.config.mean == pytest.approx((0.485, 0.456, 0.406))


def test_16bit_tiff_keeps_its_precision(tmp_path: Path) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    for i, a in enumerate(_textures(6, (32, 32), 60000)):
        tifffile.imwrite(folder / f"{i}.tif", a.astype(np.uint16))
    det = Detector(Config(**TINY)).fit(folder)
    assert det.config.in_channels == 1 and det.config.normalization == "dataset"
    image = tifffile.imread(folder / "0.tif")
    shifted = image.copy()
    shifted[8:16, 8:16] += 100  # below one 8-bit step (257): lost by a cast to 8 bit
    assert (image >> 8 == shifted >> 8).mean() > 0.95
    first, second = det.predict(image), det.predict(shifted)
    assert not np.allclose(first.anomaly_map, second.anomaly_map)


def test_native_geometry_pads_and_crops() -> None:
    arrays = [a.astype(np.uint8) for a in _textures(6, (30, 45, 3), 255)]
    det = Detector(Config(**{**TINY, "geometry": "native"})).fit(arrays)
    assert det.config.image_size == padded_size(30, 45, 3) == (32, 48)
    pred = det.predict(arrays[1])
    assert pred.anomaly_map.shape == (30, 45)
    with pytest.raises(DataError, match="trained at 32x48"):
        det.predict(np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(DataError, match="array 2: native-size training needs images of one"):
        Detector(Config(**{**TINY, "geometry": "native"})).fit(
            arrays[:2] + [np.zeros((32, 32, 3), np.uint8)]
        )
    amap = torch.arange(32 * 48, dtype=torch.float32).reshape(32, 48)
    assert np.array_equal(restore_map(amap, (30, 45), det.config), amap[:30, :45].numpy())


@pytest.fixture(scope="module")
def disc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_category(
        root, "disc", size=64, n_train=30, n_test_good=10, n_test_defect_per_type=2, seed=1
    )
    return root / "disc"


def test_threshold_from_good_images_flags_few_good_ones(disc: Path) -> None:
    config = Config(image_size=32, levels=3, stacks=1, channels=8, epochs=2, holdout_fraction=0.2)
    det = Detector(config).fit(disc)
    assert det.info["held_out_images"] == 6 and det.info["training_images"] == 24
    assert det.threshold is not None
    evaluation = det.evaluate(disc)
    good = evaluation.scores[[not s.is_defective for s in evaluation.samples]]
    flagged = (good >= det.threshold).mean()
    assert flagged <= 0.3, (flagged, det.threshold, good)
    pred = det.predict(str(disc / "test" / "good" / "000.png"))
    assert pred.mask is not None and pred.mask.shape == pred.anomaly_map.shape
    assert pred.is_anomalous == (pred.score >= det.threshold)
    assert pred.mask.any() == (pred.anomaly_map.max() >= det.threshold)


def test_report_is_static_and_links_only_local_files(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    items = [
        ReportItem("x/a.png", 0.2, "a.png", False, "good"),
        ReportItem("x/b.png", 0.9, "b.png", True, "scratch"),
    ]
    page = write_report(
        tmp_path / "report.html", items, threshold=0.5, metrics={"image_auroc": 1.0}
    )
    text = page.read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert sorted(links) == ["a.png", "b.png"]
    assert all((tmp_path / link).is_file() for link in links)
    assert (
        "<svg" in text
        and "image_auroc" in text
        and "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    assert text.index("b.png") < text.index("a.png")  # highest score first
