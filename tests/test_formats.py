"""Every supported image file format goes through training, saving, loading and prediction
with its channels and bit depth kept; full 1024 px images train and predict on the CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from pyramidflow import Config, Detector
from pyramidflow.cli import main
from pyramidflow.config import IMAGENET_MEAN, IMAGENET_STD
from pyramidflow.io.images import read_array

TINY = dict(image_size=32, levels=2, stacks=1, channels=4, kernel_size=3, epochs=1, batch_size=2)
TRAIN_SHAPE = (24, 40)  # non-square, smaller than the model size
PREDICT_SHAPE = (40, 56)  # another size again: maps come back at the image's own size
N_TRAIN = 6


def _texture(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """A good-looking texture: a periodic pattern, per-image phase and noise; float in [0, 1],
    (H, W) for one channel, (H, W, C) otherwise."""
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi)
    base = 0.5 + 0.3 * np.sin(xx / 3.0 + phase) * np.cos(yy / 4.0)
    img = np.clip(base + 0.05 * rng.standard_normal((height, width)), 0.0, 1.0)
    if channels == 1:
        return img
    return np.stack([img * f for f in (1.0, 0.85, 0.7)[:channels]], axis=2)


def _pil_writer(**options: object) -> Callable[[Path, np.ndarray], None]:
    def write(path: Path, pixels: np.ndarray) -> None:
        Image.fromarray(pixels).save(path, **options)

    return write


def _write_png16(path: Path, pixels: np.ndarray) -> None:
    """16-bit PNG (gray or colour) by libpng: Pillow cannot write 16-bit colour."""
    path.write_bytes(imagecodecs.png_encode(pixels))


@dataclass(frozen=True)
class Format:
    """One image file format: how to make pixels of it and how to write them."""

    suffix: str
    dtype: type
    channels: int
    write: Callable[[Path, np.ndarray], None]
    lossless: bool = True

    def pixels(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        unit = _texture(rng, *shape, self.channels)
        if self.dtype is np.uint8:
            return np.rint(20 + 200 * unit).astype(np.uint8)
        if self.dtype is np.uint16:
            return np.rint(1000 + 60000 * unit).astype(np.uint16)  # far above 8-bit values
        return unit.astype(np.float32)

    @property
    def normalization(self) -> str:
        """What "auto" normalization must resolve to: ImageNet for 8-bit RGB only."""
        return "imagenet" if self.channels == 3 and self.dtype is np.uint8 else "dataset"


FORMATS = {
    "png8_rgb": Format(".png", np.uint8, 3, _pil_writer()),
    "png8_gray": Format(".png", np.uint8, 1, _pil_writer()),
    "png16_gray": Format(".png", np.uint16, 1, _pil_writer()),
    "png16_rgb": Format(".png", np.uint16, 3, _write_png16),
    "jpeg_rgb": Format(".jpg", np.uint8, 3, _pil_writer(quality=95), lossless=False),
    "bmp_rgb": Format(".bmp", np.uint8, 3, _pil_writer()),
    "tiff8_rgb": Format(".tif", np.uint8, 3, tifffile.imwrite),
    "tiff16_gray": Format(".tif", np.uint16, 1, tifffile.imwrite),
    "tiff_f32_gray": Format(".tif", np.float32, 1, tifffile.imwrite),
    # as inspection cameras write them: compressed, with a predictor, tiled
    "tiff16_rgb_lzw": Format(
        ".tif",
        np.uint16,
        3,
        partial(tifffile.imwrite, compression="lzw", predictor=True, tile=(16, 16)),
    ),
    "tiff8_rgb_jpeg": Format(
        ".tif", np.uint8, 3, partial(tifffile.imwrite, compression="jpeg"), lossless=False
    ),
}


def _write(fmt: Format, path: Path, pixels: np.ndarray) -> Path:
    """Write ``pixels`` and check the file reads back with its dtype, shape and (lossless
    formats) every value: otherwise the test would not test the format it names."""
    fmt.write(path, pixels)
    back = read_array(path)
    assert back.dtype == pixels.dtype and back.shape == pixels.shape, (back.dtype, back.shape)
    if fmt.lossless:
        assert np.array_equal(back, pixels)
    return path


@dataclass
class Trained:
    """A format's training folder, the raw training pixels, the saved model and a test image."""

    train: list[np.ndarray]
    fitted: Detector
    model: Path
    image: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Trained]:
    """Train (once per module) a tiny model on files of a format; save it; write a new image."""
    cache: dict[str, Trained] = {}

    def get(name: str) -> Trained:
        if name not in cache:
            fmt = FORMATS[name]
            root = tmp_path_factory.mktemp(name)
            folder = root / "good"
            folder.mkdir()
            rng = np.random.default_rng(sorted(FORMATS).index(name))
            train = [fmt.pixels(rng, TRAIN_SHAPE) for _ in range(N_TRAIN)]
            for i, pixels in enumerate(train):
                _write(fmt, folder / f"{i:03d}{fmt.suffix}", pixels)
            fitted = Detector(Config(**TINY)).fit(folder)
            model = fitted.save(root / "model.safetensors")
            image = _write(fmt, root / f"new{fmt.suffix}", fmt.pixels(rng, PREDICT_SHAPE))
            cache[name] = Trained(train, fitted, model, image)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_trains_saves_loads_and_predicts(
    name: str, trained: Callable[[str], Trained]
) -> None:
    fmt = FORMATS[name]
    run = trained(name)
    det = Detector.load(run.model)
    assert det.config.to_dict() == run.fitted.config.to_dict()
    assert det.config.in_channels == fmt.channels
    assert det.config.normalization == fmt.normalization
    if fmt.normalization == "imagenet":
        assert det.config.mean == pytest.approx(IMAGENET_MEAN)
        assert det.config.std == pytest.approx(IMAGENET_STD)
    else:
        # dataset statistics of the pixels scaled by their type's range (1 for float)
        scale = 1.0 if fmt.dtype is np.float32 else float(np.iinfo(fmt.dtype).max)
        unit = np.stack(run.train).astype(np.float64) / scale
        expected_mean = unit.reshape(-1, fmt.channels).mean(0)
        assert det.config.mean == pytest.approx(tuple(expected_mean), abs=0.01)
        assert len(det.config.std) == fmt.channels
        assert all(0.01 < s < 0.5 for s in det.config.std)

    pred = det.predict(run.image)
    assert pred.anomaly_map.shape == PREDICT_SHAPE
    assert pred.anomaly_map.dtype == np.float32
    assert np.isfinite(pred.anomaly_map).all()
    assert np.isfinite(pred.score)
    assert pred.mask is not None and pred.mask.shape == PREDICT_SHAPE
    # the reloaded detector scores exactly as the one that was trained
    before = run.fitted.predict(run.image)
    np.testing.assert_allclose(pred.anomaly_map, before.anomaly_map, rtol=1e-5, atol=1e-6)
    assert pred.score == pytest.approx(before.score, rel=1e-5, abs=1e-6)


