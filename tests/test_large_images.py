"""Large and hostile images: the pixel limit read from file headers, conversion in row
strips (the same values as one whole-image resize), maps written in strips, capped
overlays, and the scores table's guard against spreadsheet formulas."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG
from PIL import Image
from pyramidflow_kernels.testing import relative_error

from pyramidflow import Config, Detector, preprocess
from pyramidflow.cli import main
from pyramidflow.errors import DataError
from pyramidflow.io import images
from pyramidflow.io.images import read_array, read_mask
from pyramidflow.predict.journal import write_tables

RNG = np.random.default_rng(20)
SHAPE = (10, 12)  # 120 pixels


def _pillow(**options: object) -> Callable[[Path, np.ndarray], None]:
    return lambda path, pixels: Image.fromarray(pixels).save(path, **options)


def _multi_page(path: Path, pixels: np.ndarray) -> None:
    with tifffile.TiffWriter(path) as tif:
        tif.write(pixels)
        tif.write(pixels[:4, :4])


WRITERS = {
    "gray.png": (np.uint8, 1, _pillow()),
    "gray16.png": (np.uint16, 1, _pillow()),
    "rgb16.png": (np.uint16, 3, lambda p, a: p.write_bytes(imagecodecs.png_encode(a))),
    "rgb.jpg": (np.uint8, 3, _pillow(quality=95)),
    "rgb.bmp": (np.uint8, 3, _pillow()),
    "rgb.tif": (np.uint8, 3, tifffile.imwrite),
    "float.tif": (np.float32, 1, tifffile.imwrite),
    "tiled16.tif": (np.uint16, 3, lambda p, a: tifffile.imwrite(p, a, tile=(16, 16))),
    "zlib.tif": (np.uint16, 1, lambda p, a: tifffile.imwrite(p, a, compression="zlib")),
    "pages.tif": (np.uint8, 1, _multi_page),
}


def _image(folder: Path, name: str, shape: tuple[int, int] = SHAPE) -> Path:
    dtype, channels, write = WRITERS[name]
    full = shape if channels == 1 else (*shape, channels)
    if dtype is np.float32:
        pixels = RNG.random(full, dtype=np.float32)
    else:
        pixels = RNG.integers(0, np.iinfo(dtype).max, full, dtype=dtype)
    path = folder / name
    write(path, pixels)
    return path


def forged_tiff(path: Path, height: int, width: int) -> Path:
    """A zlib TIFF whose header claims ``height`` x ``width`` pixels: a few hundred bytes on
    the disk, gigabytes once decoded."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8), compression="zlib")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(width)
        tags["ImageLength"].overwrite(height)
        tags["RowsPerStrip"].overwrite(height)
    return path


# -- the pixel limit --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_reader_refuses_above_the_limit_before_decoding(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _image(tmp_path, name)
    assert read_array(path, max_pixels=120).shape[:2] == SHAPE

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_decoding)
    monkeypatch.setattr(imagecodecs, "png_decode", no_decoding)
    with pytest.raises(DataError) as info:
        read_array(path, max_pixels=119)
    message = str(info.value)
    assert message.startswith(f"{path}: image is 10x12 pixels") and "\n" not in message
    assert "--max-pixels" in message
    with pytest.raises(DataError, match="image is 10x12 pixels"):
        read_mask(path, max_pixels=119)


