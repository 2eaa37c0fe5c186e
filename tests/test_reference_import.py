"""Importing the authors' .npz checkpoints: same latents as their model, safe unpickling."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format
from pyramidflow_kernels.testing import relative_error

from pyramidflow import Config, load_checkpoint, load_reference_checkpoint, save_checkpoint
from pyramidflow.io.reference_import import (
    ReferenceImportError,
    convert_reference_state_dict,
    model_from_reference_state_dict,
)
from pyramidflow.model.layers import block_plan

try:
    import authors_model
except ImportError:  # tests/ imported as a package
    from tests import authors_model


def _authors_config(levels: int, vn: str, stacks: int, channels: int, ksize: int) -> dict:
    return {
        "num_layer": levels,
        "vn_dims": (0, 1) if vn == "CVN" else (0, 2, 3),
        "ksize": ksize,
        "channel": channels,
        "num_stack": stacks,
    }


def _write_authors_npz(
    path: Path,
    cfg: dict,
    pixel: dict[str, torch.Tensor],
    pro: dict[str, torch.Tensor] | None = None,
    **overrides: object,
) -> Path:
    """An .npz laid out exactly as the authors' train.py writes it."""
    save_dict = {
        "cls_name": "tile",
        "resnetX": 0,
        "num_layer": cfg["num_layer"],
        "vn_dims": cfg["vn_dims"],
        "ksize": cfg["ksize"],
        "channel": cfg["channel"],
        "num_stack": cfg["num_stack"],
        "batch_size": 2,
    }
    save_dict["state_dict_pixel"] = {k: v.cpu() for k, v in pixel.items()}
    save_dict["state_dict_pro"] = {k: v.cpu() for k, v in (pro or pixel).items()}
    save_dict["pixel_auroc_lst"] = [0, np.float64(0.91), np.float64(0.95)]
    save_dict["image_auroc_lst"] = [0, np.float64(0.8), np.float64(0.85)]
    save_dict["pixel_pro_lst"] = [0, np.float64(0.7), np.float64(0.75)]
    save_dict["losses_lst"] = [0, np.float64(3.5), np.float64(2.9)]
    save_dict.update(overrides)
    np.savez(path, **save_dict)
    return path


def _images(size: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)


CASES = [
    # levels, volume norm, stacks, channels, ksize, image size
    (2, "CVN", 1, 4, 7, 32),
    (2, "SVN", 2, 4, 5, 32),
    (3, "SVN", 2, 4, 5, 32),
    (4, "CVN", 1, 8, 5, 32),
    (4, "CVN", 2, 4, 3, 64),
    (4, "SVN", 1, 4, 7, 64),
    (4, "SVN", 2, 8, 3, 32),
    (8, "CVN", 1, 4, 3, 128),
]


@pytest.mark.parametrize(("levels", "vn", "stacks", "channels", "ksize", "size"), CASES)
def test_imported_model_matches_authors_forward(
    tmp_path: Path, levels: int, vn: str, stacks: int, channels: int, ksize: int, size: int
) -> None:
    cfg = _authors_config(levels, vn, stacks, channels, ksize)
    state = authors_model.make_state_dict(cfg, size, seed=levels * 10 + stacks)
    path = _write_authors_npz(tmp_path / "tile.npz", cfg, state)
    # CVN: the size comes from the per-pixel statistics; SVN has none, so it is given.
    model = load_reference_checkpoint(path, image_size=None if vn == "CVN" else size)

    config = model.config
    assert not model.training
    assert (config.levels, config.stacks, config.channels, config.kernel_size) == (
        levels, stacks, channels, ksize,
    )  # fmt: skip
    assert config.volume_norm == vn
    assert config.image_size == (size, size)
    assert config.category == "tile" and config.augment  # a texture: flips and rot90
    assert len(model.blocks) == len(authors_model.block_order(levels, stacks))

    images = _images(size)
    with torch.no_grad():
        expected = authors_model.latents(state, cfg, images)
        ours32 = model(images.float())
        ours64 = model.double()(images)
    for level, (ref, z32, z64) in enumerate(zip(expected, ours32, ours64, strict=True)):
        assert z64.shape == ref.shape
        assert relative_error(z64, ref) < 1e-12, f"level {level} (float64)"
        assert relative_error(z32, ref) < 1e-5, f"level {level} (float32)"


