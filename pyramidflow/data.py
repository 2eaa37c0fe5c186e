"""Images in: file reading, dataset layouts, resizing and normalization.

Pixel values are read without loss (8-bit, 16-bit, float TIFF) and scaled to [0, 1] by the
range of their type; the model's normalization ``(x - mean) / std`` is applied afterwards.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import Config
from .errors import DataError

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


def read_array(path: str | os.PathLike[str]) -> np.ndarray:
    """The raw pixel array of an image file: (H, W) or (H, W, C), its own dtype."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as img:
                if img.mode == "P":
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                elif img.mode == "I;16B":
                    img = img.convert("I;16")
                elif img.mode in _CONVERT_TO_RGB:
                    img = img.convert("RGB")
                array = np.asarray(img)
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


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of (B, C, H, W) to ``size``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask: a pixel is defective when at least half its area is."""
    if mask.shape == tuple(size):
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    shrink = size[0] < mask.shape[0] or size[1] < mask.shape[1]
    mode = "area" if shrink else "nearest"
    return (F.interpolate(t, size=size, mode=mode)[0, 0] >= 0.5).numpy()


def normalize(images: torch.Tensor, config: Config) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> the model's input ``(x - mean) / std``."""
    mean = torch.tensor(config.mean, dtype=images.dtype, device=images.device)
    std = torch.tensor(config.std, dtype=images.dtype, device=images.device)
    return (images - mean[:, None, None]) / std[:, None, None]


def prepare(image: np.ndarray, config: Config, source: str = "image") -> torch.Tensor:
    """One (H, W[, C]) pixel array -> normalized (in_channels, H', W') at the model size."""
    pixels = to_channels(image, config.in_channels, source)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    return normalize(resize_image(tensor, config.image_size), config)[0].contiguous()


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


@dataclass
class Sample:
    """One test image with its ground truth (``mask`` is all False for good images)."""

    path: Path
    defect_type: str
    mask_path: Path | None = None

    @property
    def is_defective(self) -> bool:
        return self.defect_type != "good"


@dataclass
class CategoryFolder:
    """An MVTec-AD-layout category: train/good, test/<type>, ground_truth/<type>."""

    root: Path
    train: list[Path] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name


def _mask_for(root: Path, defect_type: str, image: Path) -> Path:
    folder = root / "ground_truth" / defect_type
    for suffix in (image.suffix, ".png", ".bmp", ".tif", ".tiff"):
        for stem in (f"{image.stem}_mask", image.stem):
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise DataError(f"{folder}: no mask for test image {image} (expected {image.stem}_mask.png)")


def open_category(root: str | os.PathLike[str], *, need_test: bool = True) -> CategoryFolder:
    """Read an MVTec-AD-layout category folder; errors name the missing part."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise DataError(f"{train_dir}: missing; expected the MVTec layout <category>/train/good")
    category = CategoryFolder(root=root, train=list_images(train_dir))
    if not category.train:
        raise DataError(f"{train_dir}: holds no images")
    test_dir = root / "test"
    if not test_dir.is_dir():
        if need_test:
            raise DataError(f"{test_dir}: missing; expected <category>/test/<good|defect type>")
        return category
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for image in list_images(type_dir):
            mask = None if type_dir.name == "good" else _mask_for(root, type_dir.name, image)
            category.test.append(Sample(image, type_dir.name, mask))
    if need_test and not category.test:
        raise DataError(f"{test_dir}: holds no test images")
    return category


def training_images(source: str | os.PathLike[str]) -> list[Path]:
    """Good training images from an MVTec-layout category (train/good) or a plain folder."""
    path = Path(source)
    if (path / "train" / "good").is_dir():
        return open_category(path, need_test=False).train
    images = list_images(path)
    if not images:
        raise DataError(f"{path}: holds no images and no train/good folder")
    return images


def load_stack(
    items: Iterable[str | os.PathLike[str] | np.ndarray], config: Config, *, progress: bool = False
) -> torch.Tensor:
    """Read and prepare images (paths or arrays) into one (N, C, H, W) float32 tensor."""
    from .progress import progress_bar

    items = list(items)
    if not items:
        raise DataError("no training images given")
    out = torch.empty(len(items), config.in_channels, *config.image_size)
    for i, item in enumerate(progress_bar(items, "reading images", enabled=progress)):
        if isinstance(item, np.ndarray):
            out[i] = prepare(item, config, f"array {i}")
        else:
            out[i] = prepare(read_array(item), config, str(item))
    return out
