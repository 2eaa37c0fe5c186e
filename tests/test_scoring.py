"""The ``znorm``, ``relative``, ``fused`` and ``fused_peak`` scoring recipes (docs/method.md
section 8): the good images' spread of every latent element, the normalized and smoothed map,
the level-fused image score, their checkpoint and export round trips; ``paper`` scoring stays
the paper's map."""

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
from pyramidflow.io.checkpoint import LEVEL_SCALE_KEY, SPREAD_PREFIX, load_checkpoint
from pyramidflow.metrics import decision_threshold
from pyramidflow.model.scoring import (
    gaussian_blur,
    level_maxima,
    score_latents,
    smoothing_sigma,
    standardize_per_image,
    uses_level_scale,
)
from pyramidflow.preprocess import load_stack
from pyramidflow.training.template import (
    SPREAD_FLOOR,
    compute_level_scale,
    compute_template,
    compute_template_and_spread,
)


@pytest.fixture(scope="module", params=["znorm", "relative", "fused", "fused_peak"])
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
    for recipe in ("fused", "fused_peak"):  # relative's maps, so relative's statistics
        same = compute_template_and_spread(model, images, recipe=recipe)
        assert all(map(torch.equal, [*template, *spread], [*same[0], *same[1]])), recipe
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
    scale = compute_level_scale(model, good, template, spread)
    peak_scale = compute_level_scale(model, good, template, spread, recipe="fused_peak")
    for recipe, level_scale in (("relative", None), ("fused", scale), ("fused_peak", peak_scale)):
        maps, scores = score_latents(model, latents, template, spread, recipe, level_scale)
        moved_maps, moved_scores = score_latents(
            model, moved, template, spread, recipe, level_scale
        )
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
    if znorm.config.scoring != "znorm":
        latents = standardize_per_image(latents)
    scaled = [z / s for z, s in zip(latents, znorm.spread, strict=True)]
    template = [t / s for t, s in zip(znorm.template, znorm.spread, strict=True)]
    raw, _ = znorm.model.anomaly_map(scaled, template)
    expected = gaussian_blur(raw, smoothing_sigma(znorm.config.image_size[0]))
    if znorm.config.scoring != "znorm":
        expected = expected / expected.mean(dim=(1, 2), keepdim=True)
        assert relative_error(maps.mean(dim=(1, 2)), torch.ones(maps.shape[0])) < 1e-6
    assert relative_error(maps, expected) < 1e-6
    if not uses_level_scale(znorm.config.scoring):
        assert torch.equal(scores, maps.flatten(1).amax(1))
        return
    # fused: each level's residual composed alone, made relative, its maximum over the good
    # images' mean maximum of that level, averaged over the levels
    maxima = []
    for level in range(len(scaled)):
        alone = [z if i == level else torch.zeros_like(z) for i, z in enumerate(scaled)]
        alone_t = [t if i == level else torch.zeros_like(t) for i, t in enumerate(template)]
        level_map, _ = znorm.model.anomaly_map(alone, alone_t)
        level_map = gaussian_blur(level_map, smoothing_sigma(znorm.config.image_size[0]))
        maxima.append((level_map / level_map.mean(dim=(1, 2), keepdim=True)).flatten(1).amax(1))
    levels = len(scaled)
    expected_scores = (torch.stack(maxima, 1) / znorm.level_scale[:levels]).mean(1)
    if znorm.config.scoring == "fused_peak":
        # or the unsmoothed relative map's peak over its good-image mean, when larger
        peak = (raw / raw.mean(dim=(1, 2), keepdim=True)).flatten(1).amax(1)
        expected_scores = torch.maximum(expected_scores, peak / znorm.level_scale[levels])
    assert relative_error(scores, expected_scores) < 1e-6


