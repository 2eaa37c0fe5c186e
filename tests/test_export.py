"""Exported inference graphs reproduce PyTorch: ONNX under onnxruntime, and .pt2 programs.

A user exports a trained detector once and runs it elsewhere; what matters is that the
anomaly map and score are the ones ``Detector`` gives, at any batch size, from the
preprocessing stored in the file's metadata alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pyramidflow_kernels.testing import relative_error

from pyramidflow import CheckpointError, Config, Detector, PyramidFlow, save_checkpoint
from pyramidflow.cli import export as export_command
from pyramidflow.io.export import (
    ExportError,
    export_checkpoint,
    export_onnx,
    export_program,
)
from pyramidflow.synthetic import render_defect, render_normal

SIZE = 32


def random_model(volume_norm: str = "CVN", seed: int = 0) -> tuple[PyramidFlow, list]:
    """An untrained model whose blocks really transform (random parameter networks,
    non-zero running means) and a template of the right shapes."""
    torch.manual_seed(seed)
    config = Config(
        image_size=SIZE, levels=3, stacks=2, channels=8, kernel_size=3, volume_norm=volume_norm,
        scoring="paper",  # the template below is the paper's
    )  # fmt: skip
    model = PyramidFlow(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "param_net" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
        for block in model.blocks:
            block.running_mean.copy_(0.1 * torch.randn(block.running_mean.shape, generator=gen))
    model.eval()
    with torch.no_grad():
        template = [z.mean(0) for z in model(torch.randn(4, 3, SIZE, SIZE, generator=gen))]
    return model, template


def torch_maps(model: PyramidFlow, template: list, images: torch.Tensor):
    with torch.no_grad():
        return model.anomaly_map(model(images), template)


@pytest.fixture(scope="module")
def detector() -> Detector:
    """A tiny detector trained on generated good 'grain' images (a few seconds)."""
    rng = np.random.default_rng(0)
    arrays = [render_normal("grain", rng, SIZE) for _ in range(10)]
    config = Config(image_size=SIZE, levels=3, stacks=1, channels=8, kernel_size=3, epochs=2)
    return Detector(config).fit(arrays)


@pytest.fixture(scope="module")
def onnx_file(detector: Detector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    needs_onnx()
    path = tmp_path_factory.mktemp("onnx") / "grain.safetensors"
    detector.save(path)
    return export_checkpoint(path, path.with_suffix(".onnx"), "onnx")


def needs_onnx() -> None:
    """Skip where the ONNX stack is not installed (exporting needs onnx and onnxscript,
    running needs onnxruntime)."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


def ort_session(path: Path):
    needs_onnx()
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_onnx_matches_pytorch_on_random_inputs_at_any_batch_size(volume_norm, tmp_path):
    needs_onnx()
    model, template = random_model(volume_norm)
    path = export_onnx(model, template, tmp_path / "model.onnx")  # traced with batch 2
    session = ort_session(path)
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.shape[1:] == [3, SIZE, SIZE]
    assert isinstance(inp.shape[0], str)  # a symbolic (dynamic) batch dimension
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "score"]
    for batch in (1, 3):
        images = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        amap, score = session.run(None, {"images": images.numpy()})
        want_map, want_score = torch_maps(model, template, images)
        assert amap.shape == (batch, SIZE, SIZE) and score.shape == (batch,)
        assert amap.dtype == np.float32
        assert relative_error(amap, want_map) < 1e-4
        assert np.allclose(score, want_score.numpy(), rtol=1e-4, atol=0)


def test_onnx_of_a_trained_detector_reproduces_predict_from_its_metadata(detector, onnx_file):
    """Deployment without pyramidflow: preprocess with the stored mean/std, run ORT, get the
    same map and score as Detector.predict on a generated good and defective image."""
    session = ort_session(onnx_file)
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    meta = json.loads(props["pyramidflow"])
    assert meta["image_size"] == [SIZE, SIZE] and meta["threshold"] == detector.threshold
    mean = np.asarray(meta["mean"], np.float32)[:, None, None]
    std = np.asarray(meta["std"], np.float32)[:, None, None]

    rng = np.random.default_rng(7)
    normal = render_normal("grain", rng, SIZE)
    defect, mask = render_defect("grain", "hole", rng, SIZE)
    assert mask.any()
    pixels = np.stack([normal, defect]).astype(np.float32) / 255.0  # (2, H, W, 3) uint8 -> [0,1]
    images = (pixels.transpose(0, 3, 1, 2) - mean) / std
    amap, score = session.run(None, {"images": images.astype(np.float32)})
    for i, expected in enumerate(detector.predict([normal, defect])):
        assert relative_error(amap[i], expected.anomaly_map) < 1e-4
        assert score[i] == pytest.approx(expected.score, rel=1e-4)
        assert bool(score[i] >= meta["threshold"]) == expected.is_anomalous


def test_pt2_program_matches_pytorch_at_any_batch_size(tmp_path):
    model, template = random_model("CVN", seed=3)
    path = export_program(model, template, tmp_path / "model.pt2")
    extra = {"pyramidflow.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    assert json.loads(extra["pyramidflow.json"])["image_size"] == [SIZE, SIZE]
    run = program.module()
    for batch in (1, 3):
        images = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        amap, score = run(images)
        want_map, want_score = torch_maps(model, template, images)
        assert amap.shape == (batch, SIZE, SIZE) and score.shape == (batch,)
        assert relative_error(amap, want_map) < 1e-5
        torch.testing.assert_close(score, want_score, rtol=1e-5, atol=0)


def test_export_leaves_the_model_untouched(tmp_path):
    model, template = random_model("CVN", seed=5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_program(model, template, tmp_path / "model.pt2")
    assert model.training and model.config.backend == "auto"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for n, p in model.named_parameters() if "param_net" in n)


def test_export_checkpoint_refuses_what_it_cannot_export(tmp_path):
    model, _ = random_model()
    no_template = save_checkpoint(tmp_path / "weights.safetensors", model)
    with pytest.raises(CheckpointError, match="no latent template"):
        export_checkpoint(no_template, tmp_path / "x.onnx", "onnx")
    with pytest.raises(ExportError, match="unknown export format"):
        export_checkpoint(no_template, tmp_path / "x.tflite", "tflite")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "missing.safetensors", tmp_path / "x.onnx", "onnx")


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyramidflow")
    export_command.add_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_export_command_writes_a_program_and_refuses_to_overwrite(detector, tmp_path, capsys):
    from pyramidflow.cli.common import UsageError

    model_path = detector.save(tmp_path / "grain.safetensors")
    out = tmp_path / "grain.pt2"
    parser = _export_parser()
    args = parser.parse_args(["export", str(model_path), "--format", "pt2", "--out", str(out)])
    assert args.func(args) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    amap, score = torch.export.load(str(out)).module()(torch.zeros(1, 3, SIZE, SIZE))
    assert amap.shape == (1, SIZE, SIZE)
    with pytest.raises(UsageError, match="--overwrite"):
        args.func(args)
    args = parser.parse_args(
        ["export", str(model_path), "--format", "pt2", "--out", str(out), "--overwrite"]
    )
    assert args.func(args) == 0
    with pytest.raises(SystemExit) as exc:  # argparse: a bad --format is a usage error
        parser.parse_args(["export", str(model_path), "--format", "tflite", "--out", str(out)])
    assert exc.value.code == 2
