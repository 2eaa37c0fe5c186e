"""Tests for the synthetic MVTec-layout demo data generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyramidflow import synthetic
from pyramidflow.synthetic import (
    DEFECT_TYPES,
    DEMO_CATEGORIES,
    MARKER_NAME,
    TEXTURE_CATEGORIES,
    generate_category,
    generate_demo_dataset,
    render_defect,
    render_normal,
)

SMALL = {"size": 32, "n_train": 2, "n_test_good": 2, "n_test_defect_per_type": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_catalogue() -> None:
    assert len(DEMO_CATEGORIES) >= 4
    assert TEXTURE_CATEGORIES < set(DEMO_CATEGORIES)  # at least one registered object
    assert set(DEFECT_TYPES) == set(DEMO_CATEGORIES)
    kinds = {d for types in DEFECT_TYPES.values() for d in types}
    needed = {"scratch", "stain", "faint_spot", "hole", "crack", "contamination", "structural"}
    assert needed <= kinds
    for types in DEFECT_TYPES.values():
        assert len(types) == len(set(types)) >= 2
        assert "good" not in types


def test_layout_and_counts(tmp_path: Path) -> None:
    root = generate_demo_dataset(
        tmp_path / "data", size=40, n_train=3, n_test_good=2, n_test_defect_per_type=2
    )
    assert root == tmp_path / "data"
    assert sorted(p.name for p in root.iterdir()) == sorted(DEMO_CATEGORIES)  # no temp leftovers
    for cat in DEMO_CATEGORIES:
        folder = root / cat
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [MARKER_NAME, "train", "test", "ground_truth"]
        )
        assert _pngs(folder / "train") == ["good"]
        assert _pngs(folder / "train" / "good") == ["000.png", "001.png", "002.png"]
        assert _pngs(folder / "test") == sorted(["good", *DEFECT_TYPES[cat]])
        assert _pngs(folder / "test" / "good") == ["000.png", "001.png"]
        assert _pngs(folder / "ground_truth") == sorted(DEFECT_TYPES[cat])
        for img_path in (folder / "train" / "good").iterdir():
            with Image.open(img_path) as im:
                assert (im.mode, im.size) == ("RGB", (40, 40))
        for defect in DEFECT_TYPES[cat]:
            assert _pngs(folder / "test" / defect) == ["000.png", "001.png"]
            assert _pngs(folder / "ground_truth" / defect) == ["000_mask.png", "001_mask.png"]
            for i in range(2):
                with Image.open(folder / "test" / defect / f"{i:03d}.png") as im:
                    assert (im.mode, im.size) == ("RGB", (40, 40))
                with Image.open(folder / "ground_truth" / defect / f"{i:03d}_mask.png") as m:
                    assert (m.mode, m.size) == ("L", (40, 40))
                    mask = np.asarray(m)
                assert set(np.unique(mask)) <= {0, 255}
                assert (mask == 255).any()
        marker = json.loads((folder / MARKER_NAME).read_text())
        assert marker["size"] == 40 and marker["category"] == cat


def test_deterministic_bytes(tmp_path: Path) -> None:
    a = _files(generate_demo_dataset(tmp_path / "a", **SMALL))
    b = _files(generate_demo_dataset(tmp_path / "b", **SMALL))
    assert a.keys() == b.keys() and len(a) > 0
    assert a == b


def test_seeds_differ(tmp_path: Path) -> None:
    a = _files(generate_category(tmp_path / "a", "grain", seed=0, **SMALL))
    b = _files(generate_category(tmp_path / "b", "grain", seed=1, **SMALL))
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".png") and "_mask" not in name:
            assert a[name] != b[name], name


def test_subset_matches_full_run(tmp_path: Path) -> None:
    full = _files(generate_demo_dataset(tmp_path / "full", **SMALL) / "tile")
    only = _files(generate_category(tmp_path / "only", "tile", **SMALL))
    assert full == only


def test_skip_when_complete(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_demo_dataset(root, categories=("weave",), **SMALL)
    sentinel = root / "weave" / "sentinel.txt"
    sentinel.write_text("kept")
    generate_demo_dataset(root, categories=("weave",), **SMALL)
    assert sentinel.exists()  # same parameters: nothing rewritten


def test_conflict_raises_and_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_demo_dataset(root, categories=("weave",), **SMALL)
    before = _files(root)
    changed = {**SMALL, "n_train": 3}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_demo_dataset(root, categories=("disc", "weave"), **changed)
    assert _files(root) == before  # checked up front: nothing written, not even "disc"
    with pytest.raises(FileExistsError, match="weave"):
        generate_category(root, "weave", **changed)
    generate_demo_dataset(root, categories=("weave",), overwrite=True, **changed)
    assert _pngs(root / "weave" / "train" / "good") == ["000.png", "001.png", "002.png"]
    assert json.loads((root / "weave" / MARKER_NAME).read_text())["n_train"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["weave"]


def test_incomplete_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "disc" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        generate_demo_dataset(root, categories=("disc",), **SMALL)
    (root / "disc" / "train").rmdir()  # an empty folder counts as absent
    generate_demo_dataset(root, categories=("disc",), **SMALL)
    assert (root / "disc" / MARKER_NAME).is_file()


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_save = synthetic._save_png

    def failing_save(array: np.ndarray, path: Path) -> None:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        real_save(array, path)

    monkeypatch.setattr(synthetic, "_save_png", failing_save)
    root = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        generate_category(root, "tile", **SMALL)
    assert list(root.iterdir()) == []
    monkeypatch.setattr(synthetic, "_save_png", real_save)
    generate_category(root, "tile", **SMALL)
    assert (root / "tile" / MARKER_NAME).is_file()


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_masks_aligned_with_defects(category: str) -> None:
    for defect in DEFECT_TYPES[category]:
        for seed in range(3):
            normal = render_normal(category, np.random.default_rng(seed), 64).astype(float)
            img, mask = render_defect(category, defect, np.random.default_rng(seed), 64)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            assert mask.shape == (64, 64) and mask.dtype == bool and mask.any()
            diff = np.abs(img - normal).mean(axis=-1)
            inside, outside = diff[mask].mean(), diff[~mask].mean()
            assert inside > 5.0, (defect, inside)  # even the faint spot moves ~10-15 %
            assert inside > 20 * outside, (defect, inside, outside)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_defect_area_and_border(size: int) -> None:
    for category in DEMO_CATEGORIES:
        for defect in DEFECT_TYPES[category]:
            for seed in range(4):
                _, mask = render_defect(category, defect, np.random.default_rng([size, seed]), size)
                assert 0.003 <= mask.mean() <= 0.05, (category, defect, mask.mean())
                assert not mask[:4].any() and not mask[-4:].any()
                assert not mask[:, :4].any() and not mask[:, -4:].any()


def test_normal_images_vary() -> None:
    for category in DEMO_CATEGORIES:
        imgs = [render_normal(category, np.random.default_rng(i), 48) for i in range(4)]
        for img in imgs:
            assert img.shape == (48, 48, 3) and img.dtype == np.uint8
            assert 20 < img.mean() < 235 and img.std() > 5
        for i in range(len(imgs)):
            for j in range(i):
                assert not np.array_equal(imgs[i], imgs[j])
        again = render_normal(category, np.random.default_rng(0), 48)
        np.testing.assert_array_equal(again, imgs[0])


def test_invalid_arguments(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for bad in (24, 36, 0):
        with pytest.raises(ValueError, match="multiple of 8"):
            render_normal("weave", rng, bad)
    with pytest.raises(ValueError, match="unknown category"):
        render_normal("carpet", rng, 32)
    with pytest.raises(ValueError, match="unknown defect"):
        render_defect("disc", "structural", rng, 32)
    with pytest.raises(ValueError):
        generate_demo_dataset(tmp_path, categories=("nope",))
    with pytest.raises(ValueError):
        generate_category(tmp_path, "weave", size=32, n_train=0)
    with pytest.raises(ValueError):
        generate_category(tmp_path, "weave", size=32, seed=-1)
    assert list(tmp_path.iterdir()) == []
