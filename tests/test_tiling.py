"""Row-band tiling of the coupling blocks (pyramidflow.model.tiling) against whole images.

Tiled blocks must give the untiled latents, VN running means and gradients (inputs and
every parameter) within rounding, with odd level sizes and bands that do not divide the
height; the parameter network on a band must equal the whole-image one there; the latents
a caller holds must survive the tiled backward (it only updates its own buffers in
place); tiling must be on where it saves memory and off where it does not.
"""

from __future__ import annotations

import copy

import pyramidflow_kernels as ops
import pytest
import torch
from pyramidflow_kernels.testing import relative_error
from test_invertible import make_model, objective, step_gradients

from pyramidflow import Config, PyramidFlow
from pyramidflow.model import tiling

FLOAT64_TOL = 1e-12
FLOAT32_TOL = 1e-5
HEIGHT, WIDTH = 40, 56  # L = 4: level sizes 40x56 .. 5x7, all band cuts uneven


@pytest.fixture
def band_rows(monkeypatch):
    """Bands of a fixed number of target rows at a 1 MiB budget (test shapes are tiny)."""

    def set_rows(rows: int) -> None:
        monkeypatch.setattr(tiling, "MIN_BAND_ROWS", 1)
        per_row = (1 << 20) // rows
        monkeypatch.setattr(tiling, "band_transient_bytes", lambda block, levels, n: n * per_row)

    return set_rows


def rect_model(volume_norm: str = "CVN", dtype=torch.float64, stacks: int = 2, **kwargs):
    model = make_model(4, stacks, volume_norm, size=HEIGHT, dtype=dtype, **kwargs)
    config = model.config.replace(image_size=(HEIGHT, WIDTH))
    rect = PyramidFlow(config, **kwargs).to(dtype).train()
    rect.load_state_dict({k: v for k, v in model.state_dict().items() if "running_mean" not in k},
                         strict=False)  # fmt: skip
    return rect


def rect_levels(model: PyramidFlow, batch: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    dtype = next(model.parameters()).dtype
    return [
        torch.randn(batch, model.config.channels, HEIGHT >> i, WIDTH >> i, generator=gen,
                    dtype=dtype).requires_grad_(True)
        for i in range(model.config.levels)
    ]  # fmt: skip


def tiled_and_whole(model: PyramidFlow) -> tuple[PyramidFlow, PyramidFlow]:
    whole, tiled = copy.deepcopy(model), copy.deepcopy(model)
    whole.set_memory_budget(0)
    tiled.set_memory_budget(1)
    return whole, tiled


@pytest.mark.parametrize(
    "rows, strided_down", [(3, True), (7, False)], ids=["3rows-strided", "7rows-unstrided"]
)
def test_tiled_recompute_gradients_equal_whole_image(band_rows, rows, strided_down):
    band_rows(rows)
    model = rect_model(strided_down=strided_down)
    levels_in = rect_levels(model)
    whole, tiled = tiled_and_whole(model)
    assert tiled.tiling_summary()["tiled_blocks"], "nothing was tiled"
    z_whole, g_whole = step_gradients(whole, levels_in, "recompute")
    z_tiled, g_tiled = step_gradients(tiled, levels_in, "recompute")
    assert max(relative_error(a, b) for a, b in zip(z_tiled, z_whole, strict=True)) < FLOAT64_TOL
    errors = [relative_error(a, b) for a, b in zip(g_tiled, g_whole, strict=True)]
    assert max(errors) < FLOAT64_TOL, f"worst gradient relative error {max(errors):.2e}"
    for ours, theirs in zip(tiled.blocks, whole.blocks, strict=True):
        assert theirs.running_mean.abs().max() > 0
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-12, atol=0)


def test_tiled_float32_gradients_match_float64(band_rows):
    band_rows(5)
    model = rect_model(dtype=torch.float64)
    _, tiled64 = tiled_and_whole(model)
    tiled32 = copy.deepcopy(tiled64).float()
    levels64 = rect_levels(model)
    levels32 = [t.detach().float() for t in levels64]
    _, g64 = step_gradients(tiled64, levels64, "recompute")
    _, g32 = step_gradients(tiled32, levels32, "recompute")
    assert relative_error(list(g32), list(g64)) < FLOAT32_TOL


