"""Checkpoints: a saved file alone reproduces predictions; writes are atomic; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from pyramidflow import (
    Checkpoint,
    CheckpointError,
    Config,
    PyramidFlow,
    load_checkpoint,
    save_checkpoint,
)
from pyramidflow.io.checkpoint import FORMAT_VERSION


def _trained_like_model(volume_norm: str = "CVN", seed: int = 0) -> PyramidFlow:
    """A small model with non-trivial weights and non-zero VN running means."""
    torch.manual_seed(seed)
    config = Config(
        levels=3, stacks=2, channels=4, kernel_size=3, volume_norm=volume_norm, image_size=32,
        category="demo",
    )  # fmt: skip
    model = PyramidFlow(config)
    with torch.no_grad():
        for block in model.blocks:
            torch.nn.init.normal_(block.param_net[2].weight, std=0.1)
            block.mixing.w_s.add_(0.1 * torch.randn_like(block.mixing.w_s))
        model.train()
        for _ in range(3):
            model(torch.randn(2, 3, 32, 32))
    model.eval()
    assert all(block.running_mean.abs().sum() > 0 for block in model.blocks)
    return model


def _template(model: PyramidFlow) -> list[torch.Tensor]:
    with torch.no_grad():
        return [z.mean(0) for z in model(torch.randn(3, 3, 32, 32))]


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_loaded_checkpoint_reproduces_latents_and_maps_exactly(
    tmp_path: Path, volume_norm: str
) -> None:
    model = _trained_like_model(volume_norm)
    template = _template(model)
    info = {"threshold": 0.123, "preprocessing": {"resize": 32}, "epochs_run": [1, 2]}
    extra = {"val_scores": torch.arange(5.0)}
    path = save_checkpoint(tmp_path / "m.safetensors", model, template, info, extra)
    assert path == tmp_path / "m.safetensors"

    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    assert not ckpt.model.training
    assert ckpt.config.to_dict() == model.config.to_dict()
    assert ckpt.info == info
    assert torch.equal(ckpt.extra_tensors["val_scores"], extra["val_scores"])
    assert all(torch.equal(a, b) for a, b in zip(ckpt.template, template, strict=True))

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(images), ckpt.model(images)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        maps, scores = model.anomaly_map(expected, template)
        maps2, scores2 = ckpt.model.anomaly_map(got, ckpt.template)
    assert torch.equal(maps, maps2) and torch.equal(scores, scores2)


def test_template_is_optional_and_loading_keeps_the_callers_random_state(tmp_path: Path) -> None:
    model = _trained_like_model()
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ckpt = load_checkpoint(path)
    assert torch.equal(torch.rand(3), expected)
    assert ckpt.template is None and ckpt.info == {} and ckpt.extra_tensors == {}


def test_save_overwrites_atomically_and_cleans_up_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _trained_like_model(seed=0), _trained_like_model(seed=1)
    path = save_checkpoint(tmp_path / "m.safetensors", first)
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("pyramidflow.io.atomic.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, second)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]

    monkeypatch.undo()
    plain = tmp_path / "plain.txt"
    plain.write_text("")  # the permissions any new file gets here
    assert path.stat().st_mode == plain.stat().st_mode
    plain.unlink()
    save_checkpoint(path, second)
    assert path.read_bytes() != before
    assert torch.equal(
        load_checkpoint(path).model.blocks[0].running_mean, second.blocks[0].running_mean
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_bad_arguments_to_save(tmp_path: Path) -> None:
    model = _trained_like_model()
    target = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match=r"template level 1 has shape \(4, 8, 8\)"):
        save_checkpoint(
            target, model, [torch.zeros(4, 32, 32), torch.zeros(4, 8, 8), torch.zeros(4, 8, 8)]
        )
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(target, model, info={"when": object()})
    assert not target.exists()


def _write_raw(path: Path, tensors: dict, metadata: dict | None) -> Path:
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _expect_error(path: Path, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        load_checkpoint(path)
    assert isinstance(info.value, CheckpointError)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    model = _trained_like_model()
    good = save_checkpoint(tmp_path / "good.safetensors", model)
    data = good.read_bytes()
    tensors = safetensors.torch.load_file(str(good))
    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()

    _expect_error(tmp_path / "missing.safetensors", "no such checkpoint file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _expect_error(truncated, "not a readable safetensors file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    _expect_error(garbage, "not a readable safetensors file")

    _expect_error(
        _write_raw(tmp_path / "plain.safetensors", {"w": torch.zeros(2)}, None),
        "not a pyramidflow checkpoint",
    )
    _expect_error(
        _write_raw(tmp_path / "other.safetensors", tensors, {**metadata, "format": "pt"}),
        "not a pyramidflow checkpoint",
    )
    newer = {**metadata, "format_version": str(FORMAT_VERSION + 1)}
    _expect_error(_write_raw(tmp_path / "newer.safetensors", tensors, newer), "newer pyramidflow")

    config = json.loads(metadata["config"])
    unknown = {**metadata, "config": json.dumps({**config, "bogus_option": 1})}
    _expect_error(_write_raw(tmp_path / "unknown.safetensors", tensors, unknown), "bogus_option")

    wider = {**metadata, "config": json.dumps({**config, "channels": 8})}
    _expect_error(
        _write_raw(tmp_path / "wider.safetensors", tensors, wider),
        r"weight 'inconv.weight' has shape \(4, 3, 1, 1\)",
    )
    deeper = {**metadata, "config": json.dumps({**config, "stacks": 3})}
    _expect_error(
        _write_raw(tmp_path / "deeper.safetensors", tensors, deeper),
        r"missing 'flow.blocks.6.running_mean' \(\+32\)",
    )
    stray = {**tensors, "model.flow.blocks.9.running_mean": torch.zeros(1)}
    _expect_error(
        _write_raw(tmp_path / "stray.safetensors", stray, metadata),
        "unexpected 'flow.blocks.9.running_mean'",
    )
