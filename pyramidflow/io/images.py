"""Images in: file reading, pixel types, channels and masks (dataset layouts: datasets.py).

Pixel values are read without loss (8-bit, 16-bit PNG and TIFF, float TIFF) and scaled to
[0, 1] by the range of their type; :mod:`pyramidflow.preprocess` turns them into model
inputs (geometry and the model's normalization ``(x - mean) / std``).
"""

from __future__ import annotations

import glob
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import DEFAULT_MAX_PIXELS
from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_ALWAYS_ALLOWED_TILE = 1024 * 1024  # tiles this size are fine whatever the (small) limit
_MAX_SAMPLES = 4  # RGBA: the most samples per pixel the limit is meant for
_TIFF_SUFFIXES = (".tif", ".tiff")
_CONVERT_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")  # 4-channel CMYK is not RGB + alpha


def _scale_to_unit(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer images by the range of their type, floats as they are; float32 result."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    if np.issubdtype(array.dtype, np.floating):
        out = array.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"{path}: image contains NaN or Inf pixels")
        return out
    raise DataError(f"{path}: unsupported pixel type {array.dtype}")


# -- 16-bit colour PNG -----------------------------------------------------------------------
# Pillow reads PNGs with 16 bits per channel and colour (RGB, RGBA, gray + alpha) as 8-bit,
# silently dropping the low byte. Those files are decoded with imagecodecs (libpng) instead.

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG16_CHANNELS = {2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def _png16_header(path: Path) -> tuple[int, int, int] | None:
    """(height, width, channels) of a 16-bit colour PNG; None for other files."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if depth != 16 or colour not in _PNG16_CHANNELS:
        return None
    return height, width, _PNG16_CHANNELS[colour]


def _read_png16(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """A 16-bit colour PNG as uint16 (H, W, channels), every bit kept (interlaced too)."""
    import imagecodecs

    array = imagecodecs.png_decode(path.read_bytes())
    if array.dtype != np.uint16 or array.ndim != 3 or array.shape[:2] != (height, width):
        raise ValueError(
            f"decoded {array.dtype} {array.shape}, expected {height}x{width}x{channels}"
        )
    return array


class ImageTooLargeError(DataError):
    """An image whose header declares more pixels than the reader's limit allows."""


def check_pixel_limit(
    path: str | os.PathLike[str], height: int, width: int, max_pixels: int
) -> None:
    """Raise :class:`ImageTooLargeError` (one line naming the file, its size and the option)
    when ``height * width`` is above ``max_pixels``."""
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"{path}: image is {height}x{width} pixels ({height * width / 1e6:.0f} Mpx), above "
            f"the limit of {max_pixels} pixels; raise it with --max-pixels (Config.max_pixels) "
            "if the file is trusted"
        )


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pillow_open(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` without Pillow's own pixel limit: ours (checked by the caller on the
    header, before any decoding) replaces it. Pillow's is lower than the default
    :data:`DEFAULT_MAX_PIXELS` (it refuses 16384 x 16384) and a process-wide setting; it is
    lifted only while Pillow parses the header."""
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with img:
        yield img


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    """The first page of a TIFF, its declared size checked before its data are decoded."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ValueError("no image pages")
        page = tif.pages[0]
        height, width = int(page.imagelength), int(page.imagewidth)
        depth, samples = int(page.imagedepth), int(page.samplesperpixel)
        check_pixel_limit(path, height * max(depth, 1), width, max_pixels)
        if page.is_tiled:  # the decoder allocates whole tiles, whatever the image size
            tile = int(page.tilelength) * int(page.tilewidth) * max(int(page.tiledepth), 1)
            if tile > max(max_pixels, _ALWAYS_ALLOWED_TILE):
                raise ImageTooLargeError(
                    f"{path}: TIFF tiles of {page.tilelength}x{page.tilewidth} pixels, above "
                    f"the limit of {max_pixels} pixels (--max-pixels, Config.max_pixels)"
                )
        if height * width * max(depth, 1) * samples > max_pixels * _MAX_SAMPLES:
            raise ImageTooLargeError(
                f"{path}: image is {height}x{width} pixels of {samples} samples, more values "
                f"than {max_pixels} RGBA pixels (--max-pixels, Config.max_pixels)"
            )
        return np.asarray(tif.asarray(key=0))  # multi-page: the first page


def _read_pillow(path: Path, max_pixels: int) -> np.ndarray:
    with _pillow_open(path) as img:
        check_pixel_limit(path, img.height, img.width, max_pixels)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode == "I;16B":
            img = img.convert("I;16")
        elif img.mode in _CONVERT_TO_RGB:
            img = img.convert("RGB")
        array = np.array(img)  # a writable array, as tifffile gives
        if img.mode == "I" and img.format == "PNG":
            array = array.astype(np.uint16)  # older Pillow: 16-bit gray PNG as "I"
    return array


def read_array(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The raw pixel array of an image file: (H, W) or (H, W, C), its own dtype.

    TIFFs may be compressed (LZW, deflate, JPEG, PackBits, ...) or tiled; of a multi-page TIFF
    only the first page is read. A file whose header declares more than ``max_pixels``
    pixels is refused (:class:`ImageTooLargeError`) before any pixel is decoded."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            array = _read_tiff(path, max_pixels)
        elif (png16 := _png16_header(path)) is not None:
            check_pixel_limit(path, png16[0], png16[1], max_pixels)
            array = _read_png16(path, *png16)
        else:
            array = _read_pillow(path, max_pixels)
    except DataError:
        raise
    except MemoryError:
        raise DataError(
            f"{path}: not enough memory to decode this image; lower --max-pixels to refuse "
            "such files before decoding"
        ) from None
    except Exception as exc:
        # Decoders raise more than OSError on damaged files (zlib.error, KeyError for a
        # missing codec, struct.error, ...): all of them mean "cannot read".
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot read image ({message})") from None
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar TIFF
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise DataError(f"{path}: expected a 2-D image, got an array of shape {array.shape}")
    return array


def to_channels(array: np.ndarray, channels: int, source: str = "image") -> np.ndarray:
    """(H, W) or (H, W, c) -> float32 (H, W, channels) in [0, 1]: gray is repeated for RGB
    models, alpha is dropped; any other mismatch is an error naming ``source``."""
    array = _scale_to_unit(np.asarray(array), Path(source))
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise DataError(f"{source}: expected (H, W) or (H, W, C) pixels, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{source}: image is empty ({array.shape[0]}x{array.shape[1]} pixels)")
    have = array.shape[2]
    if have in (2, 4):  # gray + alpha, RGB + alpha
        array = array[:, :, : have - 1]
        have -= 1
    if have == channels:
        return np.ascontiguousarray(array)
    if have == 1 and channels == 3:
        return np.repeat(array, 3, axis=2)
    raise DataError(
        f"{source}: image has {have} channel(s) but the model takes {channels}; convert the "
        "image or train a model with matching in_channels"
    )


def read_image(
    path: str | os.PathLike[str], channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """An image file as float32 (H, W, channels) in [0, 1]."""
    return to_channels(read_array(path, max_pixels), channels, str(path))


def read_mask(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A ground-truth mask file as bool (H, W): any nonzero pixel is defective."""
    array = read_array(path, max_pixels)
    if array.ndim == 3:
        if array.shape[2] in (2, 4):  # gray + alpha, RGB + alpha: opaque alpha is no defect
            array = array[:, :, :-1]
        array = array.max(axis=2)
    return array > 0


def _area_bins(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of each output cell's input range, as torch's "area"
    resize (adaptive average pooling) takes them: floor(i * in / out), ceil((i+1) * in / out)."""
    index = np.arange(size_out, dtype=np.int64)
    return (index * size_in) // size_out, -((-(index + 1) * size_in) // size_out)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask: a pixel is defective when at least half its area is.

    Shrinking counts the defective pixels of each cell in integers, a strip of rows at a
    time (the same cells and decisions as torch's "area" resize, without a float copy of
    the mask); enlarging is nearest."""
    size = (int(size[0]), int(size[1]))
    if mask.shape == size:
        return mask
    if size[0] >= mask.shape[0] and size[1] >= mask.shape[1]:
        t = torch.from_numpy(mask.astype(np.float32))[None, None]
        return (F.interpolate(t, size=size, mode="nearest")[0, 0] >= 0.5).numpy()
    row_start, row_end = _area_bins(mask.shape[0], size[0])
    col_start, col_end = _area_bins(mask.shape[1], size[1])
    per_row = np.empty((mask.shape[0], size[1]), dtype=np.int64)  # defects per row and cell
    rows = max(1, 2**22 // max(1, mask.shape[1]))
    for start in range(0, mask.shape[0], rows):
        running = np.cumsum(mask[start : start + rows], axis=1, dtype=np.int64)
        running = np.concatenate([np.zeros((running.shape[0], 1), np.int64), running], axis=1)
        per_row[start : start + rows] = running[:, col_end] - running[:, col_start]
    running = np.concatenate([np.zeros((1, size[1]), np.int64), np.cumsum(per_row, axis=0)])
    counts = running[row_end] - running[row_start]
    area = (row_end - row_start)[:, None] * (col_end - col_start)[None, :]
    return 2 * counts >= area


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def images_below(
    folder: str | os.PathLike[str], exclude: Sequence[str | os.PathLike[str]] = ()
) -> list[Path]:
    """Image files in ``folder`` and its subfolders, sorted by their path inside it
    (``crack/000.png`` after ``b.png``). Hidden subfolders (``.git``, ``.ipynb_checkpoints``),
    the ``exclude`` folders (an output folder inside the input) and folder links are not
    entered."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    skip = {Path(e).resolve() for e in exclude}
    found: list[Path] = []
    for current, dirs, files in os.walk(folder, onerror=_raise_walk_error):
        here = Path(current)
        dirs[:] = [d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skip]
        for name in files:
            path = here / name
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _raise_walk_error(error: OSError) -> None:
    raise DataError(f"{error.filename}: cannot list this folder ({error.strerror})")


def _glob_base(pattern: str) -> Path:
    """The folder a glob pattern starts from: its leading parts without wildcards."""
    parts = Path(pattern).parts
    literal = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        literal.append(part)
    return Path(*literal) if literal else Path()


def expand_named_inputs(
    inputs: Sequence[str | os.PathLike[str]], exclude: Sequence[str | os.PathLike[str]] = ()
) -> list[tuple[Path, str]]:
    """Files, folders (their images, subfolders included: :func:`images_below`) and glob
    patterns -> ``(image path, key)`` in the given order, each path once.

    The key names the image relative to what it was found through: the path inside the
    folder (``crack/000.png``) or below a pattern's fixed part, and a file's own name for a
    file; output names are made from it, so ``test/good/000.png`` and ``test/crack/000.png``
    stay apart."""
    named: dict[Path, str] = {}
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = images_below(path, exclude)
            if not found:
                raise DataError(
                    f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)}), "
                    "not in its subfolders either"
                )
            for image in found:
                named.setdefault(image, image.relative_to(path).as_posix())
        elif path.is_file():
            named.setdefault(path, path.name)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{text}: pattern matches no files")
            base = _glob_base(text)
            for image in matches:
                named.setdefault(image, image.relative_to(base).as_posix())
        else:
            raise DataError(f"{path}: no such file or folder")
    return list(named.items())


def expand_inputs(
    inputs: Sequence[str | os.PathLike[str]], exclude: Sequence[str | os.PathLike[str]] = ()
) -> list[Path]:
    """Files, folders (their images, subfolders included) and glob patterns -> image paths,
    in the given order (see :func:`expand_named_inputs`)."""
    return [path for path, _ in expand_named_inputs(inputs, exclude)]
