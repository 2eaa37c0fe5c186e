"""Images in: reading every supported file type without loss, channel handling, masks,
resizing, normalization, input expansion and the MVTec-AD folder layout."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from pyramidflow.config import Config
from pyramidflow.errors import DataError
from pyramidflow.io.datasets import BTAD_LAYOUT, find_categories, open_category, training_images
from pyramidflow.io.images import (
    expand_inputs,
    expand_named_inputs,
    read_array,
    read_image,
    read_mask,
    resize_mask,
)
from pyramidflow.preprocess import load_stack
from pyramidflow.synthetic import DEFECT_TYPES, generate_category

RNG = np.random.default_rng(1234)
RGB8 = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)
GRAY8 = RNG.integers(0, 256, (12, 20), dtype=np.uint8)


def _smooth_rgb(h: int = 32, w: int = 48) -> np.ndarray:
    """A gradient picture that JPEG keeps almost exactly (noise would not survive it)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 128)], -1).astype(
        np.uint8
    )


# -- reading pixels --------------------------------------------------------------------------


def test_png_rgb_8bit_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(RGB8).save(path)
    raw = read_array(path)
    assert raw.dtype == np.uint8 and raw.shape == (12, 20, 3)
    np.testing.assert_array_equal(raw, RGB8)
    image = read_image(path)
    assert image.dtype == np.float32 and image.shape == (12, 20, 3)
    np.testing.assert_allclose(image, RGB8 / 255.0, atol=1e-7)


def test_png_gray_8bit_is_repeated_for_an_rgb_model(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.fromarray(GRAY8).save(path)
    assert read_array(path).shape == (12, 20)
    image = read_image(path, channels=3)
    assert image.shape == (12, 20, 3)
    for c in range(3):
        np.testing.assert_allclose(image[:, :, c], GRAY8 / 255.0, atol=1e-7)
    assert read_image(path, channels=1).shape == (12, 20, 1)


def test_png_gray_16bit_keeps_16bit_precision(tmp_path: Path) -> None:
    pixels = np.full((6, 9), 1000, dtype=np.uint16)
    pixels[0, :] = 1001  # one 16-bit step: an 8-bit quantisation would merge the two rows
    pixels[1, 0] = 65535
    path = tmp_path / "gray16.png"
    Image.fromarray(pixels).save(path)
    raw = read_array(path)
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, pixels)
    image = read_image(path, channels=1)[:, :, 0]
    assert image[2, 2] == pytest.approx(1000 / 65535, rel=1e-6)
    assert image[0, 0] == pytest.approx(1001 / 65535, rel=1e-6)
    assert image[1, 0] == pytest.approx(1.0)
    assert image[0, 0] > image[2, 2]


def _write_png16(path: Path, pixels: np.ndarray, png_filter: int | None = None) -> None:
    """A 16-bit PNG of uint16 (H, W[, C]) pixels, written by libpng (imagecodecs)."""
    path.write_bytes(imagecodecs.png_encode(pixels, filter=png_filter))


@pytest.mark.parametrize("channels", [3, 4, 2])
def test_png_16bit_colour_keeps_every_bit(tmp_path: Path, channels: int) -> None:
    pixels = RNG.integers(256, 65536, (6, 9, channels), dtype=np.uint16)
    path = tmp_path / "colour16.png"
    _write_png16(path, pixels)
    assert path.read_bytes()[24:26] == bytes([16, {2: 4, 3: 2, 4: 6}[channels]])  # depth, type
    raw = read_array(path)
    assert raw.dtype == np.uint16 and raw.shape == (6, 9, channels)
    np.testing.assert_array_equal(raw, pixels)
    nudged = pixels.copy()
    nudged[2, 3, channels - 1] ^= 1  # the low byte only: lost by any 8-bit reading
    _write_png16(path, nudged)
    changed = read_array(path) != raw
    assert changed.sum() == 1 and changed[2, 3, channels - 1]
    colour = read_image(path, channels=3 if channels >= 3 else 1)
    np.testing.assert_allclose(colour[2, 3, 0], nudged[2, 3, 0] / 65535.0, rtol=1e-6)


