"""The ``znorm`` and ``relative`` scoring recipes (docs/method.md section 8): the good images'
spread of every latent element, the normalized and smoothed map, their checkpoint and export
round trips; ``paper`` scoring stays the paper's map."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, TINY_FLAGS
from pyramidflow_kernels.testing import relative_error
from scipy import ndimage

from pyramidflow import CheckpointError, Config, Detector, PyramidFlow, save_checkpoint
from pyramidflow.cli import main
from pyramidflow.io.checkpoint import SPREAD_PREFIX, load_checkpoint
from pyramidflow.model.scoring import (
    gaussian_blur,
    score_latents,
    smoothing_sigma,
    standardize_per_image,
)
from pyramidflow.preprocess import load_stack
from pyramidflow.training.template import (
    SPREAD_FLOOR,
    compute_template,
    compute_template_and_spread,
)


@pytest.fixture(scope="module", params=["znorm", "relative"])
def znorm(request, tiny_category: Path) -> Detector:
    """A detector trained with a recipe that uses the spread."""
    return Detector(TINY_CONFIG.replace(scoring=request.param)).fit(tiny_category)


def test_gaussian_blur_equals_scipy_with_mirrored_borders():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 23, 31))
    for sigma in (0.7, 2.0, 4.0):
        ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
        expected = np.stack([ndimage.gaussian_filter(m, sigma, mode="mirror", truncate=3.0)
                             for m in maps])  # fmt: skip
        # scipy's radius is int(3 sigma + 0.5): the same as round(3 sigma) here
        assert np.abs(ours - expected).max() < 1e-12, sigma
    flat = torch.full((1, 5, 7), 3.0, dtype=torch.float64)
    assert torch.allclose(gaussian_blur(flat, 4.0), flat)  # radius clamped to the map
    assert smoothing_sigma(256) == 4.0 and smoothing_sigma(64) == 1.0


def test_template_and_spread_match_the_plain_statistics():
    torch.manual_seed(0)
    config = Config(image_size=16, levels=3, stacks=1, channels=4, kernel_size=3)
    model = PyramidFlow(config)
    for block in model.blocks:
        torch.nn.init.normal_(block.param_net[2].weight, std=0.1)
    images = torch.randn(7, 3, 16, 16)
    template, spread = compute_template_and_spread(model, images, batch_size=3)
    plain = compute_template(model, images, batch_size=2)
    for a, b in zip(template, plain, strict=True):
        assert torch.equal(a, b)  # the same float64 sums: bit for bit
    with torch.no_grad():
        latents = model.eval()(images)
    for s, z in zip(spread, latents, strict=True):
        variance = z.double().var(0, unbiased=False)
        expected = (variance + SPREAD_FLOOR * variance.mean()).sqrt()
        assert relative_error(s, expected) < 1e-6


def test_relative_template_and_spread_are_those_of_standardized_latents():
    torch.manual_seed(0)
    config = Config(image_size=16, levels=3, stacks=1, channels=4, kernel_size=3)
    model = PyramidFlow(config).double()
    for block in model.blocks:
        torch.nn.init.normal_(block.param_net[2].weight, std=0.1)
    images = torch.randn(7, 3, 16, 16, dtype=torch.float64)
    template, spread = compute_template_and_spread(model, images, recipe="relative")
    with torch.no_grad():
        latents = model.eval()(images)
    for t, s, z in zip(template, spread, latents, strict=True):
        centred = z - z.mean(dim=(2, 3), keepdim=True)
        standardized = centred / centred.square().mean(dim=(2, 3), keepdim=True).sqrt()
        variance = standardized.var(0, unbiased=False)
        assert relative_error(t, standardized.mean(0)) < 1e-12
        assert relative_error(s, (variance + SPREAD_FLOOR * variance.mean()).sqrt()) < 1e-12


def test_relative_scores_ignore_each_images_latent_offset_and_gain():
    """What the recipe is for: a good image brighter, darker or of more contrast than the
    others shifts and scales its latent channels; the relative map does not move."""
    torch.manual_seed(1)
    config = Config(image_size=16, levels=3, stacks=1, channels=4, kernel_size=3)
    model = PyramidFlow(config).double().eval()
    good = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    template, spread = compute_template_and_spread(model, good, recipe="relative")
    with torch.no_grad():
        latents = model(torch.randn(3, 3, 16, 16, dtype=torch.float64))
    gain = [torch.rand(3, 4, 1, 1, dtype=torch.float64) * 3 + 0.2 for _ in latents]
    offset = [torch.randn(3, 4, 1, 1, dtype=torch.float64) * 5 for _ in latents]
    moved = [z * g + o for z, g, o in zip(latents, gain, offset, strict=True)]
    maps, scores = score_latents(model, latents, template, spread, "relative")
    moved_maps, moved_scores = score_latents(model, moved, template, spread, "relative")
    assert relative_error(moved_maps, maps) < 1e-12
    assert relative_error(moved_scores, scores) < 1e-12
    znorm_template, znorm_spread = compute_template_and_spread(model, good)
    plain, _ = score_latents(model, latents, znorm_template, znorm_spread, "znorm")
    plain_moved, _ = score_latents(model, moved, znorm_template, znorm_spread, "znorm")
    assert relative_error(plain_moved, plain) > 0.1  # znorm does move: the test has teeth


def test_spread_recipes_maps_are_the_normalized_composed_and_smoothed_residuals(
    znorm, tiny_category
):
    images = load_stack(sorted((tiny_category / "test" / "good").glob("*.png")), znorm.config)
    maps, scores = znorm.score_batch(images)
    with torch.no_grad():
        latents = znorm.model(images)
    if znorm.config.scoring == "relative":
        latents = standardize_per_image(latents)
    scaled = [z / s for z, s in zip(latents, znorm.spread, strict=True)]
    template = [t / s for t, s in zip(znorm.template, znorm.spread, strict=True)]
    raw, _ = znorm.model.anomaly_map(scaled, template)
    expected = gaussian_blur(raw, smoothing_sigma(znorm.config.image_size[0]))
    if znorm.config.scoring == "relative":
        expected = expected / expected.mean(dim=(1, 2), keepdim=True)
        assert relative_error(maps.mean(dim=(1, 2)), torch.ones(maps.shape[0])) < 1e-6
    assert relative_error(maps, expected) < 1e-6
    assert torch.equal(scores, maps.flatten(1).amax(1))


def test_paper_scoring_is_the_plain_residual_map(tiny_model, tiny_category):
    detector = Detector.load(tiny_model)
    train_images = load_stack(sorted((tiny_category / "train" / "good").glob("*.png")),
                              detector.config)  # fmt: skip
    detector.config = detector.config.replace(scoring="paper")
    detector.template = compute_template(detector.model, train_images)
    detector.spread = None
    images = load_stack(sorted((tiny_category / "test" / "good").glob("*.png")), detector.config)
    maps, scores = detector.score_batch(images)
    with torch.no_grad():
        expected, expected_scores = detector.model.anomaly_map(
            detector.model(images), detector.template
        )
    assert torch.equal(maps, expected) and torch.equal(scores, expected_scores)


def test_znorm_checkpoint_round_trip_and_missing_spread(znorm, tiny_category, tmp_path):
    path = znorm.save(tmp_path / "znorm.safetensors")
    loaded = Detector.load(path)
    for a, b in zip(loaded.spread, znorm.spread, strict=True):
        assert torch.equal(a, b)
    image = next((tiny_category / "test" / "good").glob("*.png"))
    assert znorm.predict(image).score == loaded.predict(image).score
    checkpoint = load_checkpoint(path)
    extras = {k: v for k, v in checkpoint.extra_tensors.items() if not k.startswith(SPREAD_PREFIX)}
    stripped = tmp_path / "stripped.safetensors"
    save_checkpoint(stripped, checkpoint.model, checkpoint.template, checkpoint.info, extras)
    with pytest.raises(CheckpointError, match=f"{stripped.name}.*{SPREAD_PREFIX}0"):
        Detector.load(stripped)
    bad = dict(checkpoint.extra_tensors)
    bad[f"{SPREAD_PREFIX}1"] = -bad[f"{SPREAD_PREFIX}1"]
    broken = tmp_path / "negative.safetensors"
    save_checkpoint(broken, checkpoint.model, checkpoint.template, checkpoint.info, bad)
    with pytest.raises(CheckpointError, match="positive and finite"):
        Detector.load(broken)


def test_znorm_export_reproduces_the_detector(znorm, tiny_category, tmp_path):
    from pyramidflow.io.export import export_checkpoint

    path = znorm.save(tmp_path / "znorm.safetensors")
    program = torch.export.load(export_checkpoint(path, tmp_path / "znorm.pt2", "pt2"))
    images = load_stack(sorted((tiny_category / "test" / "good").glob("*.png")), znorm.config)
    maps, scores = program.module()(images)
    expected_maps, expected_scores = znorm.score_batch(images)
    assert relative_error(maps, expected_maps) < 1e-5
    assert relative_error(scores, expected_scores) < 1e-5


def test_scoring_flag_trains_and_evaluate_names_the_recipe(tiny_category, tmp_path, capsys):
    data = tmp_path / "disc"
    shutil.copytree(tiny_category, data)
    model = tmp_path / "m.safetensors"
    args = ["train", str(data), "--out", str(model), *TINY_FLAGS, "--scoring", "relative"]
    assert main(args) == 0
    assert Detector.load(model).config.scoring == "relative"
    capsys.readouterr()
    assert main(["evaluate", str(model), str(data), "--no-progress"]) == 0
    assert "scoring: relative" in capsys.readouterr().out
