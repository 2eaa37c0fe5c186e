"""``pyramidflow benchmark``: one model per category of an MVTec AD or BTAD root, resumable."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pyramidflow.benchmark import REPORTED_METRICS, benchmark_config, settings_mismatch
from pyramidflow.cli import main
from pyramidflow.config import Config
from pyramidflow.synthetic import generate_category

TINY = ["--epochs", "1", "--image-size", "32", "--levels", "3", "--stacks", "1"]
TINY += ["--channels", "8", "--kernel-size", "3", "--no-progress"]


def _synthetic(root: Path, source: str, name: str, seed: int) -> Path:
    """A 32 px synthetic category in the MVTec layout, renamed to ``name``."""
    folder = generate_category(
        root / "_src", source, size=32, n_train=4, n_test_good=2, n_test_defect_per_type=1,
        seed=seed,
    )  # fmt: skip
    return Path(shutil.move(folder, root / name))


def _to_btad(category: Path, suffix: str) -> None:
    """Rewrite an MVTec-layout category in BTAD's: train/ok, test/ok, test/ko with every
    defect type, same-stem masks in ground_truth/ko; images saved as ``suffix``."""
    for split in ("train", "test"):
        (category / split / "good").rename(category / split / "ok")
    (category / "test" / "ko").mkdir()
    (category / "ground_truth" / "ko").mkdir()
    for defect in [p for p in (category / "test").iterdir() if p.name not in ("ok", "ko")]:
        for image in defect.iterdir():
            new_stem = f"{defect.name}_{image.stem}"
            image.rename(category / "test" / "ko" / f"{new_stem}{image.suffix}")
            mask = category / "ground_truth" / defect.name / f"{image.stem}_mask.png"
            mask.rename(category / "ground_truth" / "ko" / f"{new_stem}.png")
        defect.rmdir()
        (category / "ground_truth" / defect.name).rmdir()
    if suffix != ".png":
        for image in category.glob("t*/*/*.png"):
            Image.open(image).save(image.with_suffix(suffix))
            image.unlink()


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    _synthetic(root, "tile", "grid", seed=1)
    _synthetic(root, "disc", "bottle", seed=2)
    shutil.rmtree(root / "_src")
    (root / "license.txt").write_text("not a category")
    return root


@pytest.fixture(scope="module")
def btad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("btad")
    _to_btad(_synthetic(root, "weave", "01", seed=3), ".bmp")
    _to_btad(_synthetic(root, "disc", "02", seed=4), ".png")
    shutil.rmtree(root / "_src")
    return root


def run(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one in-process command (argparse exits count)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_summary(summary: dict, names: set[str]) -> None:
    assert set(summary["categories"]) == names
    for row in summary["categories"].values():
        for key in REPORTED_METRICS:
            assert 0.0 <= row[key] <= 1.0, (key, row)
    for key in REPORTED_METRICS:
        values = [summary["categories"][n][key] for n in names]
        assert summary["mean"][key] == pytest.approx(sum(values) / len(values))


def test_mvtec_root_uses_presets_keeps_models_and_resumes(
    mvtec_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    code, stdout, err = run(
        ["benchmark", mvtec_root, "--out", out, "--categories", "grid", *TINY], capsys
    )
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["categories"].keys() == {"grid"}
    grid_model = (out / "grid.safetensors").read_bytes()

    # a rerun over the whole root reuses grid's model and trains only bottle
    code, stdout, err = run(["benchmark", mvtec_root, "--out", out, *TINY], capsys)
    assert code == 0, err
    assert (out / "grid.safetensors").read_bytes() == grid_model
    assert "reused" in next(line for line in stdout.splitlines() if line.startswith("grid"))
    assert "reused" not in next(line for line in stdout.splitlines() if line.startswith("bottle"))
    assert any(line.startswith("mean") for line in stdout.splitlines())
    summary = json.loads((out / "metrics.json").read_text())
    _check_summary(summary, {"grid", "bottle"})
    # each category got the paper's preset: grid is a texture (augmented), bottle is not
    assert summary["configs"]["grid"]["augment"] and not summary["configs"]["bottle"]["augment"]
    assert summary["configs"]["grid"]["volume_norm"] == "SVN"

    # other settings: refused without --overwrite, nothing touched; retrained with it
    before = (out / "metrics.json").read_text()
    code, _, err = run(["benchmark", mvtec_root, "--out", out, *TINY, "--epochs", "2"], capsys)
    assert code == 1
    assert "bottle.safetensors" in err and "epochs" in err and err.count("\n") == 1
    assert (out / "metrics.json").read_text() == before
    assert (out / "grid.safetensors").read_bytes() == grid_model
    argv = ["benchmark", mvtec_root, "--out", out, *TINY, "--epochs", "2", "--overwrite"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "metrics.json").read_text())
    assert {c["epochs"] for c in summary["configs"].values()} == {2}
    assert (out / "grid.safetensors").read_bytes() != grid_model

    # a run over some categories keeps the rows of the others
    argv = ["benchmark", mvtec_root, "--out", out, "--categories", "grid", *TINY, "--epochs", "2"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    rerun = json.loads((out / "metrics.json").read_text())
    assert rerun["categories"]["bottle"] == summary["categories"]["bottle"]
    assert rerun["configs"].keys() == {"grid", "bottle"}
    _check_summary(rerun, {"grid", "bottle"})


def test_btad_root_counts_ok_images_as_good(
    btad_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "btad_results"
    code, stdout, err = run(["benchmark", btad_root, "--out", out, *TINY], capsys)
    assert code == 0, err
    summary = json.loads((out / "metrics.json").read_text())
    _check_summary(summary, {"01", "02"})
    # image AUROC needs good and defective test images: NaN if "ok" were not read as good
    assert all(not math.isnan(r["image_auroc"]) for r in summary["categories"].values())
    assert (out / "01.safetensors").is_file() and (out / "02.safetensors").is_file()
    assert summary["configs"]["01"]["levels"] == 3  # the override reaches every category


def test_errors_are_one_line(
    mvtec_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_categories = tmp_path / "not_a_dataset"
    (no_categories / "bottle").mkdir(parents=True)
    code, _, err = run(["benchmark", no_categories, "--out", tmp_path / "o", *TINY], capsys)
    assert code == 1 and "not_a_dataset: no dataset categories found" in err
    assert err.count("\n") == 1
    code, _, err = run(
        ["benchmark", mvtec_root, "--out", tmp_path / "o", "--categories", "marble", *TINY], capsys
    )
    assert code == 2 and "marble" in err and "bottle, grid" in err
    out = tmp_path / "garbage"
    out.mkdir()
    (out / "metrics.json").write_text("{not json")
    code, _, err = run(["benchmark", mvtec_root, "--out", out, *TINY], capsys)
    assert code == 1 and str(out / "metrics.json") in err and "--overwrite" in err
    assert (out / "metrics.json").read_text() == "{not json"
    assert not list(out.glob("*.safetensors"))


def test_configs_follow_the_paper() -> None:
    assert benchmark_config("screw").levels == 2  # MVTec AD preset
    assert benchmark_config("carpet", levels=3).levels == 3
    btad = benchmark_config("01")
    assert (btad.levels, btad.volume_norm, btad.augment, btad.category) == (4, "CVN", False, "01")
    trained = Config(image_size=32, levels=3, in_channels=1, mean=(0.4,), std=(0.2,))
    assert settings_mismatch(Config(image_size=32, levels=3), trained) is None
    assert "stacks" in settings_mismatch(Config(image_size=32, levels=3, stacks=2), trained)
