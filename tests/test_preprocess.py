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
from pyramidflow.cli import main
from pyramidflow.config import IMAGENET_MEAN, IMAGENET_STD
from pyramidflow.errors import DataError
from pyramidflow.preprocess import load_stack, padded_size, prepare, restore_map
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


def test_prepare_gives_normalized_chw_at_the_model_size() -> None:
    config = Config(image_size=32, levels=3, stacks=1, channels=8)
    colour = np.array([10, 128, 250], np.uint8)
    image = np.broadcast_to(colour, (40, 56, 3)).copy()
    tensor = prepare(image, config)
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (3, 32, 32)
    expected = (colour / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for c in range(3):
        np.testing.assert_allclose(tensor[c].numpy(), expected[c], atol=1e-5)


def test_prepare_non_square_size_and_gray_input() -> None:
    config = Config(image_size=(32, 48), levels=3, stacks=1, channels=8)
    tensor = prepare(np.full((20, 30), 0.5, np.float32), config)
    assert tuple(tensor.shape) == (3, 32, 48)
    np.testing.assert_allclose(
        tensor[:, 0, 0].numpy(), (0.5 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-5
    )


def test_prepare_preserves_layout_when_resizing() -> None:
    """The bright left half stays on the left after resizing (no transposition)."""
    config = Config(image_size=32, levels=3, stacks=1, channels=8)
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :48] = 255
    tensor = prepare(image, config)
    assert tensor[:, :, :12].mean() > tensor[:, :, 20:].mean() + 1.0


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


def test_load_stack_and_check_use_native_geometry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A native-size model gets its images padded, not resized, by load_stack and by the
    ``check`` command, as in training and prediction."""
    arrays = [a.astype(np.uint8) for a in _textures(6, (30, 45, 3), 255)]
    det = Detector(Config(**{**TINY, "geometry": "native"})).fit(arrays)
    model_path = det.save(tmp_path / "native.safetensors")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, array in enumerate(arrays[:3]):
        Image.fromarray(array).save(folder / f"{i}.png")
    stack = load_stack(sorted(folder.iterdir()), det.config)
    assert tuple(stack.shape) == (3, 3, 32, 48)
    for i in range(3):
        torch.testing.assert_close(stack[i], prepare(arrays[i], det.config), rtol=0, atol=0)
    mean, std = (torch.tensor(v)[:, None, None] for v in (det.config.mean, det.config.std))
    unpadded = torch.from_numpy(arrays[0] / 255.0).permute(2, 0, 1).float()
    torch.testing.assert_close(stack[0, :, :30, :45], (unpadded - mean) / std)
    assert torch.equal(stack[0, :, 31, :45], stack[0, :, 29, :45])  # edge replicated

    code = main(["check", str(model_path), str(folder)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0, lines
    errors = [float(line.split()[1]) for line in lines[:3]]
    assert all(e < 1e-4 for e in errors) and lines[3].startswith("0 of 3")

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "too_big.png")
    assert main(["check", str(model_path), str(folder)]) == 1
    err = capsys.readouterr().err
    assert "too_big.png" in err and "trained at 32x48" in err and err.count("\n") == 1


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
    assert pred.mask.any() == (pred.anomaly_map.max() >= det.map_threshold())


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
    assert sorted(set(links)) == ["a.png", "b.png"]
    assert all((tmp_path / link).is_file() for link in links)
    assert (
        "<svg" in text
        and "image_auroc" in text
        and "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    assert text.index("b.png") < text.index("a.png")  # highest score first
