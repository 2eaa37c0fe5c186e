"""Dataset layouts: MVTec AD and BTAD category folders, dataset roots, plain folders."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .images import list_images


@dataclass(frozen=True)
class Layout:
    """How a dataset names its folders: ``train/<good>``, ``test/<good>``, ``test/<defect>``
    and ``ground_truth/<defect>/<stem><mask_suffix>.<png|bmp|tif>``."""

    name: str
    good: str
    mask_suffix: str


MVTEC_LAYOUT = Layout("MVTec AD", good="good", mask_suffix="_mask")


BTAD_LAYOUT = Layout("BTAD", good="ok", mask_suffix="")  # defects in test/ko


LAYOUTS = (MVTEC_LAYOUT, BTAD_LAYOUT)


#: Test folders that hold good images ("good" in MVTec AD, "ok" in BTAD).
GOOD_FOLDERS = tuple(layout.good for layout in LAYOUTS)


_LAYOUT_HINT = "the MVTec AD layout <category>/train/good or the BTAD layout <category>/train/ok"


def detect_layout(folder: str | os.PathLike[str]) -> Layout | None:
    """The layout of a category folder, from its ``train/good`` or ``train/ok``; else None."""
    folder = Path(folder)
    return next((lay for lay in LAYOUTS if (folder / "train" / lay.good).is_dir()), None)


@dataclass
class Sample:
    """One test image with its ground truth (``mask`` is all False for good images).
    ``defect_type`` is the name of its folder under ``test/``."""

    path: Path
    defect_type: str
    mask_path: Path | None = None

    @property
    def is_defective(self) -> bool:
        return self.defect_type not in GOOD_FOLDERS


@dataclass
class CategoryFolder:
    """A dataset category: train/<good>, test/<good | defect>, ground_truth/<defect>."""

    root: Path
    train: list[Path] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    layout: Layout = MVTEC_LAYOUT

    @property
    def name(self) -> str:
        return self.root.name


def _mask_for(root: Path, defect_type: str, image: Path, layout: Layout) -> Path:
    folder = root / "ground_truth" / defect_type
    for suffix in dict.fromkeys((image.suffix, ".png", ".bmp", ".tif", ".tiff")):
        for stem in (f"{image.stem}_mask", image.stem):
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    expected = f"{image.stem}{layout.mask_suffix}.png"
    raise DataError(f"{folder}: no mask for test image {image} (expected {expected})")


def open_category(root: str | os.PathLike[str], *, need_test: bool = True) -> CategoryFolder:
    """Read an MVTec AD or BTAD category folder (the layout is detected from the folder
    names); errors name the missing part."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    layout = detect_layout(root)
    if layout is None:
        raise DataError(f"{root / 'train' / 'good'}: missing; expected {_LAYOUT_HINT}")
    train_dir = root / "train" / layout.good
    category = CategoryFolder(root=root, train=list_images(train_dir), layout=layout)
    if not category.train:
        raise DataError(f"{train_dir}: holds no images")
    test_dir = root / "test"
    if not test_dir.is_dir():
        if need_test:
            raise DataError(
                f"{test_dir}: missing; expected <category>/test/<{layout.good}|defect type>"
            )
        return category
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        good = type_dir.name in GOOD_FOLDERS
        for image in list_images(type_dir):
            mask = None if good else _mask_for(root, type_dir.name, image, layout)
            category.test.append(Sample(image, type_dir.name, mask))
    if need_test and not category.test:
        raise DataError(f"{test_dir}: holds no test images")
    return category


def find_categories(root: str | os.PathLike[str]) -> list[Path]:
    """The category folders of a dataset root (MVTec AD's 15, BTAD's 01, 02, 03), sorted by
    name; a category folder itself gives ``[root]``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    if detect_layout(root) is not None:
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and detect_layout(p) is not None)
    if not found:
        raise DataError(
            f"{root}: no dataset categories found; expected category folders in {_LAYOUT_HINT}"
        )
    return found


def training_images(source: str | os.PathLike[str]) -> list[Path]:
    """Good training images of a category (train/good or train/ok) or a plain folder."""
    path = Path(source)
    if detect_layout(path) is not None:
        return open_category(path, need_test=False).train
    images = list_images(path)
    if not images:
        raise DataError(f"{path}: holds no images and no train/good or train/ok folder")
    return images