def test_cli_predict_writes_map_at_the_original_size(
    trained: Callable[[str], Trained], tmp_path: Path
) -> None:
    run = trained("png16_gray")
    out = tmp_path / "out"
    code = main(["predict", str(run.model), str(run.image), "--out", str(out), "--no-progress"])
    assert code == 0
    amap = tifffile.imread(out / f"{run.image.stem}_map.tiff")
    assert amap.shape == PREDICT_SHAPE and amap.dtype == np.float32
    expected = Detector.load(run.model).predict(run.image).anomaly_map
    np.testing.assert_allclose(amap, expected, rtol=1e-5, atol=1e-6)


def test_16bit_png_changes_below_one_8bit_step_change_the_map(
    trained: Callable[[str], Trained], tmp_path: Path
) -> None:
    """+100 in one region of a 16-bit gray PNG changes the map there, although no pixel's
    8-bit value (high byte or value / 257, rounded) changes: no silent 8-bit cast."""
    run = trained("png16_gray")
    det = Detector.load(run.model)
    image = read_array(run.image).copy()
    assert image.dtype == np.uint16 and image.min() > 255
    region = (slice(16, 24), slice(24, 32))
    # values 257 k - 50 stay in one 8-bit step however they are cast, also after +100
    steps = np.clip(np.rint(image[region] / 257.0), 50, 155).astype(np.uint16)
    image[region] = 257 * steps - 50
    shifted = image.copy()
    shifted[region] += 100
    for cast in (lambda a: a >> 8, lambda a: np.rint(a / 257.0)):
        assert np.array_equal(cast(image), cast(shifted))
    fmt = FORMATS["png16_gray"]
    base = _write(fmt, tmp_path / "base.png", image)
    changed = _write(fmt, tmp_path / "shifted.png", shifted)
    first, second = det.predict(base), det.predict(changed)
    change = np.abs(second.anomaly_map - first.anomaly_map)
    assert change.max() > 1e-6
    # the change is where the pixels changed, not spread over the map
    y, x = np.unravel_index(np.argmax(change), change.shape)
    assert 12 <= y < 28 and 20 <= x < 36, (y, x)
    assert change[:8].max() < 0.05 * change.max()


@pytest.mark.slow
def test_full_resolution_native_geometry_on_cpu(tmp_path: Path) -> None:
    """Two 1024 x 1000 16-bit images train at their own size (no resize); a third is scored
    into a map of the same size (about 18 s on two busy CPU cores; the bound is loose)."""
    shape = (1024, 1000)
    fmt = FORMATS["tiff16_gray"]
    rng = np.random.default_rng(7)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(2):
        fmt.write(folder / f"{i}.tif", fmt.pixels(rng, shape))
    image = tmp_path / "new.tif"
    fmt.write(image, fmt.pixels(rng, shape))
    config = Config(**{**TINY, "levels": 3, "geometry": "native"})
    start = time.perf_counter()
    det = Detector(config).fit(folder)
    pred = det.predict(image)
    seconds = time.perf_counter() - start
    assert det.config.image_size == shape  # 1024 and 1000 are multiples of 2^(3-1)
    assert det.config.in_channels == 1 and det.config.normalization == "dataset"
    assert pred.anomaly_map.shape == shape
    assert np.isfinite(pred.anomaly_map).all() and np.isfinite(pred.score)
    assert seconds < 90, f"1024 px native training and prediction took {seconds:.1f} s"
