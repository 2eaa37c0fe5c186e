"""``augment="auto"``: texture augmentation decided from the good images alone (on for
stationary textures, off for registered objects), recorded, and saved resolved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG

from pyramidflow import Config, Detector, PyramidFlow
from pyramidflow.cli.common import config_from_args
from pyramidflow.cli.train import add_command
from pyramidflow.synthetic import generate_category, render_normal
from pyramidflow.training.loop import resolve_augment, stationarity_ratio, train


def good_images(category: str, n: int, size: int = 32) -> torch.Tensor:
    rng = np.random.default_rng(0)
    images = np.stack([render_normal(category, rng, size) for _ in range(n)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("n", [4, 8, 40])
def test_auto_augments_the_demo_textures_and_not_the_object(n):
    auto = Config(augment="auto")
    for category in ("weave", "grain", "tile"):
        config, ratio = resolve_augment(auto, good_images(category, n))
        assert config.augment is True and ratio is not None, (category, ratio)
    config, ratio = resolve_augment(auto, good_images("disc", n))
    assert config.augment is False and ratio > 2, ratio
    # an explicit choice is kept as it is
    assert resolve_augment(Config(augment=False), good_images("weave", n)) == (
        Config(augment=False),
        None,
    )


def test_stationarity_ratio_is_that_of_the_mean_image_against_each_positions_spread():
    images = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    gray = images.mean(1).numpy()
    expected = gray.mean(0).var() / gray.var(0).mean()
    assert stationarity_ratio(images) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="two good images"):
        stationarity_ratio(images[:1])


def test_train_with_auto_on_an_object_equals_no_augmentation():
    """The training loop resolves "auto" itself: it never augments a registered object
    just because "auto" is a non-empty string."""
    images = good_images("disc", 6)
    config = Config(image_size=32, levels=2, stacks=1, channels=4, kernel_size=3, epochs=1,
                    batch_size=2)  # fmt: skip
    weights = []
    for augment in ("auto", False):
        torch.manual_seed(0)
        model = PyramidFlow(config)
        train(model, images, config.replace(augment=augment))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_fit_records_the_decision_and_saves_it_resolved(tmp_path):
    weave = generate_category(tmp_path, "weave", size=32, n_train=8, n_test_good=1,
                              n_test_defect_per_type=1)  # fmt: skip
    detector = Detector(TINY_CONFIG.replace(augment="auto")).fit(weave)
    assert detector.config.augment is True
    assert detector.info["augment_auto"]["augment"] is True
    assert detector.info["augment_auto"]["stationarity_ratio"] < 0.5
    loaded = Detector.load(detector.save(tmp_path / "weave.safetensors"))
    assert loaded.config.augment is True and loaded.model.config.augment is True


def test_augment_flag_and_config_values():
    import argparse

    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    for flags, expected in ((["--augment", "auto"], "auto"), (["--augment"], True),
                            (["--no-augment"], False), ([], False)):  # fmt: skip
        args = parser.parse_args(["train", "data", "--out", "m.safetensors", *flags])
        assert config_from_args(args).augment == expected, flags
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "data", "--out", "m", "--augment", "sometimes"])
    with pytest.raises(ValueError, match="augment must be true, false or 'auto'"):
        Config(augment="yes")