def test_pillow_limit_is_replaced_by_ours_and_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's own limit (a process-wide setting, lower than ours) does not refuse an image
    within ours, and is as it was afterwards."""
    path = _image(tmp_path, "gray.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow alone refuses > 100 pixels
    with pytest.raises(Image.DecompressionBombError), Image.open(path):
        pass
    assert read_array(path).shape == SHAPE
    assert Image.MAX_IMAGE_PIXELS == 50


def test_forged_40000_px_tiff_is_refused_by_predict_in_one_line(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = forged_tiff(tmp_path / "bomb.tif", 40000, 40000)
    assert bomb.stat().st_size < 1000
    good = tmp_path / "good.png"
    Image.fromarray(RNG.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(good)
    start = time.perf_counter()
    code = main(["predict", str(tiny_model), str(bomb), str(good), "--out", str(tmp_path / "o")])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 1  # the bomb is skipped, the good image scored
    lines = [line for line in err.splitlines() if "bomb.tif" in line]
    assert len(lines) == 1 and "40000x40000 pixels" in lines[0] and "--max-pixels" in lines[0]
    assert (tmp_path / "o" / "good_map.tiff").is_file()
    assert seconds < 30  # refused from the header: no decoding (bench: well under 5 s)


def test_max_pixels_option_and_config(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "img.png"
    Image.fromarray(RNG.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    assert main(["check", str(tiny_model), str(image), "--max-pixels", "1999"]) == 1
    assert "img.png: image is 40x50 pixels" in capsys.readouterr().err
    assert main(["check", str(tiny_model), str(image), "--max-pixels", "2000"]) == 0
    with pytest.raises(SystemExit):
        main(["predict", str(tiny_model), str(image), "--out", "x", "--max-pixels", "0"])
    with pytest.raises(ValueError, match="max_pixels"):
        Config(max_pixels=0)
    det = Detector.load(tiny_model, max_pixels=1999)
    with pytest.raises(DataError, match="40x50 pixels"):
        det.predict(image)
    assert Detector.load(tiny_model).predict(image).anomaly_map.shape == (40, 50)


# -- conversion in strips ---------------------------------------------------------------------


def _one_call(array: np.ndarray, config: Config) -> torch.Tensor:
    """The whole-image computation the strips replace: unit floats of the whole image,
    one resize, then the normalization."""
    unit = images.to_channels(array, config.in_channels)
    pixels = torch.from_numpy(unit).permute(2, 0, 1)[None]
    shrink = config.image_size[0] < array.shape[0] or config.image_size[1] < array.shape[1]
    resized = F.interpolate(
        pixels, size=config.image_size, mode="bilinear", align_corners=False, antialias=shrink
    )
    mean, std = (torch.tensor(v)[:, None, None] for v in (config.mean, config.std))
    return ((resized - mean) / std)[0]


@pytest.mark.parametrize(
    "dtype, shape, channels",
    [(np.uint8, (301, 257, 3), 3), (np.uint16, (280, 199), 3), (np.float32, (97, 400), 1)],
)
def test_strips_give_the_whole_image_result_bit_for_bit(
    dtype: type, shape: tuple[int, ...], channels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preprocess, "_STRIP_BYTES", 4000)  # many strips of a few rows
    if dtype is np.float32:
        array = RNG.random(shape, dtype=np.float32)
    else:
        array = RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    config = Config(
        image_size=(48, 64), levels=3, stacks=1, channels=8, in_channels=channels,
        mean=(0.4,) * channels, std=(0.2,) * channels,
    )  # fmt: skip
    assert torch.equal(preprocess.prepare(array, config), _one_call(array, config))


def test_native_geometry_strips_pad_like_replicate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess, "_STRIP_BYTES", 4000)
    array = RNG.integers(0, 255, (45, 61), dtype=np.uint8)
    config = Config(image_size=(48, 64), levels=3, stacks=1, channels=8, geometry="native")
    unit = torch.from_numpy(images.to_channels(array, 3)).permute(2, 0, 1)[None]
    padded = F.pad(unit, (0, 3, 0, 3), mode="replicate")
    mean, std = (torch.tensor(v)[:, None, None] for v in (config.mean, config.std))
    assert torch.equal(preprocess.prepare(array, config), ((padded - mean) / std)[0])


@pytest.mark.parametrize("original", [(333, 517), (20, 50), (32, 32), (1000, 7)])
def test_map_strips_are_the_bilinear_map_within_float32_rounding(
    original: tuple[int, int],
) -> None:
    """The map built strip by strip from the model-size map against the float64 resize of
    the same map: float32 rounding only (the float32 one-call resize errs more)."""
    config = Config(**{**TINY_CONFIG.to_dict(), "image_size": [32, 32]})
    small = torch.rand(32, 32) + 0.5
    reference = F.interpolate(
        small.double()[None, None], size=original, mode="bilinear", align_corners=False
    )[0, 0]
    strips = list(preprocess.map_strips(small, original, config, rows=7))
    assert all(s.dtype == np.float32 and s.shape[0] <= 7 for s in strips)
    joined = torch.from_numpy(np.concatenate(strips))
    assert relative_error(joined, reference) < 1e-7
    assert np.array_equal(preprocess.restore_map(small, original, config), joined.numpy())


@pytest.mark.parametrize("size", [(16, 16), (7, 30), (40, 3)])
def test_mask_resize_in_strips_matches_torch_area(size: tuple[int, int]) -> None:
    for _ in range(20):
        mask = RNG.random((37, 29)) < RNG.random()
        floats = torch.from_numpy(mask.astype(np.float32))[None, None]
        expected = (F.interpolate(floats, size=size, mode="area")[0, 0] >= 0.5).numpy()
        assert np.array_equal(images.resize_mask(mask, size), expected)


# -- predict outputs --------------------------------------------------------------------------


def test_large_image_map_is_full_size_and_overlay_is_capped(
    tiny_model: Path, tmp_path: Path
) -> None:
    image = tmp_path / "wide.png"
    Image.fromarray(RNG.integers(0, 255, (150, 300), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    argv = ["predict", str(tiny_model), str(image), "--out", str(out), "--no-progress"]
    assert main([*argv, "--overlay-size", "64"]) == 0
    expected = Detector.load(tiny_model).predict(image)
    amap = tifffile.imread(out / "wide_map.tiff")
    assert amap.dtype == np.float32 and amap.shape == (150, 300)
    assert np.array_equal(amap, expected.anomaly_map)
    for kind in ("overlay", "mask"):
        with Image.open(out / f"wide_{kind}.png") as picture:
            assert picture.size == (64, 32)
    assert main([*argv, "--overwrite", "--overlay-size", "full"]) == 0
    for kind in ("overlay", "mask"):
        with Image.open(out / f"wide_{kind}.png") as picture:
            assert picture.size == (300, 150)
            if kind == "mask":
                assert np.array_equal(np.asarray(picture) == 255, expected.mask)


# -- scores.csv -------------------------------------------------------------------------------


def test_scores_csv_cells_are_not_spreadsheet_formulas(tmp_path: Path) -> None:
    names = ["=HYPERLINK(1).png", "+1.png", "-2.png", "@SUM(A1).png", "\tx.png", "plain.png"]
    rows = [
        {"file": name, "score": -0.5, "decision": "good", "map": "", "overlay": "", "mask": ""}
        for name in names
    ]
    write_tables(tmp_path, rows)
    with open(tmp_path / "scores.csv", newline="", encoding="utf-8") as handle:
        cells = list(csv.DictReader(handle))
    for name, cell in zip(names, cells, strict=True):
        assert cell["file"] == (name if name == "plain.png" else "'" + name)
        assert cell["score"] == "-0.5"  # numbers stay numbers
    records = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert [r["file"] for r in records] == names  # JSON keeps the names as they are