def test_parameter_network_on_a_band_equals_the_whole_image_rows():
    # bit for bit: the band sums the same products (zeros where the image ends)
    model = rect_model(dtype=torch.float32)
    levels = [t.detach() for t in rect_levels(model)]
    sizes = [tuple(t.shape[-2:]) for t in levels]

    def fetch(index: int, a: int, b: int) -> torch.Tensor:
        return levels[index][..., a:b, :]

    for block in model.blocks[:4]:
        whole = block.parameters_for(levels)
        height = whole.shape[-2]
        for h0, h1 in ((0, 2), (1, height - 1), (height - 2, height), (0, height)):
            band = block.parameters_for_rows(fetch, sizes, h0, h1)
            assert torch.equal(band, whole[..., h0:h1, :]), (block, h0, h1)


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_tiled_inference_equals_whole_image(band_rows, volume_norm):
    band_rows(4)
    model = rect_model(volume_norm, stacks=1).eval()
    for block in model.blocks:
        block.running_mean.normal_(0.0, 0.1)
    levels_in = [t.detach() for t in rect_levels(model)]
    whole, tiled = tiled_and_whole(model)
    assert tiled.tiling_summary()["tiled_blocks"]
    with torch.no_grad():
        z_whole, z_tiled = whole.flow(levels_in), tiled.flow(levels_in)
    assert max(relative_error(a, b) for a, b in zip(z_tiled, z_whole, strict=True)) < FLOAT64_TOL
    assert all(torch.equal(a, b) for a, b in zip(levels_in, rect_levels(model), strict=True))


def test_svn_training_runs_whole_and_matches(band_rows):
    band_rows(4)
    model = rect_model("SVN", stacks=1)
    whole, tiled = tiled_and_whole(model)
    assert tiled.tiling_summary()["tiled_blocks"] == {}  # its batch mean spans whole images
    levels_in = rect_levels(model)
    _, g_whole = step_gradients(whole, levels_in, "recompute")
    _, g_tiled = step_gradients(tiled, levels_in, "recompute")
    assert max(relative_error(a, b) for a, b in zip(g_tiled, g_whole, strict=True)) == 0


def test_latents_held_by_the_caller_survive_a_tiled_backward_and_retained_graph(band_rows):
    band_rows(3)
    _, tiled = tiled_and_whole(rect_model())
    levels_in = rect_levels(tiled)
    params = [p for p in tiled.parameters() if p.requires_grad]
    latents = tiled.flow(levels_in, memory="recompute")
    kept = [z.detach().clone() for z in latents]
    loss = objective(latents) + latents[0].sum()  # two gradient paths into one latent
    first = torch.autograd.grad(loss, params + levels_in, retain_graph=True)
    assert all(torch.equal(z, k) for z, k in zip(latents, kept, strict=True))
    second = torch.autograd.grad(loss, params + levels_in)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_walk_overwrites_the_latents_only_when_nothing_else_holds_them(band_rows, monkeypatch):
    band_rows(3)
    model = rect_model(stacks=1)
    whole, tiled = tiled_and_whole(model)
    levels_in = rect_levels(model)
    params = [p for p in tiled.parameters() if p.requires_grad]
    allocations = []
    like_band = tiling._like_band
    monkeypatch.setattr(tiling, "_like_band", lambda *a: allocations.append(1) or like_band(*a))
    with torch.no_grad():
        tiled.flow(levels_in)
    forward_allocations = len(allocations)

    def step(hold: bool) -> tuple[list[torch.Tensor], int]:
        allocations.clear()
        latents = tiled.flow(levels_in, memory="recompute")
        kept = [z.clone() for z in latents] if hold else None
        loss = objective(latents)
        if not hold:
            del latents
        grads = list(torch.autograd.grad(loss, levels_in + params))
        if hold:
            assert all(torch.equal(z, k) for z, k in zip(latents, kept, strict=True))
        return grads, len(allocations) - forward_allocations

    _, g_whole = step_gradients(whole, levels_in, "recompute")
    g_free, backward_free = step(hold=False)
    g_held, backward_held = step(hold=True)
    assert backward_free == 0  # every band's input and gradient went into the handed-over ones
    assert backward_held > 0
    for grads in (g_free, g_held):
        errors = [relative_error(a, b) for a, b in zip(grads, g_whole, strict=True)]
        assert max(errors) < FLOAT64_TOL, f"worst gradient relative error {max(errors):.2e}"


def test_tiling_is_on_where_it_saves_memory_and_off_where_it_does_not():
    paper = PyramidFlow(Config()).train()  # 256 px
    assert paper.tiling_summary()["budget_mb"] > 0
    assert paper.tiling_summary()["tiled_blocks"] == {}
    large = PyramidFlow(Config(image_size=(2048, 2048), stacks=1)).train()
    plan = large.tiling_summary()["tiled_blocks"]
    assert any(name.endswith("up(0)") for name in plan) and max(plan.values()) > 1
    large.set_memory_budget(0)
    assert large.tiling_summary()["tiled_blocks"] == {}


