"""`pyramidflow predict`: per-image outputs, score tables, report, resume, safe names."""

from __future__ import annotations

import csv
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pyramidflow import predict, viz
from pyramidflow.api import Detector
from pyramidflow.cli import main

COLUMNS = ["file", "score", "decision", "map", "overlay", "mask"]
SIZES = {"wide": (40, 56), "tall": (48, 24), "gray": (30, 20), "deep": (36, 20)}


def run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one in-process command (argparse exits count)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(path: Path) -> object:
    """Parse JSON as a strict reader would: NaN / Infinity tokens are errors."""

    def refuse(token: str) -> None:
        raise ValueError(f"{path}: non-standard JSON token {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def snapshot(folder: Path) -> dict[str, int]:
    """File name -> mtime in ns of every file in ``folder``."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def category(tiny_category: Path) -> Path:
    """The session's tiny category (conftest.py)."""
    return tiny_category


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Path:
    """The session's tiny model (conftest.py), trained on ``category``."""
    return tiny_model


@pytest.fixture(scope="module")
def model_without_threshold(model: Path) -> Path:
    """The same weights without a threshold, as an imported reference model has."""
    detector = Detector.load(model)
    detector.threshold = None
    detector.info = {k: v for k, v in detector.info.items() if k != "threshold"}
    return detector.save(model.with_name("no_threshold.safetensors"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Non-square images of several sizes and pixel types."""
    folder = tmp_path_factory.mktemp("predict_inputs")
    rng = np.random.default_rng(7)
    for name in ("wide", "tall"):
        h, w = SIZES[name]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
    Image.fromarray(rng.integers(0, 256, SIZES["gray"], dtype=np.uint8)).save(folder / "gray.png")
    tifffile.imwrite(folder / "deep.tif", rng.integers(0, 65536, SIZES["deep"], dtype=np.uint16))
    return folder


# -- outputs ----------------------------------------------------------------------------------


def test_every_image_gets_map_overlay_and_mask_at_its_own_size(
    model: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(["predict", model, inputs, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    detector = Detector.load(model)
    threshold, map_threshold = detector.threshold, detector.map_threshold()
    assert threshold is not None and map_threshold is not None
    for name, (h, w) in SIZES.items():
        amap = tifffile.imread(out / f"{name}_map.tiff")
        assert amap.dtype == np.float32 and amap.shape == (h, w), name
        assert np.isfinite(amap).all()
        with Image.open(out / f"{name}_overlay.png") as picture:
            assert picture.size == (w, h) and picture.mode == "RGB"
        with Image.open(out / f"{name}_mask.png") as picture:
            assert picture.size == (w, h) and picture.mode == "L"
            mask = np.asarray(picture)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, amap >= map_threshold)

    records = strict_json(out / "scores.json")
    rows = read_csv(out / "scores.csv")
    assert isinstance(records, list) and len(records) == len(rows) == len(SIZES)
    assert list(rows[0]) == COLUMNS and all(list(r) == COLUMNS for r in records)
    for row, record in zip(rows, records, strict=True):
        assert row["file"] == record["file"] and row["map"] == record["map"]
        assert float(row["score"]) == pytest.approx(record["score"])
        expected = "anomalous" if record["score"] >= threshold else "good"
        assert record["decision"] == row["decision"] == expected
        for column in ("map", "overlay", "mask"):
            assert (out / record[column]).is_file()
    assert "report:" in stdout and (out / "report.html").is_file()


def test_model_without_threshold_writes_no_masks_and_empty_decisions(
    model_without_threshold: Path,
    inputs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = ["predict", model_without_threshold, inputs, "--out", out, "--no-progress"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert err.count("no threshold") == 1  # said once, not once per image
    assert not list(out.glob("*_mask.png"))
    records = strict_json(out / "scores.json")
    assert isinstance(records, list) and len(records) == len(SIZES)
    assert all(r["decision"] == "" and r["mask"] == "" for r in records)
    assert all(r["decision"] == "" for r in read_csv(out / "scores.csv"))


def test_tables_write_a_non_finite_score_as_null(tmp_path: Path) -> None:
    row = {"file": "x.png", "score": None, "decision": "", "map": "x_map.tiff"}
    predict.journal.write_tables(tmp_path, [{**row, "overlay": "x_overlay.png", "mask": ""}])
    assert strict_json(tmp_path / "scores.json") == [
        {**row, "overlay": "x_overlay.png", "mask": ""}
    ]
    assert read_csv(tmp_path / "scores.csv")[0]["score"] == ""


# -- existing outputs, resume -----------------------------------------------------------------


def test_existing_results_are_kept_without_resume_or_overwrite(
    model: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run(["predict", model, inputs, "--out", out, "--no-progress"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code, stdout, err = run(["predict", model, inputs, "--out", out, "--no-progress"], capsys)
    assert code == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyramidflow: error:"), err
    assert "scores.csv exists" in lines[0] and "--resume" in lines[0]
    assert "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    code, _, err = run(["predict", model, inputs, "--out", out, "--resume", "--overwrite"], capsys)
    assert code == 2 and "not allowed with" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # one image's outputs alone (no tables yet) also count as earlier results
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "wide_map.tiff").write_bytes(b"mine")
    code, _, err = run(["predict", model, inputs, "--out", lone], capsys)
    assert code == 2 and "wide_map.tiff exists" in err
    assert (lone / "wide_map.tiff").read_bytes() == b"mine"

    code, _, err = run(
        ["predict", model, inputs, "--out", out, "--overwrite", "--no-progress"], capsys
    )
    assert code == 0, err


def test_resume_recomputes_only_what_a_killed_run_left_undone(
    model: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["predict", model, inputs, "--out", out, "--no-progress", "--batch-size", "2"]
    assert run(argv, capsys)[0] == 0
    complete = read_csv(out / "scores.csv")

    # a run killed while writing "wide": its outputs and row missing, a torn journal line,
    # a temporary file, no final tables
    for name in ("scores.csv", "scores.json", "report.html", "wide_map.tiff", "wide_mask.png"):
        (out / name).unlink()
    journal = out / "scores.jsonl"
    lines = journal.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if '"wide"' not in line]
    assert len(kept) == len(lines) - 1
    journal.write_text("\n".join(kept) + '\n{"file": "/x/wide.png", "na', encoding="utf-8")
    (out / ".wide_overlay.png.abc.pyramidflow-tmp").write_bytes(b"half a file")
    before = snapshot(out)

    code, stdout, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert "scored 1 image(s)" in stdout and "3 done earlier" in stdout
    after = snapshot(out)
    recomputed = {n for n in before if n in after and after[n] != before[n]}
    assert recomputed == {"wide_overlay.png", "scores.jsonl"}
    assert {"wide_map.tiff", "wide_mask.png", "scores.csv", "report.html"} <= set(after)
    assert not list(out.glob(".*"))  # the stale temporary file is gone
    resumed = read_csv(out / "scores.csv")
    assert [r["file"] for r in resumed] == [r["file"] for r in complete]
    for old, new in zip(complete, resumed, strict=True):
        assert float(new["score"]) == pytest.approx(float(old["score"]), rel=1e-5)
    assert len(strict_json(out / "scores.json")) == len(SIZES)  # type: ignore[arg-type]

    # resuming a finished run scores nothing and keeps every image file
    before = snapshot(out)
    code, stdout, _ = run([*argv, "--resume"], capsys)
    assert code == 0 and "scored 0 image(s)" in stdout
    after = snapshot(out)
    assert all(after[n] == before[n] for n in before if n.endswith((".tiff", ".png")))


def test_resume_refuses_results_of_another_model(
    model: Path,
    model_without_threshold: Path,
    inputs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    assert run(["predict", model, inputs, "--out", out, "--no-progress"], capsys)[0] == 0
    argv = ["predict", model_without_threshold, inputs, "--out", out, "--resume"]
    code, _, err = run(argv, capsys)
    assert code == 1 and "another model" in err and len(err.strip().splitlines()) == 1


def test_images_stream_through_in_batches(
    model: Path, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch's files and journal rows are written before the next batch is scored."""
    detector = Detector.load(model)
    out = tmp_path / "out"
    seen: list[tuple[int, int, int]] = []  # (batch size, journal rows, map files) per call
    score_batch = detector.score_batch

    def spy(images, **kwargs):  # type: ignore[no-untyped-def]
        journal = out / "scores.jsonl"
        rows = len(journal.read_text().splitlines()) - 1 if journal.exists() else 0
        seen.append((images.shape[0], rows, len(list(out.glob("*_map.tiff")))))
        return score_batch(images, **kwargs)

    monkeypatch.setattr(detector, "score_batch", spy)
    paths = sorted(inputs.iterdir())
    summary = predict.run_predict(detector, paths, out, batch_size=3)
    assert seen == [(3, 0, 0), (1, 3, 3)]
    assert summary.scored == summary.rows == len(paths) and not summary.failed


# -- bad files --------------------------------------------------------------------------------


def test_corrupt_file_is_skipped_and_the_others_processed(
    model: Path, category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        shutil.copy(category / "test" / "good" / "000.png", folder / name)
    (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    out = tmp_path / "out"
    code, stdout, err = run(["predict", model, folder, "--out", out, "--no-progress"], capsys)
    assert code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if "b_broken.png" in line] == [
        line for line in err.splitlines() if line.startswith("pyramidflow: skipped")
    ]
    assert "1 failed" in stdout
    assert [Path(r["file"]).name for r in read_csv(out / "scores.csv")] == ["a.png", "c.png"]
    assert not list(out.glob("b_broken*"))
    for name in ("a", "c"):
        assert all((out / f"{name}{s}").is_file() for s in predict.IMAGE_SUFFIXES)


def test_mvtec_test_folder_is_taken_with_its_subfolders_kept_apart(
    model: Path, category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = tmp_path / "test"
    shutil.copytree(category / "test", test)
    expected = sorted(p.relative_to(test).as_posix() for p in test.rglob("*.png"))
    assert "good/000.png" in expected and len({Path(k).name for k in expected}) < len(expected)
    out = test / "results"  # inside the input folder: must not be read back on a rerun
    code, stdout, err = run(["predict", model, test, "--out", out, "--no-progress"], capsys)
    assert code == 0, err

    rows = read_csv(out / "scores.csv")
    assert [Path(r["file"]).relative_to(test).as_posix() for r in rows] == expected
    stems = [k.removesuffix(".png").replace("/", "_") for k in expected]
    assert [r["map"] for r in rows] == [f"{s}_map.tiff" for s in stems]  # crack_000, good_000
    for row in rows:
        assert all((out / row[c]).is_file() for c in ("map", "overlay", "mask"))
    threshold = Detector.load(model).map_threshold()
    assert threshold is not None
    good = np.asarray(Image.open(test / "good" / "000.png"))
    amap = tifffile.imread(out / "good_000_map.tiff")
    low = amap < threshold / 2
    assert low.mean() > 0.5  # a good image is mostly calm
    picture = np.asarray(Image.open(out / "good_000_overlay.png"))
    np.testing.assert_array_equal(picture[low], viz.to_display(good)[low])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert all(f">{key}<br>" in page for key in expected)  # captions keep the subfolder
    assert ">good</text>" in page and ">defective</text>" in page

    code, stdout, err = run(
        ["predict", model, test, "--out", out, "--resume", "--no-progress"], capsys
    )
    assert code == 0, err
    assert f"({len(expected)} done earlier, kept)" in stdout and "scored 0 image(s)" in stdout
    assert len(read_csv(out / "scores.csv")) == len(expected)


def test_folder_without_images_anywhere_says_so(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    code, _, err = run(["predict", model, tmp_path / "empty", "--out", tmp_path / "o"], capsys)
    assert code != 0 and "Traceback" not in err
    assert "empty: folder holds no images" in err and "subfolders" in err


def test_a_skip_message_is_a_line_of_its_own_under_the_progress_bar(
    model: Path,
    category: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    terminal_lines,
) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(category / "test" / "good" / "000.png", folder / "a.png")
    (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    code, _, err = run(["predict", model, folder, "--out", tmp_path / "out"], capsys)
    assert code == 1 and "predicting" in err  # the bar was drawn
    shown = [line for line in terminal_lines(err) if line]
    skipped = [line for line in shown if "b_broken.png" in line]
    assert len(skipped) == 1 and skipped[0].startswith("pyramidflow: skipped "), shown
    assert not any("predicting" in line and "skipped" in line for line in shown)


def test_overlay_keeps_the_image_where_the_map_is_low_and_tints_where_high() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (24, 32), dtype=np.uint8)  # a grayscale part
    threshold = 0.4
    amap = np.full((24, 32), 0.1 * threshold, np.float32)
    amap[:, 8:16] = 0.49 * threshold  # still below half the threshold
    amap[:, 16:20] = 0.75 * threshold
    amap[:, 20:24] = threshold
    amap[:, 24:] = 2.0 * threshold
    amap[0, 0] = np.nan
    picture = viz.heat_overlay(image, amap, *viz.heat_range(amap, threshold))
    gray = np.repeat(image[..., None], 3, axis=2)

    low = amap < threshold / 2
    np.testing.assert_array_equal(picture[low], gray[low])  # untouched, not tinted purple
    distance = np.abs(picture.astype(np.int32) - gray).sum(axis=2)
    assert (distance[:, 16:] > 0).mean() > 0.9 and distance[0, 0] > 0  # tinted
    # the tint grows with the score: heat colour weight 0 -> 0.35 -> 0.7 -> 0.7
    heat = viz.colorize(amap, *viz.heat_range(amap, threshold)).astype(np.float32)
    for columns, weight in ((slice(16, 20), 0.35), (slice(20, 24), 0.7), (slice(24, 32), 0.7)):
        expected = gray[:, columns] * (1 - weight) + heat[:, columns] * weight
        assert np.abs(picture[:, columns] - expected).max() <= 1.0, columns


# -- report -----------------------------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]


def report_links(out: Path) -> list[str]:
    """Every src/href of ``out/report.html``, checked to be local files that exist."""
    parser = _Links()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    assert "script" not in parser.tags and "link" not in parser.tags
    for link in parser.links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        target = (out / unquote(parts.path)).resolve()
        assert target.is_file() and target.parent == out.resolve(), link
    return parser.links


def test_report_shows_labelled_histogram_and_links_only_local_files(
    model: Path, category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, _, err = run(
        ["predict", model, f"{category}/test/*/*.png", "--out", out, "--no-progress"], capsys
    )
    assert code == 0, err
    links = report_links(out)
    rows = read_csv(out / "scores.csv")
    assert {r["overlay"] for r in rows} <= set(links)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert ">good</text>" in page and ">defective</text>" in page  # labels from test/<type>
    assert "threshold" in page and "image AUROC" in page
    held_out = Detector.load(model).info["held_out_images"]
    assert f"quantile of the scores of {held_out} held-out good images" in page
    assert f"warning: the threshold comes from only {held_out} image(s)" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")

    plain = tmp_path / "plain"
    code, _, _ = run(
        ["predict", model, category / "test" / "good", "--out", plain, "--no-report",
         "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 0 and not (plain / "report.html").exists()


def test_threshold_origin_counts_its_images_and_warns_below_ten(model: Path) -> None:
    detector = Detector.load(model)
    held_out = detector.info["held_out_images"]
    assert detector.threshold_images() == held_out == detector.info["threshold_images"]
    assert f"only {held_out} image(s)" in (detector.threshold_warning() or "")
    detector.info = {**detector.info, "threshold_images": 12}
    assert detector.threshold_warning() is None and "of 12 held-out" in str(
        detector.threshold_origin()
    )
    older = {k: v for k, v in detector.info.items() if k != "threshold_images"}
    detector.info = older  # saved before the count was recorded: from the split sizes
    assert detector.threshold_images() == held_out
    detector.threshold = None
    assert detector.threshold_origin() is None and detector.threshold_warning() is None


# -- names ------------------------------------------------------------------------------------

HOSTILE = [
    "..%2f...png",
    "../escape.png",  # inside the folder "..": a stem of its own
    " spaced  name .png",
    "日本語 ümlaut.png",
    ".hidden.png",
    "-rf.png",
    "con.png",
    "new\nline.png",
    "frag#?&.png",
    "x" * 200 + ".png",
    "a/000.png",
    "b/000.png",
    "c/A.png",
    "d/a.png",
]


def test_hostile_file_names_never_write_outside_out(
    model: Path, category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = category / "test" / "good" / "000.png"
    src = tmp_path / "src" / "inner"
    paths = []
    for name in HOSTILE:
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, path)
        paths.append(path)
    out = tmp_path / "out"
    before = {p for p in tmp_path.rglob("*")}
    code, _, err = run(["predict", model, *paths, "--out", out, "--no-progress"], capsys)
    assert code == 0, err

    written = {p for p in tmp_path.rglob("*")} - before
    assert written - {out} == set(out.iterdir())  # nothing anywhere but directly in out
    for path in out.iterdir():
        assert path.is_file() and not path.is_symlink()
        assert path.resolve().parent == out.resolve()
        assert not path.name.startswith((".", "-")) and ".." not in path.name
        assert len(path.name.encode()) < 120 and "\n" not in path.name
    rows = read_csv(out / "scores.csv")
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in paths)
    maps = [r["map"] for r in rows]
    assert len({m.casefold() for m in maps}) == len(paths)  # unique, also on macOS disks
    assert all((out / m).is_file() for m in maps)
    report_links(out)

    # the same inputs get the same names (what --resume relies on)
    assert predict.output_names(paths) == [m.removesuffix("_map.tiff") for m in maps]


def test_output_replacing_an_input_is_refused(
    model: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(inputs / "wide.png", folder / "wide.png")
    Image.open(inputs / "wide.png").save(folder / "wide_overlay.png")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for flag in ("--overwrite", "--resume"):
        code, _, err = run(["predict", model, folder, "--out", folder, flag], capsys)
        assert code == 1 and "replace this input" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=300))
def test_safe_stem_is_always_a_plain_visible_name(text: str) -> None:
    stem = predict.safe_stem(text)
    assert stem and len(stem) <= predict.MAX_NAME_CHARS
    assert not any(c in stem for c in "/\\\x00\n\r:") and ".." not in stem
    assert not stem.startswith((".", "-")) and not stem.endswith((".", " "))
    assert os.path.basename(stem) == stem
