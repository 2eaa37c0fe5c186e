"""PyramidFlow inside anomalib: anomalib's Engine fits, tests and predicts it on a Folder
datamodule; its metrics agree with this package's on the same maps and masks; the template
is the library's; checkpoints round-trip through Lightning.

Needs the ``anomalib`` extra (CI installs it: .ci/run)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("anomalib", reason="needs the extra: pip install 'pyramidflow[anomalib]'")

from anomalib.data import Folder  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Max  # noqa: E402
from pyramidflow_kernels.testing import relative_error  # noqa: E402
from test_readme import section_code  # noqa: E402

from pyramidflow import metrics  # noqa: E402
from pyramidflow.integrations.anomalib import NoTemplateError, Pyramidflow  # noqa: E402
from pyramidflow.synthetic import generate_demo_dataset  # noqa: E402
from pyramidflow.training.template import (  # noqa: E402
    compute_level_scale,
    compute_template_and_spread,
)

SIZE = 32
DEFECTS = ("crack", "hole", "scratch", "stain")
SMALL = {"levels": 2, "stacks": 1, "channels": 8, "image_size": SIZE}
# anomalib's metrics run in float32; this package's are exact
METRIC_TOL = 1e-5


def anomalib_metrics() -> Evaluator:
    """The test metrics as anomalib users configure them (image and pixel level)."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
        ]
    )


def folder_datamodule(root: Path) -> Folder:
    """anomalib's Folder datamodule over an MVTec-style category written by the test."""
    generate_demo_dataset(
        root, categories=["grain"], size=SIZE, n_train=8, n_test_good=8, n_test_defect_per_type=2
    )
    category = root / "grain"
    return Folder(
        name="grain",
        root=category,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir=[f"test/{d}" for d in DEFECTS],
        mask_dir=[f"ground_truth/{d}" for d in DEFECTS],
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )


def make_engine(root: Path, **kwargs: Any) -> Engine:
    return Engine(
        default_root_dir=root, logger=False, accelerator="cpu", enable_progress_bar=False, **kwargs
    )


def stacked(batches: list[Any], field: str) -> torch.Tensor:
    return torch.cat([getattr(b, field).detach().cpu() for b in batches])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One model with the default scoring recipe (``fused_peak``: template, spread and level
    scale) fitted for a few steps by anomalib's Engine, then tested and predicted on the
    datamodule's test split."""
    warnings.filterwarnings("ignore", module="lightning|anomalib|torchmetrics")
    root = tmp_path_factory.mktemp("anomalib")
    datamodule = folder_datamodule(root / "data")
    model = Pyramidflow(**SMALL, evaluator=anomalib_metrics())
    engine = make_engine(root / "results", max_epochs=3)
    engine.fit(model, datamodule=datamodule)
    (tested,) = engine.test(model, datamodule=datamodule)
    predicted = engine.predict(model, datamodule=datamodule)
    return {
        "root": root,
        "datamodule": datamodule,
        "model": model,
        "engine": engine,
        "tested": tested,
        "predicted": predicted,
    }


def test_engine_fits_tests_and_predicts_in_anomalibs_batch_format(fitted: dict) -> None:
    predicted = fitted["predicted"]
    n_test = len(fitted["datamodule"].test_data)
    maps, scores = stacked(predicted, "anomaly_map"), stacked(predicted, "pred_score")
    assert maps.shape == (n_test, SIZE, SIZE) and scores.shape == (n_test,)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    # anomalib's post-processor thresholds them into labels and masks
    assert stacked(predicted, "pred_label").dtype == torch.bool
    assert stacked(predicted, "pred_mask").shape == maps.shape
    assert fitted["model"].config.scoring == "fused_peak"
    assert fitted["model"].model.template_ready
    # anomalib's visualizer drew every test image (image, mask, map, predicted mask)
    drawn = list((fitted["root"] / "results").rglob("images/test/*/*.png"))
    assert len(drawn) == n_test