def test_files_pickled_by_numpy_1_load_safely(tmp_path: Path) -> None:
    """numpy 1.x pickles object arrays with protocol 3 and names its array rebuild
    numpy.core.multiarray._reconstruct; the safe loader reads such files too."""
    cfg = _authors_config(2, "SVN", 1, 4, 3)
    state = authors_model.make_state_dict(cfg, 32)
    path = _write_authors_npz(tmp_path / "m.npz", cfg, state)
    old_style = tmp_path / "numpy1.npz"
    with np.load(path, allow_pickle=True) as npz, zipfile.ZipFile(old_style, "w") as dst:
        for key in npz.files:
            array, buffer = npz[key], io.BytesIO()
            npy_format.write_array_header_1_0(buffer, npy_format.header_data_from_array_1_0(array))
            if array.dtype.hasobject:
                payload = pickle.dumps(array, protocol=3)
                assert b"cnumpy._core.multiarray\n" in payload  # a GLOBAL opcode
                buffer.write(payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
            else:
                buffer.write(array.tobytes())
            dst.writestr(f"{key}.npy", buffer.getvalue())
    model = load_reference_checkpoint(old_style, image_size=32)
    assert torch.equal(model.inconv.weight, state["inconv.weight"])
    assert model.config.volume_norm == "SVN" and model.config.levels == 2


def test_safe_and_trusting_loaders_agree_and_pick_the_requested_state(tmp_path: Path) -> None:
    cfg = _authors_config(4, "CVN", 1, 4, 3)
    pixel = authors_model.make_state_dict(cfg, 32, seed=1)
    pro = authors_model.make_state_dict(cfg, 32, seed=2)
    path = _write_authors_npz(tmp_path / "m.npz", cfg, pixel, pro)

    safe = load_reference_checkpoint(path).state_dict()
    trusting = load_reference_checkpoint(path, allow_pickle=True).state_dict()
    assert safe.keys() == trusting.keys()
    assert all(torch.equal(safe[k], trusting[k]) for k in safe)

    pro_model = load_reference_checkpoint(path, key="state_dict_pro")
    images = _images(32)
    with torch.no_grad():
        z_pro = pro_model.double()(images)
        expected_pro = authors_model.latents(pro, cfg, images)
        expected_pixel = authors_model.latents(pixel, cfg, images)
    assert relative_error(z_pro[0], expected_pro[0]) < 1e-12
    assert relative_error(z_pro[0], expected_pixel[0]) > 1e-3


def test_untrained_running_means_are_broadcast(tmp_path: Path) -> None:
    cfg = _authors_config(3, "CVN", 1, 4, 3)
    state = authors_model.make_state_dict(cfg, 32, seed=5, trained=False)
    path = _write_authors_npz(tmp_path / "fresh.npz", cfg, state)
    # no statistics to read the size from: the authors' 256 px default
    assert load_reference_checkpoint(path).config.image_size == (256, 256)
    model = load_reference_checkpoint(path, image_size=32)
    assert model.blocks[0].running_mean.shape == (1, 1, 16, 16)
    images = _images(32)
    with torch.no_grad():
        ours = model.double()(images)
        expected = authors_model.latents(state, cfg, images)
    assert all(relative_error(a, b) < 1e-12 for a, b in zip(ours, expected, strict=True))


def test_imported_model_survives_our_checkpoint_format(tmp_path: Path) -> None:
    cfg = _authors_config(4, "SVN", 1, 4, 3)
    state = authors_model.make_state_dict(cfg, 32, seed=7)
    model = load_reference_checkpoint(
        _write_authors_npz(tmp_path / "a.npz", cfg, state), image_size=32
    )
    loaded = load_checkpoint(save_checkpoint(tmp_path / "a.safetensors", model)).model
    images = _images(32).float()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(images), loaded(images), strict=True))
    assert loaded.config.extra["reference_import"] == {"file": "a.npz", "key": "state_dict_pixel"}


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious file would carry
        return (os.system, (f"touch {self.marker}",))


def test_safe_loader_refuses_code_in_pickles(tmp_path: Path) -> None:
    cfg = _authors_config(2, "CVN", 1, 4, 3)
    marker = tmp_path / "pwned"
    state = authors_model.make_state_dict(cfg, 32)
    evil = {**state, "inconv.weight": _Exploit(marker)}
    path = _write_authors_npz(tmp_path / "evil.npz", cfg, state, state_dict_pixel=evil)

    with pytest.raises(ValueError) as info:
        load_reference_checkpoint(path)
    message = str(info.value)
    assert "system" in message and str(path) in message and "allow_pickle=True" in message
    assert "\n" not in message
    assert not marker.exists()


def test_safe_loader_does_not_touch_unused_entries(tmp_path: Path) -> None:
    cfg = _authors_config(2, "CVN", 1, 4, 3)
    marker = tmp_path / "pwned"
    state = authors_model.make_state_dict(cfg, 32)
    path = _write_authors_npz(tmp_path / "m.npz", cfg, state, extra_entry=[_Exploit(marker)])
    model = load_reference_checkpoint(path)
    assert model.config.image_size == (32, 32)
    assert not marker.exists()