def test_band_plan_covers_the_rows_once_in_order():
    model = PyramidFlow(Config(image_size=(1000, 1000), levels=4, stacks=1)).train()
    levels = [torch.empty(()).expand(2, 16, s, s) for s in (1000, 500, 250, 125)]
    for budget in (8, 64):
        for block in model.blocks:
            bands = tiling.row_bands(block, levels, budget)
            if bands is None:
                continue
            height = levels[block.target].shape[-2]
            assert bands[0][0] == 0 and bands[-1][1] == height
            assert all(a[1] == b[0] for a, b in zip(bands, bands[1:], strict=False))
            assert all(t1 - t0 >= min(tiling.MIN_BAND_ROWS, height) for t0, t1 in bands[:-1])


@pytest.mark.parametrize("bad", [-1, 1.5, "64", True])
def test_memory_budget_must_be_a_whole_number_of_mib(bad):
    with pytest.raises(ValueError, match="memory_budget"):
        Config(memory_budget=bad)


def test_memory_budget_round_trips_through_json():
    config = Config(memory_budget=96)
    assert Config.from_json(config.to_json()).memory_budget == 96
    assert Config.from_json(Config().to_json()).memory_budget is None
    assert PyramidFlow(config).tiling_summary()["budget_mb"] == 96


def test_loss_of_tiled_model_backpropagates_to_every_parameter(band_rows):
    band_rows(6)
    _, tiled = tiled_and_whole(rect_model(dtype=torch.float32, stacks=1))
    images = torch.randn(2, tiled.config.in_channels, HEIGHT, WIDTH)
    tiled.loss(tiled(images)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in tiled.parameters() if p.requires_grad)  # fmt: skip


# The other full-resolution transients of a step: the loss's backward and the decomposition.


def loss_levels(batch: int, dtype=torch.float64, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 3, HEIGHT >> i, WIDTH >> i, generator=gen, dtype=dtype)
        .requires_grad_(True)
        for i in range(3)
    ]  # fmt: skip


@pytest.mark.parametrize("batch", [2, 3], ids=["one-partner", "two-partners"])
def test_lean_loss_gradient_equals_the_autograd_formula(batch):
    from pyramidflow_kernels import loss_map_reference as reference

    latents = loss_levels(batch)
    lean = reference.fourier_loss(latents)
    assert lean.grad_fn is not None and "Lean" in type(lean.grad_fn).__name__
    plain = reference.spectrum_abs_mean(reference.pair_difference_map(latents))
    assert relative_error(lean, plain) < FLOAT64_TOL
    lean_grads = torch.autograd.grad(lean, latents)
    plain_grads = torch.autograd.grad(plain, latents)
    assert relative_error(list(lean_grads), list(plain_grads)) < FLOAT64_TOL
    latents32 = [z.detach().float().requires_grad_(True) for z in latents]
    grads32 = torch.autograd.grad(reference.fourier_loss(latents32), latents32)
    assert relative_error(list(grads32), list(plain_grads)) < FLOAT32_TOL


def test_lean_loss_gives_a_gradient_only_where_one_is_needed():
    from pyramidflow_kernels import loss_map_reference as reference

    latents = loss_levels(2)
    frozen = [latents[0].detach(), *latents[1:]]
    reference.fourier_loss(frozen).backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in latents[1:])
    assert latents[0].grad is None


def test_decomposition_in_channel_chunks_equals_the_whole(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    features = torch.randn(2, 5, HEIGHT, WIDTH, generator=gen, dtype=torch.float64)
    expected = ops.pyramid_decompose(features, 4, backend="torch")
    bands = tiling.decompose_in_place(features.clone(), 4, 2, "torch")  # 2 does not divide 5
    assert [b.shape for b in bands] == [e.shape for e in expected]
    assert max(relative_error(a, b) for a, b in zip(bands, expected, strict=True)) < FLOAT64_TOL
    # through the model: chunked when the budget asks for it, the same bands
    model = rect_model(dtype=torch.float64, stacks=1)
    images = torch.randn(2, model.config.in_channels, HEIGHT, WIDTH, generator=gen,
                         dtype=torch.float64)  # fmt: skip
    whole = model.pyramid(images)
    planes = (1 << 20) // (3 * 2 * HEIGHT * WIDTH * 8)  # 3 channels of 4 per MiB
    monkeypatch.setattr(tiling, "DECOMPOSE_PLANES_PER_CHANNEL", planes)
    model.set_memory_budget(1)
    assert tiling.decompose_channel_chunk(model.inconv(images), 1) == 3
    chunked = model.pyramid(images)
    assert max(relative_error(a, b) for a, b in zip(chunked, whole, strict=True)) < FLOAT64_TOL


def test_decomposition_is_chunked_only_where_it_saves_memory():
    small = torch.empty(()).expand(2, 16, 256, 256)
    large = torch.empty(()).expand(2, 16, 2048, 2048)
    assert tiling.decompose_channel_chunk(small, 256) is None
    assert 1 <= tiling.decompose_channel_chunk(large, 256) < 16
    assert tiling.decompose_channel_chunk(large, 0) is None