def test_anomalib_metrics_equal_this_packages_on_the_same_maps(fitted: dict) -> None:
    predicted, tested = fitted["predicted"], fitted["tested"]
    maps, scores = stacked(predicted, "anomaly_map"), stacked(predicted, "pred_score")
    masks, labels = stacked(predicted, "gt_mask"), stacked(predicted, "gt_label")
    assert masks.any() and not masks.all() and labels.any() and not labels.all()
    ours = {
        "image_AUROC": metrics.image_auroc(scores, labels),
        "pixel_AUROC": metrics.pixel_auroc(maps, masks),
        "pixel_AUPRO": metrics.aupro(maps, masks),
        "image_F1Max": metrics.f1_max(scores, labels)[0],
    }
    for name, value in ours.items():
        assert tested[name] == pytest.approx(value, abs=METRIC_TOL), name


def test_template_is_the_librarys_at_the_end_of_fitting(fitted: dict) -> None:
    model: Pyramidflow = fitted["model"]
    dataset = fitted["datamodule"].train_data
    images = torch.stack([dataset[i].image for i in range(len(dataset))])
    normalized = model.pre_processor.transform(images).double()
    # the float64 reference of the same computation
    flow64 = copy.deepcopy(model.model.flow).double()
    template, spread = compute_template_and_spread(
        flow64, normalized, recipe=model.config.scoring, batch_size=3
    )
    for ours, reference in zip(model.model.template(), template, strict=True):
        assert relative_error(ours, reference) < 1e-5
    for ours, reference in zip(model.model.spread() or [], spread, strict=True):
        assert relative_error(ours, reference) < 1e-5
    level_scale = compute_level_scale(
        flow64, normalized, template, spread, batch_size=3, recipe="fused_peak"
    )
    assert relative_error(model.model.level_scale, level_scale) < 1e-5


def test_checkpoint_round_trips_through_lightning(fitted: dict) -> None:
    engine, root = fitted["engine"], fitted["root"]
    path = engine.best_model_path
    assert path and Path(path).is_file()
    loaded = Pyramidflow.load_from_checkpoint(path, evaluator=anomalib_metrics(), visualizer=False)
    assert loaded.config == fitted["model"].config
    again = make_engine(root / "reloaded").predict(loaded, datamodule=fitted["datamodule"])
    for field in ("anomaly_map", "pred_score", "pred_mask"):
        assert torch.equal(stacked(again, field), stacked(fitted["predicted"], field)), field


def test_unfitted_model_says_to_fit_first(fitted: dict, tmp_path: Path) -> None:
    model = Pyramidflow(**SMALL, visualizer=False)
    with pytest.raises(NoTemplateError, match="Engine.fit"):
        make_engine(tmp_path).predict(model, datamodule=fitted["datamodule"])


@pytest.mark.parametrize(
    ("argument", "value"), [("volume_norm", "BN"), ("image_size", 33), ("scoring", "max")]
)
def test_bad_constructor_argument_is_named(argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=argument):
        Pyramidflow(**{**SMALL, argument: value})


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "Use from anomalib" block, on a small generated MVTec-style category."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = section_code(text, "## Use from anomalib")
    generate_demo_dataset(
        tmp_path / "data", categories=["grain"], size=SIZE, n_train=4, n_test_good=2,
        n_test_defect_per_type=1,
    )  # fmt: skip
    faster = {
        'root="datasets/MVTecAD", category="carpet"': (
            f'root="{tmp_path / "data"}", category="grain", num_workers=0'
        ),
        "levels=8": "levels=2, stacks=1, channels=8, image_size=32",
        "max_epochs=15": "max_epochs=1, logger=False, enable_progress_bar=False",
    }
    for old, new in faster.items():
        assert old in code, f"README example no longer contains {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    model = namespace["model"]
    assert isinstance(model, Pyramidflow) and model.model.template_ready
    assert model.config.scoring == "znorm" and model.config.volume_norm == "SVN"
