"""The command line, run in-process through ``pyramidflow.cli.main`` on tiny generated data:
help texts, the files each command writes, exit codes and one-line error messages."""

from __future__ import annotations

import csv
import functools
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import TINY_FLAGS
from PIL import Image
from safetensors.torch import save_file

import pyramidflow.demo
from pyramidflow.api import Detector
from pyramidflow.cli import build_parser, main

TINY = TINY_FLAGS
METRICS = ("pixel_auroc", "image_auroc", "aupro")


def run(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one in-process command (argparse exits count)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *mentions: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pyramidflow: error:"), err
    assert "Traceback" not in err
    for text in mentions:
        assert text in lines[0], (text, err)


# -- help ------------------------------------------------------------------------------------

OPTIONS = {
    "demo": ["--out", "--data", "--categories", "--epochs", "--device", "--no-progress"],
    "train": [
        "--out", "--overwrite", "--preset", "--config", "--image-size", "--levels", "--stacks",
        "--channels", "--kernel-size", "--volume-norm", "--epochs", "--batch-size", "--lr",
        "--augment", "--seed", "--memory", "--backend", "--device", "--no-progress",
    ],
    "predict": [
        "--out", "--overwrite", "--resume", "--batch-size", "--no-report", "--device",
        "--no-progress",
    ],
    "evaluate": ["--json", "--overwrite", "--device", "--no-progress"],
    "import-reference": ["--out", "--allow-pickle", "--image-size", "--overwrite"],
    "export": ["--format", "--out", "--overwrite", "--opset", "--static-batch"],
    "benchmark": [
        "--out", "--categories", "--image-size", "--epochs", "--levels", "--stacks", "--channels",
        "--kernel-size", "--batch-size", "--seed", "--overwrite", "--device", "--no-progress",
    ],
    "check": ["--threshold", "--batch-size", "--device"],
}  # fmt: skip


def _parser_options(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    parser = sub.choices[command]
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_help_of_every_command_mentions_each_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    options = set(OPTIONS[command]) | _parser_options(command)
    missing = [o for o in sorted(options) if o not in out]
    assert not missing, f"{command} --help does not mention {missing}"


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    assert sorted(sub.choices) == sorted(OPTIONS)  # every command is covered here
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in OPTIONS:
        assert command in out


def test_module_docstring_names_every_command() -> None:
    import pyramidflow.cli

    for command in OPTIONS:
        assert f"- ``{command}``:" in pyramidflow.cli.__doc__


def test_python_dash_m_help_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pyramidflow", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "predict" in result.stdout and "train" in result.stdout


def test_no_command_or_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run([], capsys)[0] == 2
    assert run(["fly"], capsys)[0] == 2


# -- train -----------------------------------------------------------------------------------


def test_train_writes_a_loadable_model(tiny_model: Path) -> None:
    detector = Detector.load(tiny_model)
    config = detector.config
    assert config.image_size == (32, 32)
    assert (config.levels, config.stacks, config.channels, config.epochs) == (3, 1, 8, 1)
    assert detector.template is not None and len(detector.template) == 3
    image = np.random.default_rng(0).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    prediction = detector.predict(image)
    assert prediction.anomaly_map.shape == (24, 36) and math.isfinite(prediction.score)


def test_train_on_plain_folder_with_config_file(
    tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "good_images"
    shutil.copytree(tiny_category / "train" / "good", folder)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"levels": 3, "stacks": 1, "channels": 8, "image_size": 64}))
    out = tmp_path / "models" / "plain.safetensors"  # the folder does not exist yet
    code, stdout, err = run(
        ["train", folder, "--out", out, "--config", config, "--image-size", "32", "--epochs", "1"]
        + ["--kernel-size", "3", "--no-progress"],
        capsys,
    )
    assert code == 0, err
    assert str(out) in stdout
    loaded = Detector.load(out).config
    assert loaded.image_size == (32, 32)  # the flag overrides the file
    assert (loaded.levels, loaded.stacks, loaded.channels) == (3, 1, 8)  # from the file


def test_train_refuses_an_existing_out(
    tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run(["train", tiny_category, "--out", out, *TINY], capsys)
    assert code == 2
    assert_one_line_error(err, str(out), "--overwrite")
    assert out.read_bytes() == b"precious"


# -- predict ---------------------------------------------------------------------------------


def _read_scores(out: Path) -> tuple[list[dict[str, str]], list[dict[str, object]]]:
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "scores.json").read_text())