def test_resnet_front_end_is_refused(tmp_path: Path) -> None:
    cfg = _authors_config(4, "CVN", 1, 4, 3)
    state = authors_model.make_state_dict(cfg, 32)
    path = _write_authors_npz(tmp_path / "r.npz", cfg, state, resnetX=18)
    with pytest.raises(ValueError, match=r"ResNet18.*not supported offline"):
        load_reference_checkpoint(path)


def test_cvn_size_conflict_and_bad_files(tmp_path: Path) -> None:
    cfg = _authors_config(4, "CVN", 1, 4, 3)
    state = authors_model.make_state_dict(cfg, 32)
    path = _write_authors_npz(tmp_path / "m.npz", cfg, state)
    with pytest.raises(ValueError, match=r"trained at 32x32.*64x64"):
        load_reference_checkpoint(path, image_size=64)
    with pytest.raises(ValueError, match="no 'state_dict_best'"):
        load_reference_checkpoint(path, key="state_dict_best")
    with pytest.raises(ValueError, match="no such file"):
        load_reference_checkpoint(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
        load_reference_checkpoint(junk)
    # a mismatch between the stored architecture and the weights names the key
    wrong = _write_authors_npz(tmp_path / "w.npz", {**cfg, "channel": 8}, state)
    with pytest.raises(ValueError, match=r"w.npz: 'inconv.weight' has shape \(4, 3, 1, 1\)"):
        load_reference_checkpoint(wrong)


def _small_state() -> tuple[dict[str, torch.Tensor], Config]:
    cfg = _authors_config(4, "CVN", 1, 4, 3)
    state = authors_model.make_state_dict(cfg, 32)
    return state, Config(levels=4, stacks=1, channels=4, kernel_size=3, image_size=32)


def test_conversion_names_the_offending_key() -> None:
    state, config = _small_state()
    converted = convert_reference_state_dict(state, config)
    assert converted.keys() == model_from_reference_state_dict(state, config).state_dict().keys()

    missing = dict(state)
    del missing["nf.moduleslst.2.conv1x1.w_s"]
    with pytest.raises(ValueError, match=r"'nf.moduleslst.2.conv1x1.w_s'.*missing"):
        convert_reference_state_dict(missing, config)

    extra = {**state, "nf.moduleslst.4.conv1x1.w_s": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"unexpected key 'nf.moduleslst.4.conv1x1.w_s'"):
        convert_reference_state_dict(extra, config)

    foreign = {**state, "inconv.0.weight": torch.zeros(64, 3, 7, 7)}
    with pytest.raises(ValueError, match=r"unexpected key 'inconv.0.weight'"):
        convert_reference_state_dict(foreign, config)

    bad = {**state, "nf.moduleslst.1.affineParams.conv.2.weight": torch.zeros(8, 8, 5, 5)}
    with pytest.raises(ReferenceImportError, match=r"'nf.moduleslst.1.affineParams.conv.2.weight'"):
        convert_reference_state_dict(bad, config)

    bad_mean = {**state, "nf.moduleslst.0.affineParams.norm.running_mean": torch.zeros(1, 1, 8, 8)}
    with pytest.raises(ValueError, match=r"running_mean' has shape \(1, 1, 8, 8\)"):
        convert_reference_state_dict(bad_mean, config)


def test_block_order_and_parameter_counts_match_the_authors() -> None:
    for levels in range(2, 10):
        assert block_plan(levels) == authors_model.block_order(levels, 1)
    assert len(authors_model.block_order(8, 4)) == 32
    assert len(authors_model.block_order(2, 4)) == 8

    cfg = _authors_config(4, "CVN", 4, 16, 7)
    state = authors_model.make_state_dict(cfg, 64)
    conv = sum(v.numel() for k, v in state.items() if ".affineParams.conv." in k)
    lu = sum(v.numel() for k, v in state.items() if k.split(".")[-1] in ("w_l", "w_u", "w_s"))
    assert len(authors_model.block_order(4, 4)) == 16
    assert conv == 1_404_928
    assert conv + lu == 1_413_376

    config = Config(levels=4, stacks=4, channels=16, kernel_size=7, image_size=64)
    model = model_from_reference_state_dict(state, config)
    assert len(model.blocks) == 16
    assert sum(b.param_net[0].weight.numel() + b.param_net[2].weight.numel()
               for b in model.blocks) == 1_404_928  # fmt: skip
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_413_376