@pytest.mark.parametrize("png_filter", ["NONE", "SUB", "UP", "AVG", "PAETH", "ALL"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_16bit_row_filters(tmp_path: Path, channels: int, png_filter: str) -> None:
    """Every bit comes back, and the high bytes match Pillow's own (8-bit) decoding.

    Interlaced (Adam7) files are decoded by the same libpng call, but neither imagecodecs nor
    Pillow can write one, so no interlaced file is tested here."""
    pixels = RNG.integers(0, 65536, (13, 11, channels), dtype=np.uint16)
    path = tmp_path / "filtered16.png"
    _write_png16(path, pixels, imagecodecs.PNG.FILTER[png_filter])
    raw = read_array(path)
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw.reshape(pixels.shape), pixels)
    if channels > 1:
        with Image.open(path) as img:
            np.testing.assert_array_equal(np.asarray(img), pixels >> 8)


def test_damaged_16bit_colour_png_is_a_data_error(tmp_path: Path) -> None:
    content = imagecodecs.png_encode(RNG.integers(0, 65536, (16, 16, 3), dtype=np.uint16))
    idat_end = 41 + struct.unpack(">I", content[33:37])[0]  # signature, IHDR, IDAT head
    assert content[37:41] == b"IDAT" and idat_end + 4 < len(content)
    damaged = {
        "cut16.png": content[: len(content) // 2],
        "data16.png": content[:60] + bytes([content[60] ^ 0xFF]) + content[61:],
        "crc16.png": content[:idat_end] + bytes([content[idat_end] ^ 1]) + content[idat_end + 1 :],
    }
    for name, blob in damaged.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(DataError, match=name) as info:
            read_array(path)
        assert "cannot read image" in str(info.value) and "\n" not in str(info.value)


def test_oversized_16bit_colour_png_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pixel limit (``max_pixels``, default 2^28) is checked on the header: a forged
    40000 x 50000 header is refused without calling the decoder."""
    content = bytearray(imagecodecs.png_encode(np.zeros((4, 4, 3), np.uint16)))
    ihdr = struct.pack(">IIBBBBB", 50000, 40000, 16, 2, 0, 0, 0)
    content[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path = tmp_path / "bomb16.png"
    path.write_bytes(bytes(content))

    def no_decoding(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the decoder was called")

    monkeypatch.setattr(imagecodecs, "png_decode", no_decoding)
    with pytest.raises(DataError, match=r"bomb16\.png: image is 40000x50000 pixels .*max-pixels"):
        read_array(path)
    # the limit is the caller's: lowered, it refuses a small valid file too
    monkeypatch.undo()
    small = tmp_path / "small16.png"
    _write_png16(small, RNG.integers(0, 65536, (8, 10, 3), dtype=np.uint16))
    assert read_array(small).shape == (8, 10, 3)
    with pytest.raises(DataError, match="small16.png: image is 8x10 pixels"):
        read_array(small, max_pixels=79)
    assert read_array(small, max_pixels=80).shape == (8, 10, 3)


def test_jpeg_reads_close_to_the_original(tmp_path: Path) -> None:
    pixels = _smooth_rgb()
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    image = read_image(path)
    assert image.shape == (32, 48, 3) and image.dtype == np.float32
    assert np.abs(image - pixels / 255.0).mean() < 3 / 255


def test_jpeg_cmyk_is_converted_to_rgb_not_treated_as_alpha(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # magenta + yellow ink = red
    image = read_image(path)
    assert image.shape == (8, 8, 3)
    assert image[..., 0].mean() > 0.9 and image[..., 1:].mean() < 0.1


def test_bmp_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "picture.bmp"
    Image.fromarray(RGB8).save(path)
    np.testing.assert_array_equal(read_array(path), RGB8)


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".TIF"])
def test_tiff_uint16_is_exact(tmp_path: Path, suffix: str) -> None:
    pixels = RNG.integers(0, 65536, (10, 14), dtype=np.uint16)
    path = tmp_path / f"scan{suffix}"
    tifffile.imwrite(path, pixels)
    raw = read_array(path)
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, pixels)
    np.testing.assert_allclose(read_image(path, 1)[:, :, 0], pixels / 65535.0, rtol=1e-6)


def test_tiff_float32_values_are_kept_as_they_are(tmp_path: Path) -> None:
    pixels = np.linspace(-0.25, 1.5, 10 * 14, dtype=np.float32).reshape(10, 14)
    path = tmp_path / "depth.tif"
    tifffile.imwrite(path, pixels)
    image = read_image(path, channels=1)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image[:, :, 0], pixels)


def test_planar_tiff_becomes_channels_last(tmp_path: Path) -> None:
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(RGB8, -1, 0), photometric="rgb", planarconfig="separate")
    raw = read_array(path)
    assert raw.shape == (12, 20, 3)
    np.testing.assert_array_equal(raw, RGB8)


# -- compressed, tiled and multi-page TIFF (as inspection cameras write them) ---------------

TIFF_PIXELS = {
    "rgb8": RNG.integers(0, 256, (37, 50, 3), dtype=np.uint8),
    "gray8": RNG.integers(0, 256, (37, 50), dtype=np.uint8),
    "rgb16": RNG.integers(0, 65536, (37, 50, 3), dtype=np.uint16),
    "gray16": RNG.integers(0, 65536, (37, 50), dtype=np.uint16),
}


def _tiff_compression(path: Path) -> str:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].compression.name


@pytest.mark.parametrize("kind", sorted(TIFF_PIXELS))
@pytest.mark.parametrize(
    ("compression", "stored"),
    [("lzw", "LZW"), ("zlib", "ADOBE_DEFLATE"), ("deflate", "DEFLATE"), ("packbits", "PACKBITS")],
)
def test_lossless_compressed_tiff_is_exact(
    tmp_path: Path, compression: str, stored: str, kind: str
) -> None:
    pixels = TIFF_PIXELS[kind]
    for predictor in (False, True):  # cameras often add the horizontal differencing predictor
        if predictor and compression == "packbits":
            continue
        path = tmp_path / f"{compression}_{kind}_{predictor}.tif"
        tifffile.imwrite(path, pixels, compression=compression, predictor=predictor or None)
        assert _tiff_compression(path) == stored
        raw = read_array(path)
        assert raw.dtype == pixels.dtype and raw.shape == pixels.shape
        np.testing.assert_array_equal(raw, pixels)


def test_lzw_float32_tiff_with_float_predictor_is_exact(tmp_path: Path) -> None:
    pixels = np.linspace(-0.5, 2.0, 37 * 50, dtype=np.float32).reshape(37, 50)
    path = tmp_path / "depth_lzw.tif"
    tifffile.imwrite(path, pixels, compression="lzw", predictor=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].predictor.name == "FLOATINGPOINT"
    raw = read_array(path)
    assert raw.dtype == np.float32
    np.testing.assert_array_equal(raw, pixels)


@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_tiff_reads_close_to_the_original(tmp_path: Path, channels: int) -> None:
    pixels = _smooth_rgb(64, 80)
    pixels = pixels if channels == 3 else pixels[:, :, 0]
    path = tmp_path / "camera_jpeg.tif"
    tifffile.imwrite(path, pixels, compression="jpeg")
    assert _tiff_compression(path) == "JPEG"
    raw = read_array(path)
    assert raw.dtype == np.uint8 and raw.shape == pixels.shape
    assert np.abs(raw.astype(np.float64) - pixels).mean() / 255 < 2 / 255


@pytest.mark.parametrize("kind", ["rgb8", "gray16", "rgb16"])
@pytest.mark.parametrize("compression", [None, "lzw", "zlib"])
def test_tiled_tiff_is_exact(tmp_path: Path, kind: str, compression: str | None) -> None:
    pixels = TIFF_PIXELS[kind]  # 37 x 50: tiles overhang the right and bottom edges
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, pixels, tile=(16, 32), compression=compression)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (16, 32)
    raw = read_array(path)
    assert raw.dtype == pixels.dtype and raw.shape == pixels.shape
    np.testing.assert_array_equal(raw, pixels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("pages", [3, 4])
@pytest.mark.parametrize("series", ["one_stack", "page_by_page"])
def test_multi_page_tiff_reads_the_first_page(
    tmp_path: Path, series: str, pages: int, dtype: type
) -> None:
    """A stack of equal pages is not a (pages, H, W) array, nor 3 or 4 channels: page 0."""
    stack = RNG.integers(0, np.iinfo(dtype).max, (pages, 20, 30), dtype=dtype, endpoint=True)
    path = tmp_path / "burst.tif"
    if series == "one_stack":
        tifffile.imwrite(path, stack, photometric="minisblack", compression="lzw")
    else:
        with tifffile.TiffWriter(path) as tif:
            for page in stack:
                tif.write(page, photometric="minisblack", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == pages
    raw = read_array(path)
    assert raw.dtype == dtype and raw.shape == (20, 30)
    np.testing.assert_array_equal(raw, stack[0])
    assert not np.array_equal(raw, stack[1])


def test_multi_page_rgb_tiff_reads_the_first_page_channels_last(tmp_path: Path) -> None:
    stack = RNG.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    planar = tmp_path / "planar_pages.tif"
    tifffile.imwrite(planar, np.moveaxis(stack, -1, 1), photometric="rgb", planarconfig="separate")
    contig = tmp_path / "rgb_pages.tif"
    tifffile.imwrite(contig, stack, photometric="rgb", compression="packbits")
    for path in (planar, contig):
        np.testing.assert_array_equal(read_array(path), stack[0])


def test_rgba_alpha_is_dropped(tmp_path: Path) -> None:
    rgba = np.dstack([RGB8, np.full(RGB8.shape[:2], 17, np.uint8)])
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    image = read_image(path, channels=3)
    assert image.shape == (12, 20, 3)
    np.testing.assert_allclose(image, RGB8 / 255.0, atol=1e-7)


def test_gray_with_alpha_fits_a_gray_model(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.fromarray(np.dstack([GRAY8, np.full_like(GRAY8, 255)]), mode="LA").save(path)
    image = read_image(path, channels=1)
    np.testing.assert_allclose(image[:, :, 0], GRAY8 / 255.0, atol=1e-7)


def test_palette_png_reads_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    Image.fromarray(_smooth_rgb(8, 8)).convert("P").save(path)
    assert read_image(path).shape == (8, 8, 3)


def test_channel_mismatch_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "colour.png"
    Image.fromarray(RGB8).save(path)
    with pytest.raises(DataError, match="colour.png") as info:
        read_image(path, channels=1)
    assert "3 channel" in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_tiff_is_rejected_naming_the_file(tmp_path: Path, bad: float) -> None:
    pixels = np.zeros((5, 5), np.float32)
    pixels[2, 3] = bad
    path = tmp_path / "broken_values.tif"
    tifffile.imwrite(path, pixels)
    with pytest.raises(DataError, match="broken_values.tif"):
        read_image(path, channels=1)


def _first_half(tmp_path: Path, suffix: str) -> bytes:
    path = tmp_path / f"source{suffix}"
    if suffix in (".tif", ".tiff"):
        tifffile.imwrite(
            path, RNG.integers(0, 65536, (64, 64), dtype=np.uint16), compression="zlib"
        )
    else:
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    content = path.read_bytes()
    return content[: len(content) // 2]


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("garbage.png", lambda tmp: b"this is not an image"),
        ("empty.png", lambda tmp: b""),
        ("garbage.tif", lambda tmp: b"this is not a tiff"),
        ("cut.png", lambda tmp: _first_half(tmp, ".png")),
        ("cut.jpg", lambda tmp: _first_half(tmp, ".jpg")),
        ("cut.bmp", lambda tmp: _first_half(tmp, ".bmp")),
        ("cut.tif", lambda tmp: _first_half(tmp, ".tif")),
    ],
)
def test_unreadable_file_is_a_data_error_naming_it(tmp_path: Path, name: str, make) -> None:
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    with pytest.raises(DataError, match=name.replace(".", r"\.")) as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_folder_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing.png"):
        read_array(tmp_path / "nothing.png")
    with pytest.raises(DataError, match=str(tmp_path.name)):
        read_array(tmp_path)


# -- masks -----------------------------------------------------------------------------------


def test_mask_any_nonzero_pixel_is_defective(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 5] = 255
    mask[6, 6] = 1
    path = tmp_path / "000_mask.png"
    Image.fromarray(mask).save(path)
    read = read_mask(path)
    assert read.dtype == np.bool_
    np.testing.assert_array_equal(read, mask > 0)


def test_rgba_mask_with_opaque_background_marks_only_the_defect(tmp_path: Path) -> None:
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[..., 3] = 255  # opaque everywhere: alpha is not a defect
    mask[2:4, 2:5, :3] = 255
    path = tmp_path / "rgba_mask.png"
    Image.fromarray(mask).save(path)
    read = read_mask(path)
    assert read.sum() == 6 and read[2:4, 2:5].all()


def test_resize_mask_shrinking_keeps_defects_covering_half_a_cell() -> None:
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True  # a whole 2x2 cell -> cell (0, 0)
    mask[4, 4:6] = True  # exactly half of cell (2, 2)
    mask[7, 0] = True  # a quarter of cell (3, 0): under half, gone
    small = resize_mask(mask, (4, 4))
    assert small.dtype == np.bool_ and small.shape == (4, 4)
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[2, 2] = True
    np.testing.assert_array_equal(small, expected)
    # the whole cell's area counts, not a sample at its centre: 5 of 9 pixels, centre clear
    ring = np.zeros((9, 9), bool)
    ring[0, 0:3] = ring[1, 0] = ring[2, 0] = True
    assert ring[0:3, 0:3].sum() == 5 and not ring[1, 1]
    assert resize_mask(ring, (3, 3)).tolist() == [[True, False, False]] + [[False] * 3] * 2


def test_resize_mask_enlarging_is_nearest() -> None:
    mask = np.array([[True, False], [False, True]])
    big = resize_mask(mask, (4, 6))
    assert big.dtype == np.bool_ and big.shape == (4, 6)
    np.testing.assert_array_equal(big, np.kron(mask, np.ones((2, 3), bool)))
    odd = resize_mask(mask, (5, 7))
    assert odd.sum() > 0 and (~odd).sum() > 0 and odd[0, 0] and odd[-1, -1] and not odd[0, -1]
    assert resize_mask(mask, (2, 2)) is mask


# -- stacks ----------------------------------------------------------------------------------


def test_load_stack_mixes_paths_and_arrays(tmp_path: Path) -> None:
    config = Config(image_size=32, levels=3, stacks=1, channels=8)
    path = tmp_path / "a.png"
    Image.fromarray(RGB8).save(path)
    stack = load_stack([path, GRAY8], config)
    assert tuple(stack.shape) == (2, 3, 32, 32)
    with pytest.raises(DataError):
        load_stack([], config)


# -- inputs and folders ----------------------------------------------------------------------


@pytest.fixture
def loose_images(tmp_path: Path) -> Path:
    folder = tmp_path / "loose"
    (folder / "nested").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "c.tif"):
        target = folder / name
        if name.endswith(".tif"):
            tifffile.imwrite(target, GRAY8)
        else:
            Image.fromarray(RGB8).save(target)
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(RGB8).save(folder / "nested" / "d.png")
    return folder


def test_expand_inputs_folder_lists_its_images_and_subfolders_sorted(loose_images: Path) -> None:
    (loose_images / ".cache").mkdir()
    Image.fromarray(RGB8).save(loose_images / ".cache" / "hidden.png")
    found = expand_inputs([loose_images])
    assert [p.relative_to(loose_images).as_posix() for p in found] == [
        "a.jpg",
        "b.png",
        "c.tif",
        "nested/d.png",
    ]
    assert expand_inputs([loose_images], exclude=[loose_images / "nested"])[-1].name == "c.tif"
    named = expand_named_inputs([loose_images / "a.jpg", str(loose_images / "*" / "*.png")])
    assert [key for _, key in named] == ["a.jpg", "nested/d.png"]


def test_expand_inputs_files_globs_order_and_duplicates(loose_images: Path) -> None:
    single = loose_images / "c.tif"
    found = expand_inputs([single, str(loose_images / "*.png"), loose_images])
    assert [p.name for p in found] == ["c.tif", "b.png", "a.jpg", "d.png"]
    recursive = expand_inputs([str(loose_images / "**" / "*.png")])
    assert {p.name for p in recursive} == {"b.png", "d.png"}


@pytest.mark.parametrize("missing", ["no_such_file.png", "no_such_folder", "nothing_*.png"])
def test_expand_inputs_missing_paths_name_the_path(loose_images: Path, missing: str) -> None:
    target = str(loose_images / missing)
    with pytest.raises(DataError) as info:
        expand_inputs([loose_images / "b.png", target])
    assert missing in str(info.value)


def test_expand_inputs_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=tmp_path.name):
        expand_inputs([tmp_path])


@pytest.fixture(scope="module")
def category_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    return generate_category(
        root, "tile", size=32, n_train=4, n_test_good=2, n_test_defect_per_type=1
    )


@pytest.fixture
def category(category_source: Path, tmp_path: Path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(category_source, tmp_path / "tile"))


def test_open_category_reads_the_mvtec_layout(category_source: Path) -> None:
    folder = open_category(category_source)
    assert folder.name == "tile"
    assert [p.name for p in folder.train] == ["000.png", "001.png", "002.png", "003.png"]
    types = DEFECT_TYPES["tile"]
    assert len(folder.test) == 2 + len(types)
    good = [s for s in folder.test if not s.is_defective]
    bad = [s for s in folder.test if s.is_defective]
    assert len(good) == 2 and all(s.mask_path is None for s in good)
    assert {s.defect_type for s in bad} == set(types)
    for sample in bad:
        assert sample.mask_path is not None
        assert sample.mask_path.parent == category_source / "ground_truth" / sample.defect_type
        assert read_mask(sample.mask_path).any()


def test_open_category_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent_category"):
        open_category(tmp_path / "absent_category")


def test_open_category_missing_train_good_is_named(category: Path) -> None:
    shutil.rmtree(category / "train" / "good")
    with pytest.raises(DataError) as info:
        open_category(category)
    assert str(Path("train") / "good") in str(info.value)


def test_open_category_missing_test_is_named_unless_not_needed(category: Path) -> None:
    shutil.rmtree(category / "test")
    with pytest.raises(DataError) as info:
        open_category(category)
    assert str(category / "test") in str(info.value)
    assert len(open_category(category, need_test=False).train) == 4


def test_open_category_missing_mask_names_the_ground_truth_folder(category: Path) -> None:
    defect = DEFECT_TYPES["tile"][0]
    for mask in (category / "ground_truth" / defect).iterdir():
        mask.unlink()
    with pytest.raises(DataError) as info:
        open_category(category)
    message = str(info.value)
    assert str(category / "ground_truth" / defect) in message and "000" in message


def test_training_images_mvtec_layout_uses_train_good_only(category_source: Path) -> None:
    images = training_images(category_source)
    assert len(images) == 4
    assert all(p.parent == category_source / "train" / "good" for p in images)


def test_training_images_plain_folder(loose_images: Path, tmp_path: Path) -> None:
    assert [p.name for p in training_images(loose_images)] == ["a.jpg", "b.png", "c.tif"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        training_images(empty)
    with pytest.raises(DataError, match="not_there"):
        training_images(tmp_path / "not_there")


# -- BTAD layout and dataset roots -----------------------------------------------------------


def _btad_category(root: Path, name: str = "01") -> Path:
    """A small BTAD-layout category: .bmp images, same-stem .png masks in ground_truth/ko."""
    category = root / name
    rng = np.random.default_rng(int(name))
    for folder, count in (("train/ok", 3), ("test/ok", 2), ("test/ko", 2)):
        (category / folder).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(image).save(category / folder / f"{i:04d}.bmp")
    (category / "ground_truth" / "ko").mkdir(parents=True)
    for i in range(2):
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4 + i : 9 + i] = 255
        Image.fromarray(mask).save(category / "ground_truth" / "ko" / f"{i:04d}.png")
    return category


def test_open_category_reads_the_btad_layout(tmp_path: Path) -> None:
    folder = open_category(_btad_category(tmp_path))
    assert folder.layout == BTAD_LAYOUT
    assert [p.name for p in folder.train] == ["0000.bmp", "0001.bmp", "0002.bmp"]
    good = [s for s in folder.test if not s.is_defective]
    bad = [s for s in folder.test if s.is_defective]
    assert len(good) == 2 and all(s.mask_path is None for s in good)
    assert len(bad) == 2 and {s.defect_type for s in bad} == {"ko"}
    for sample in bad:
        assert (
            sample.mask_path == tmp_path / "01" / "ground_truth" / "ko" / f"{sample.path.stem}.png"
        )
        assert read_mask(sample.mask_path).sum() == 20
    assert training_images(tmp_path / "01") == folder.train


def test_btad_missing_mask_and_missing_train_name_the_folder(tmp_path: Path) -> None:
    category = _btad_category(tmp_path)
    (category / "ground_truth" / "ko" / "0001.png").unlink()
    with pytest.raises(DataError) as info:
        open_category(category)
    assert str(category / "ground_truth" / "ko") in str(info.value)
    assert "0001.png" in str(info.value)
    shutil.rmtree(category / "train" / "ok")
    with pytest.raises(DataError) as info:
        open_category(category)
    message = str(info.value)
    assert str(category / "train" / "good") in message and "train/ok" in message


def test_find_categories_of_roots_and_of_a_category(category_source: Path, tmp_path: Path) -> None:
    btad = tmp_path / "btad"
    for name in ("03", "01", "02"):
        _btad_category(btad, name)
    (btad / "readme.txt").write_text("not a category")
    (btad / "scratch").mkdir()  # a folder without train/ok is not a category
    assert [p.name for p in find_categories(btad)] == ["01", "02", "03"]
    assert find_categories(btad / "02") == [btad / "02"]
    mvtec = category_source.parent
    assert find_categories(mvtec) == [category_source]


def test_find_categories_errors_name_the_root(tmp_path: Path) -> None:
    empty = tmp_path / "empty_root"
    (empty / "bottle" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="empty_root: no dataset categories found"):
        find_categories(empty)
    with pytest.raises(DataError, match="missing_root: no such dataset folder"):
        find_categories(tmp_path / "missing_root")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tiff"])
def test_read_array_gives_a_writable_array_for_every_format(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    pixels = np.full((6, 5, 3), 100, np.uint8)
    if suffix == ".tiff":
        tifffile.imwrite(path, pixels)
    else:
        Image.fromarray(pixels).save(path)
    array = read_array(path)
    array[0, 0] = 0  # callers may edit what they read
    assert array.flags.writeable