@pytest.fixture
def mixed_folder(tiny_category: Path, tmp_path: Path) -> dict[str, tuple[int, int]]:
    """Images of several sizes and types: name -> (H, W) of the source."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(tiny_category / "test" / "good" / "000.png", folder / "good.png")
    shutil.copy(tiny_category / "test" / "hole" / "000.png", folder / "hole.png")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "wide.png")
    tifffile.imwrite(folder / "deep.tif", rng.integers(0, 65536, (36, 20), dtype=np.uint16))
    return {"good": (32, 32), "hole": (32, 32), "wide": (40, 56), "deep": (36, 20)}


def test_predict_folder_writes_maps_overlays_and_score_tables(
    tiny_model: Path,
    mixed_folder: dict[str, tuple[int, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "predictions"
    code, _, err = run(
        ["predict", tiny_model, tmp_path / "inputs", "--out", out, "--no-progress"], capsys
    )
    assert code == 0, err
    for name, (h, w) in mixed_folder.items():
        amap = tifffile.imread(out / f"{name}_map.tiff")
        assert amap.dtype == np.float32 and amap.shape == (h, w), name
        assert np.isfinite(amap).all()
        with Image.open(out / f"{name}_overlay.png") as overlay:
            assert overlay.size == (w, h) and overlay.mode == "RGB"
    rows, records = _read_scores(out)
    assert len(rows) == len(records) == len(mixed_folder)
    assert {Path(r["file"]).stem for r in rows} == set(mixed_folder)
    for row, record in zip(rows, records, strict=True):
        assert row["file"] == record["file"]
        assert float(row["score"]) == pytest.approx(record["score"])
        assert math.isfinite(float(row["score"]))
        assert (out / row["map"]).is_file() and row["map"] == record["map"]

    code, _, err = run(["predict", tiny_model, tmp_path / "inputs", "--out", out], capsys)
    assert code == 2
    assert_one_line_error(err, "scores.csv", "--overwrite")
    code, _, err = run(
        ["predict", tiny_model, tmp_path / "inputs", "--out", out, "--overwrite", "--no-progress"],
        capsys,
    )
    assert code == 0, err


def test_predict_files_globs_and_same_names_in_two_folders(
    tiny_model: Path, tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    inputs = [
        tiny_category / "test" / "good" / "000.png",
        str(tiny_category / "test" / "*" / "000.png"),
    ]
    code, _, err = run(["predict", tiny_model, *inputs, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    rows, _ = _read_scores(out)
    n_types = sum(1 for p in (tiny_category / "test").iterdir() if p.is_dir())
    assert len(rows) == n_types  # the explicit file is not scored twice
    maps = [r["map"] for r in rows]
    assert len(set(maps)) == len(maps)  # every 000.png gets its own map
    assert all((out / m).is_file() for m in maps)


def test_predict_corrupt_file_is_reported_and_the_others_processed(
    tiny_model: Path, tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        shutil.copy(tiny_category / "test" / "good" / "000.png", folder / name)
    (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    out = tmp_path / "out"
    code, stdout, err = run(["predict", tiny_model, folder, "--out", out, "--no-progress"], capsys)
    assert code == 1
    assert "b_broken.png" in err and "Traceback" not in err
    rows, records = _read_scores(out)
    assert [Path(r["file"]).name for r in rows] == ["a.png", "c.png"]
    assert len(records) == 2
    assert (out / "a_map.tiff").is_file() and (out / "c_map.tiff").is_file()
    assert not (out / "b_broken_map.tiff").exists()
    assert "1 failed" in stdout


@pytest.mark.parametrize(
    ("name", "pixels", "message"),
    [
        ("tiny.png", np.zeros((3, 40, 3), np.uint8), "smaller than the 4 pixels per side"),
        ("nan.tiff", np.full((32, 32), np.nan, np.float32), "NaN or Inf"),
        ("five.tiff", np.zeros((32, 32, 5), np.uint8), "5 channel(s) but the model takes 3"),
    ],
)
def test_predict_unusable_image_is_one_line_naming_it_and_exit_1(
    tiny_model: Path,
    tiny_category: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    pixels: np.ndarray,
    message: str,
) -> None:
    bad = tmp_path / name
    if name.endswith(".png"):
        Image.fromarray(pixels).save(bad)
    else:  # one page, all channels as samples of each pixel
        tifffile.imwrite(bad, pixels, photometric="minisblack", planarconfig="contig")
    good = tiny_category / "test" / "good" / "000.png"
    code, stdout, err = run(
        ["predict", tiny_model, bad, good, "--out", tmp_path / "out", "--no-progress"], capsys
    )
    assert code == 1 and "Traceback" not in err
    line = next(line for line in err.splitlines() if name in line)
    assert message in line, err
    assert "1 failed" in stdout and (tmp_path / "out" / "000_map.tiff").is_file()


# -- evaluate --------------------------------------------------------------------------------


def test_evaluate_prints_the_table_and_writes_json(
    tiny_model: Path, tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "reports" / "metrics.json"
    code, out, err = run(
        ["evaluate", tiny_model, tiny_category, "--json", report, "--no-progress"], capsys
    )
    assert code == 0, err
    assert "pixel AUROC" in out and "image AUROC" in out and "AUPRO" in out
    row = next(line for line in out.splitlines() if line.startswith("disc"))
    values = [float(v) for v in row.split()[1:]]
    assert len(values) == 6 and all(0.0 <= v <= 1.0 for v in values)  # AUROCs, AUPROs, F1s
    written = json.loads(report.read_text())
    metrics = written["categories"]["disc"]
    for key in METRICS:
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["pixel_auroc"] == pytest.approx(values[0], abs=1e-4)
    assert metrics["image_f1_max"] == pytest.approx(values[5], abs=1e-4)

    before = report.read_text()
    code, _, err = run(["evaluate", tiny_model, tiny_category, "--json", report], capsys)
    assert code == 2
    assert_one_line_error(err, str(report))
    assert report.read_text() == before


def test_evaluate_two_categories_adds_a_mean_row(
    tiny_model: Path, tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = Path(shutil.copytree(tiny_category, tmp_path / "disc_copy"))
    report = tmp_path / "both.json"
    code, out, err = run(
        ["evaluate", tiny_model, tiny_category, copy, "--json", report, "--no-progress"], capsys
    )
    assert code == 0, err
    assert any(line.startswith("mean") for line in out.splitlines())
    written = json.loads(report.read_text())
    assert set(written["categories"]) == {"disc", "disc_copy"}
    for key in METRICS:
        a, b = (written["categories"][n][key] for n in ("disc", "disc_copy"))
        assert a == pytest.approx(b)  # same images, same model
        assert written["mean"][key] == pytest.approx(a)


# -- errors ----------------------------------------------------------------------------------


def test_bad_paths_give_one_line_and_exit_1(
    tiny_model: Path, tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing_thing"
    garbage_model = tmp_path / "garbage.safetensors"
    garbage_model.write_bytes(b"not a model at all")
    no_test = tmp_path / "no_test"
    shutil.copytree(tiny_category / "train", no_test / "train")
    good = tiny_category / "test" / "good"
    predictions = tmp_path / "p"
    cases = [
        (["train", missing, "--out", tmp_path / "m.safetensors", *TINY], missing.name),
        (["predict", missing, good, "--out", predictions], missing.name),
        (["predict", tiny_model, missing, "--out", predictions], missing.name),
        (["predict", garbage_model, good, "--out", predictions], garbage_model.name),
        (["evaluate", tiny_model, missing], missing.name),
        (["evaluate", missing, tiny_category], missing.name),
        (["evaluate", tiny_model, no_test], str(no_test / "test")),
        (["import-reference", missing, "--out", tmp_path / "i.safetensors"], missing.name),
    ]
    for argv, mention in cases:
        code, _, err = run(argv, capsys)
        assert code == 1, (argv, err)
        assert_one_line_error(err, mention)
    assert not (tmp_path / "m.safetensors").exists()


def test_bad_data_and_files_give_one_line_naming_them(
    tiny_model: Path, tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Empty folder, mask of the wrong size, a safetensors file that is not ours, a
    truncated model, unknown config keys: one line naming the culprit, no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong_mask = Path(shutil.copytree(tiny_category, tmp_path / "wrong_mask"))
    mask = next((wrong_mask / "ground_truth").rglob("*.png"))
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(mask)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_model.read_bytes()[:1000])
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"levels": 3, "learning_rate": 0.1}))
    good = tiny_category / "test" / "good"
    cases = [
        (["train", empty, "--out", tmp_path / "m.safetensors", *TINY], 1, empty.name),
        (["evaluate", tiny_model, wrong_mask, "--no-progress"], 1, mask.name),
        (["predict", foreign, good, "--out", tmp_path / "p1"], 1, foreign.name),
        (["predict", truncated, good, "--out", tmp_path / "p2"], 1, truncated.name),
        (["train", tiny_category, "--out", tmp_path / "m.safetensors", "--config", config_file],
         2, "learning_rate"),
    ]  # fmt: skip
    for argv, exit_code, mention in cases:
        code, _, err = run(argv, capsys)
        assert code == exit_code, (argv, err)
        assert_one_line_error(err, mention)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    ("options", "mention"),
    [
        (["--levels", "1"], "levels"),
        (["--image-size", "30", "--levels", "3"], "image_size"),
        (["--image-size", "32", "32", "32"], "--image-size"),
        (["--batch-size", "1"], "batch"),
        (["--channels", "2"], "channels"),
        (["--kernel-size", "4"], "kernel_size"),
    ],
)
def test_bad_option_values_give_one_line_and_exit_2(
    options: list[str],
    mention: str,
    tiny_category: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "never.safetensors"
    code, _, err = run(["train", tiny_category, "--out", out, "--no-progress", *options], capsys)
    assert code == 2
    assert_one_line_error(err, mention)
    assert not out.exists()


def test_config_file_that_is_not_an_object_is_a_usage_error(
    tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "list.json"
    config.write_text("[1, 2]")
    code, _, err = run(
        ["train", tiny_category, "--out", tmp_path / "m", "--config", config], capsys
    )
    assert code == 2
    assert_one_line_error(err, "list.json")


def test_unparseable_option_is_exit_2(
    tiny_category: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["train", tiny_category, "--out", "x", "--levels", "many"], capsys)
    assert code == 2
    assert "many" in err and "Traceback" not in err


def test_too_few_training_images_is_one_line(
    tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        ["train", tiny_category, "--out", tmp_path / "m.safetensors", *TINY, "--batch-size", "16"],
        capsys,
    )
    assert code == 1
    assert_one_line_error(err, tiny_category.name, "16")


# -- demo ------------------------------------------------------------------------------------


@pytest.fixture
def small_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real demo trains 64 px models on 40 images of 128 px: shrink it for a test."""
    tiny = {"image_size": 32, "levels": 3, "stacks": 1, "channels": 8, "kernel_size": 3}
    for key, value in tiny.items():
        monkeypatch.setitem(pyramidflow.demo.DEMO_SETTINGS, key, value)
    monkeypatch.setattr(pyramidflow.demo, "DEMO_DATA_SIZE", 32)
    generator = functools.partial(
        pyramidflow.demo.generate_demo_dataset, n_train=4, n_test_good=2, n_test_defect_per_type=1
    )
    monkeypatch.setattr(pyramidflow.demo, "generate_demo_dataset", generator)


