"""The README's Python API example runs as written (on a smaller demo dataset, with fewer
epochs and a smaller model size) and does what its comments say."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest

from pyramidflow import Detector, Prediction
from pyramidflow.io.images import read_array
from pyramidflow.synthetic import generate_demo_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
# the example's settings -> quicker ones; each must be in the README's code as written
FASTER = {"image_size=64": "image_size=32", "epochs=8": "epochs=1"}
METRICS = ("pixel_auroc", "image_auroc", "aupro")


def section_code(text: str, heading: str) -> list[str]:
    """The ```python blocks of one "## " section of a Markdown text."""
    match = re.search(rf"^{re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match is not None, f"README has no {heading!r} section"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), re.M | re.S)


def test_section_code_finds_only_that_sections_blocks() -> None:
    text = "## A\n```python\na = 1\n```\n## B\n```python\nb = 2\n```\n```bash\nc\n```\n"
    assert section_code(text, "## A") == ["a = 1\n"]
    assert section_code(text, "## B") == ["b = 2\n"]


def test_python_api_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = section_code(README.read_text(encoding="utf-8"), "## Python API")
    assert blocks, "no python code under '## Python API'"
    code = "\n".join(blocks)
    for old, new in FASTER.items():
        assert old in code, f"README example no longer contains {old!r}"
        code = code.replace(old, new)

    # what `pyramidflow demo` writes to pyramidflow-demo/data, fewer and smaller images
    monkeypatch.chdir(tmp_path)
    root = generate_demo_dataset(
        Path("pyramidflow-demo/data"),
        categories=["grain"],
        size=64,
        n_train=8,
        n_test_good=2,
        n_test_defect_per_type=1,
    )
    image_path = root / "grain/test/crack/000.png"
    image_shape = read_array(image_path).shape[:2]

    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code

    assert Path("grain.safetensors").is_file()
    assert Detector.load("grain.safetensors").config.image_size == (32, 32)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2, lines
    # print(pred.score, pred.anomaly_map.shape): "map at the image's own resolution"
    score, shape = lines[0].split(" ", 1)
    assert np.isfinite(float(score))
    assert ast.literal_eval(shape) == image_shape
    # the last prediction is of the (300, 400, 3) uint8 array, at that array's size
    pred = namespace["pred"]
    assert isinstance(pred, Prediction)
    assert pred.anomaly_map.shape == (300, 400)
    assert np.isfinite(pred.anomaly_map).all()
    # print(det.evaluate(...).metrics): a plain dict of the test split's metrics
    metrics = ast.literal_eval(lines[1])
    for key in METRICS:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