def test_fused_scores_of_the_good_images_average_one():
    """The level scale is the good images' mean maximum of every level, so the fused score
    (the mean over levels of maximum / scale) of exactly those images averages 1, and an
    image whose finest level alone is off by a defect-like bump scores above all of them."""
    torch.manual_seed(2)
    config = Config(image_size=32, levels=3, stacks=1, channels=4, kernel_size=3)
    model = PyramidFlow(config).double().eval()
    good = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    template, spread = compute_template_and_spread(model, good, recipe="fused")
    scale = compute_level_scale(model, good, template, spread, batch_size=3)
    with torch.no_grad():
        latents = model(good)
    _, maxima = level_maxima(model, latents, template, spread)
    assert relative_error(scale, maxima.mean(0)) < 1e-12
    _, scores = score_latents(model, latents, template, spread, "fused", scale)
    assert abs(scores.mean().item() - 1.0) < 1e-12
    bumped = [z.clone() for z in latents]
    bumped[0][0, :, 10:13, 10:13] += 40.0
    _, bumped_scores = score_latents(model, bumped, template, spread, "fused", scale)
    assert bumped_scores[0] > scores.max()
    # fused_peak: the peak's scale is the good images' mean unsmoothed peak, so both of its
    # ratios average 1 on them and its score (the larger) is at least the fused score
    peak_scale = compute_level_scale(model, good, template, spread, recipe="fused_peak")
    _, peak_maxima = level_maxima(model, latents, template, spread, "fused_peak")
    assert peak_scale.shape == (config.levels + 1,)
    assert relative_error(peak_scale, peak_maxima.mean(0)) < 1e-12
    assert relative_error(peak_scale[:-1], scale) < 1e-12
    _, peak_scores = score_latents(model, latents, template, spread, "fused_peak", peak_scale)
    assert (peak_scores >= scores).all() and (peak_scores > scores).any()
    _, bumped_peak = score_latents(model, bumped, template, spread, "fused_peak", peak_scale)
    assert bumped_peak[0] > peak_scores.max()


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
    if not uses_level_scale(znorm.config.scoring):
        return
    assert torch.equal(loaded.level_scale, znorm.level_scale)
    extras = {k: v for k, v in checkpoint.extra_tensors.items() if k != LEVEL_SCALE_KEY}
    save_checkpoint(stripped, checkpoint.model, checkpoint.template, checkpoint.info, extras)
    with pytest.raises(CheckpointError, match=f"{stripped.name}.*{LEVEL_SCALE_KEY}"):
        Detector.load(stripped)
    bad = {
        **checkpoint.extra_tensors,
        LEVEL_SCALE_KEY: checkpoint.extra_tensors[LEVEL_SCALE_KEY][1:],
    }
    save_checkpoint(broken, checkpoint.model, checkpoint.template, checkpoint.info, bad)
    with pytest.raises(CheckpointError, match="one per level"):
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
    assert Config().scoring == "fused_peak"


def test_masks_compare_the_map_with_a_threshold_on_the_maps_scale(znorm, tiny_category):
    """The fused score is not on the map's scale, so masks and overlays use the same rule
    over the held-out maps' maxima; for the other recipes that is the image threshold."""
    n = len(list((tiny_category / "train" / "good").glob("*.png")))
    _, held_out = znorm._split(n)
    train = sorted((tiny_category / "train" / "good").glob("*.png"))
    maps, scores = znorm.score_batch(load_stack([train[i] for i in held_out], znorm.config))
    quantile = znorm.config.threshold_quantile
    expected, _ = decision_threshold(maps.flatten(1).amax(1).numpy(), quantile)
    assert znorm.map_threshold() == expected
    assert znorm.threshold == decision_threshold(scores.numpy(), quantile)[0]
    if not uses_level_scale(znorm.config.scoring):
        assert znorm.map_threshold() == znorm.threshold
    image = next((tiny_category / "test").glob("*/*.png"))
    prediction = znorm.predict(image)
    assert np.array_equal(prediction.mask, prediction.anomaly_map >= znorm.map_threshold())
    assert prediction.is_anomalous == (prediction.score >= znorm.threshold)
