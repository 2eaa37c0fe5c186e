"""Images in: file reading, channels, masks and dataset layouts (MVTec AD, BTAD, folders).

Pixel values are read without loss (8-bit, 16-bit PNG and TIFF, float TIFF) and scaled to
[0, 1] by the range of their type; :mod:`pyramidflow.preprocess` turns them into model
inputs (geometry and the model's normalization ``(x - mean) / std``).
"""

from __future__ import annotations

import glob
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
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
# silently dropping the low byte. Those files are decoded here with zlib and numpy.

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG16_CHANNELS = {2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel
# Adam7 interlace passes: first row, first column, row step, column step
_ADAM7 = (
    (0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)
)  # fmt: skip


def _png16_header(path: Path) -> tuple[int, int, int, bool] | None:
    """(height, width, channels, interlaced) of a 16-bit colour PNG; None for other files."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if depth != 16 or colour not in _PNG16_CHANNELS:
        return None
    return height, width, _PNG16_CHANNELS[colour], interlace == 1


def _png_image_data(blob: bytes) -> bytes:
    """The concatenated IDAT payload of a PNG file, chunk CRCs checked."""
    parts, pos = [], len(_PNG_SIGNATURE)
    while True:
        if pos + 12 > len(blob):
            raise ValueError("truncated PNG file (no IEND chunk)")
        length, kind = struct.unpack(">I4s", blob[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(blob):
            raise ValueError(f"truncated PNG {kind.decode('latin-1')} chunk")
        body = blob[pos + 8 : end]
        if zlib.crc32(kind + body) != struct.unpack(">I", blob[end : end + 4])[0]:
            raise ValueError(f"CRC error in PNG {kind.decode('latin-1')} chunk")
        if kind == b"IDAT":
            parts.append(body)
        elif kind == b"IEND":
            return b"".join(parts)
        pos = end + 4


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the PNG row filters of (h, 1 + w * bpp) bytes -> uint8 (h, w * bpp)."""
    kinds = rows[:, 0].astype(np.intp)
    if kinds.max() > 4:
        raise ValueError(f"unknown PNG row filter {kinds.max()}")
    h, w = rows.shape[0], (rows.shape[1] - 1) // bpp
    filtered = rows[:, 1:].reshape(h, w, bpp).astype(np.int32)
    if kinds.max() <= 2:  # None, Sub, Up: whole rows at once
        out = np.empty_like(filtered)
        above = np.zeros((w, bpp), np.int32)
        for r in range(h):
            row = filtered[r]
            if kinds[r] == 1:
                row = np.cumsum(row, axis=0)
            elif kinds[r] == 2:
                row = row + above
            above = out[r] = row & 0xFF
        return out.astype(np.uint8).reshape(h, w * bpp)
    # Average and Paeth need the reconstructed left neighbour: sweep anti-diagonals, whose
    # pixels depend only on earlier ones (left, above, above-left). Row 0 / column 0 of
    # ``recon`` are the zeros the filters assume outside the image.
    recon = np.zeros((h + 1, w + 1, bpp), np.int32)
    for d in range(h + w - 1):
        r = np.arange(max(0, d - w + 1), min(h, d + 1))
        c = d - r
        a, b, ul = recon[r + 1, c], recon[r, c + 1], recon[r, c]
        predicted = np.choose(kinds[r, None], (0, a, b, (a + b) >> 1, _paeth(a, b, ul)))
        recon[r + 1, c + 1] = (filtered[r, c] + predicted) & 0xFF
    return recon[1:, 1:].astype(np.uint8).reshape(h, w * bpp)


def _read_png16(path: Path, height: int, width: int, channels: int, interlaced: bool) -> np.ndarray:
    """A 16-bit colour PNG as uint16 (H, W, channels), every bit kept."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise ValueError(f"{height}x{width} pixels exceeds the decompression bomb limit")
    bpp = 2 * channels
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    sizes = [
        (max(0, -(-(height - r0) // rs)), max(0, -(-(width - c0) // cs)))
        for r0, c0, rs, cs in passes
    ]
    expected = sum(h * (1 + w * bpp) for h, w in sizes if h and w)
    inflater = zlib.decompressobj()
    raw = inflater.decompress(_png_image_data(path.read_bytes()), expected)
    if len(raw) < expected:
        raise ValueError("PNG image data is truncated")
    out = np.empty((height, width, channels), np.uint16)
    offset = 0
    for (r0, c0, rs, cs), (h, w) in zip(passes, sizes, strict=True):
        if not (h and w):
            continue
        size = h * (1 + w * bpp)
        rows = np.frombuffer(raw, np.uint8, size, offset).reshape(h, 1 + w * bpp)
        offset += size
        pixels = _unfilter(rows, bpp).view(">u2").reshape(h, w, channels)
        out[r0::rs, c0::cs] = pixels
    return out


def read_array(path: str | os.PathLike[str]) -> np.ndarray:
    """The raw pixel array of an image file: (H, W) or (H, W, C), its own dtype."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            array = np.asarray(tifffile.imread(path))
        elif (png16 := _png16_header(path)) is not None:
            array = _read_png16(path, *png16)
        else:
            with Image.open(path) as img:
                if img.mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                elif img.mode == "I;16B":
                    img = img.convert("I;16")
                elif img.mode in _CONVERT_TO_RGB:
                    img = img.convert("RGB")
                array = np.array(img)  # a writable array, as tifffile gives
                if img.mode == "I" and img.format == "PNG":
                    array = array.astype(np.uint16)  # older Pillow: 16-bit gray PNG as "I"
    except MemoryError:
        raise
    except Exception as exc:
        # Decoders raise more than OSError on damaged files (zlib.error, KeyError for a
        # missing codec, DecompressionBombError, ...): all of them mean "cannot read".
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


def read_image(path: str | os.PathLike[str], channels: int = 3) -> np.ndarray:
    """An image file as float32 (H, W, channels) in [0, 1]."""
    return to_channels(read_array(path), channels, str(path))


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A ground-truth mask file as bool (H, W): any nonzero pixel is defective."""
    array = read_array(path)
    if array.ndim == 3:
        if array.shape[2] in (2, 4):  # gray + alpha, RGB + alpha: opaque alpha is no defect
            array = array[:, :, :-1]
        array = array.max(axis=2)
    return array > 0


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask: a pixel is defective when at least half its area is."""
    if mask.shape == tuple(size):
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    shrink = size[0] < mask.shape[0] or size[1] < mask.shape[1]
    mode = "area" if shrink else "nearest"
    return (F.interpolate(t, size=size, mode=mode)[0, 0] >= 0.5).numpy()


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files, folders (their images) and glob patterns -> image paths, in the given order."""
    paths: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise DataError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{text}: pattern matches no files")
            paths.extend(matches)
        else:
            raise DataError(f"{path}: no such file or folder")
    return list(dict.fromkeys(paths))