@pytest.mark.usefixtures("small_demo")
def test_demo_writes_metrics_models_and_overlays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    code, stdout, err = run(
        ["demo", "--out", out, "--categories", "disc", "--epochs", "1", "--no-progress"], capsys
    )
    assert code == 0, err
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["categories"]) == {"disc"}
    for row in (summary["categories"]["disc"], summary["mean"]):
        for key in METRICS:
            assert 0.0 <= row[key] <= 1.0, (key, row)
    assert summary["mean"]["pixel_auroc"] == pytest.approx(
        summary["categories"]["disc"]["pixel_auroc"]
    )
    assert summary["config"]["epochs"] == 1
    assert any(line.startswith("disc") for line in stdout.splitlines())
    assert (out / "data" / "disc" / "train" / "good").is_dir()
    assert Detector.load(out / "disc" / "model.safetensors").config.image_size == (32, 32)
    assert len(list((out / "disc" / "overlays").glob("*.png"))) == 2 + 4


def test_demo_unknown_category_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["demo", "--out", tmp_path, "--categories", "marble"], capsys)
    assert code == 2
    assert_one_line_error(err, "marble")


def test_evaluate_json_is_strict_when_a_metric_is_undefined(
    tiny_model: Path, tiny_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A category without defective test images has no AUROC: JSON null, never NaN."""
    good_only = tmp_path / "good_only"
    shutil.copytree(tiny_category / "train", good_only / "train")
    shutil.copytree(tiny_category / "test" / "good", good_only / "test" / "good")
    report = tmp_path / "metrics.json"
    code, out, err = run(
        ["evaluate", tiny_model, good_only, tiny_category, "--json", report, "--no-progress"],
        capsys,
    )
    assert code == 0, err
    written = json.loads(report.read_text(), parse_constant=lambda name: pytest.fail(name))
    assert written["categories"]["good_only"]["pixel_auroc"] is None
    mean, defective = written["mean"], written["categories"]["disc"]
    assert mean["pixel_auroc"] == pytest.approx(defective["pixel_auroc"])  # None skipped
    assert out.splitlines()[0] == "scoring: fused_peak"  # the recipe the metrics come from
    row = next(line for line in out.splitlines() if line.startswith("good_only"))
    assert "nan" in row  # the table shows the undefined value as nan
