"""Model-level properties of PyramidFlow (torch reference path).

The invertible pyramid against a straightforward formula and its exact round trip; every
coupling block kind and the whole flow invertible in train and eval mode; |det W| = 1 for
the LU mixing; volume normalization (zero mean along its dims in training, running means
in eval, one running-mean update per training step); block structure and parameter
counts; the frozen input projection; input validation; any L >= 2, S >= 1 runs.
Gradient equality of the memory-saving flow is tested in ``test_invertible.py``.
"""

from __future__ import annotations

import copy

import pyramidflow_kernels as ops
import pytest
import torch
import torch.nn.functional as F
from pyramidflow_kernels.coupling_reference import soft_clamp
from pyramidflow_kernels.testing import relative_error

from pyramidflow import Config, PyramidFlow
from pyramidflow.model.layers import CouplingBlock, InvertibleConv1x1, block_plan

VN_KINDS = ("CVN", "SVN")
# docs/method.md section 3: CVN averages over batch and channels (one mean per pixel), SVN over
# batch, height and width (one mean per channel)
VN_DIMS = {"CVN": (0, 1), "SVN": (0, 2, 3)}


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Give every parameter-network convolution (including the zero-initialised last one)
    and every LU parameter random values, so that blocks really scale, shift and mix."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            if "param_net" in name:
                param.copy_(std * noise)
            else:  # LU factors: perturb around the orthogonal initialisation
                param.add_(0.3 * noise)


def make_model(
    levels: int = 4,
    stacks: int = 2,
    volume_norm: str = "CVN",
    size: tuple[int, int] = (32, 32),
    channels: int = 8,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    randomized: bool = True,
) -> PyramidFlow:
    torch.manual_seed(seed)
    config = Config(
        levels=levels, stacks=stacks, channels=channels, kernel_size=3,
        volume_norm=volume_norm, image_size=size, backend="torch",
    )  # fmt: skip
    model = PyramidFlow(config)
    if randomized:
        randomize(model, seed + 100)
    return model.to(dtype).train()


def random_levels(
    batch: int, channels: int, size: tuple[int, int], levels: int, seed: int, dtype=torch.float64
) -> list[torch.Tensor]:
    return [
        randn(batch, channels, size[0] >> i, size[1] >> i, seed=seed + i, dtype=dtype)
        for i in range(levels)
    ]


# ---------------------------------------------------------------- pyramid ---------------


def straightforward_decompose(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """docs/method.md section 2 written out: non-separable 5x5 binomial kernel, nearest resize."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype)
    kernel = torch.outer(taps, taps) / 256.0
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, 5, 5)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, weight, padding=2, groups=channels)

    gaussians = [x]
    for _ in range(levels - 1):
        gaussians.append(F.max_pool2d(blur(gaussians[-1]), 2))
    bands = [
        g - blur(F.interpolate(g_next, size=g.shape[-2:], mode="nearest"))
        for g, g_next in zip(gaussians[:-1], gaussians[1:], strict=True)
    ]
    return [*bands, gaussians[-1]]


PYRAMID_CASES = [(2, 3, (12, 20)), (3, 5, (24, 36)), (5, 3, (48, 80)), (5, 1, (16, 32))]


@pytest.mark.parametrize("levels, channels, size", PYRAMID_CASES)
def test_decompose_matches_formula_and_compose_inverts_it(levels, channels, size):
    x = randn(2, channels, *size, seed=levels)
    bands = ops.pyramid_decompose(x, levels, backend="torch")
    assert [tuple(b.shape) for b in bands] == [
        (2, channels, size[0] >> i, size[1] >> i) for i in range(levels)
    ]
    for ours, expected in zip(bands, straightforward_decompose(x, levels), strict=True):
        assert relative_error(ours, expected) < 1e-13
    assert (ops.pyramid_compose(bands, backend="torch") - x).abs().max() < 1e-12 * x.abs().max()


def test_compose_is_linear_and_commutes_with_channel_means():
    shapes = [(2, 5, 24, 40), (2, 5, 12, 20), (2, 5, 6, 10)]
    first = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    second = [randn(*s, seed=10 + i) for i, s in enumerate(shapes)]
    combined = [1.5 * a - 0.25 * b for a, b in zip(first, second, strict=True)]
    compose = ops.pyramid_compose
    lhs = compose(combined, backend="torch")
    rhs = 1.5 * compose(first, backend="torch") - 0.25 * compose(second, backend="torch")
    assert relative_error(lhs, rhs) < 1e-13
    means = compose([b.mean(dim=1, keepdim=True) for b in first], backend="torch")
    assert relative_error(means, compose(first, backend="torch").mean(dim=1, keepdim=True)) < 1e-13


def test_compose_gradient_is_the_adjoint_of_its_matrix():
    """<Compose(d), y> = sum_l <d_l, Compose^T(y)_l> where Compose^T comes from autograd,
    checked against the explicit Jacobian of a tiny compose."""
    shapes = [(1, 1, 8, 4), (1, 1, 4, 2)]
    bands = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    y = randn(1, 1, 8, 4, seed=7)

    def flat_compose(flat: torch.Tensor) -> torch.Tensor:
        fine, coarse = flat[:32].view(shapes[0]), flat[32:].view(shapes[1])
        return ops.pyramid_compose([fine, coarse], backend="torch").flatten()

    flat = torch.cat([b.flatten() for b in bands]).requires_grad_(True)
    jacobian = torch.autograd.functional.jacobian(flat_compose, flat.detach())
    (grad,) = torch.autograd.grad(flat_compose(flat), flat, y.flatten())
    assert relative_error(grad, jacobian.T @ y.flatten()) < 1e-13
    # and the matrix is compose itself (it is linear): J d = Compose(d)
    assert relative_error(jacobian @ flat.detach(), flat_compose(flat.detach())) < 1e-13


# ---------------------------------------------------------------- coupling blocks -------


def make_block(
    kind: str, volume_norm: str, channels: int = 5, size: tuple[int, int] = (16, 24), **kwargs
) -> tuple[CouplingBlock, list[torch.Tensor]]:
    """A randomised block of ``kind`` on a 3-level pyramid, and random levels (B = 3)."""
    start = 1 if kind == "down" else 0
    param_level = start + 1 if kind == "dual" else start
    torch.manual_seed(3)
    block = CouplingBlock(
        kind, start, channels, 3, volume_norm, (size[0] >> param_level, size[1] >> param_level),
        backend="torch", **kwargs,
    ).double()  # fmt: skip
    randomize(block, seed=4, std=0.3)
    with torch.no_grad():
        block.running_mean.normal_(0.0, 0.2)
    return block, random_levels(3, channels, size, 3, seed=5)


BLOCK_CASES = [
    ("up", {}),
    ("down", {}),
    ("down", {"strided_down": False}),
    ("dual", {}),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("volume_norm", VN_KINDS)
@pytest.mark.parametrize("kind, kwargs", BLOCK_CASES, ids=["up", "down", "down-full", "dual"])
def test_every_block_kind_is_invertible(kind, kwargs, volume_norm, training):
    block, levels = make_block(kind, volume_norm, **kwargs)
    block.train(training)
    with torch.no_grad():
        out = block(levels, update_stats=False)
        # only the target changes, and it really changes
        for i, (a, b) in enumerate(zip(out, levels, strict=True)):
            if i == block.target:
                assert relative_error(a, b) > 0.1
            else:
                assert torch.equal(a, b)
        back = block.inverse(out)
    for a, b in zip(back, levels, strict=True):
        assert (a - b).abs().max() < 1e-10 * b.abs().max()

    block32 = copy.deepcopy(block).float()
    with torch.no_grad():
        back32 = block32.inverse(block32([t.float() for t in levels], update_stats=False))
    for a, b in zip(back32, levels, strict=True):
        assert relative_error(a, b) < 1e-4


def test_inverse_in_train_mode_uses_the_same_batch_statistics():
    """In training the VN mean is the batch mean of the block's own (s, t), computed from
    the unchanged conditioning levels, so the inverse recovers it without stored state; the
    eval-mode inverse (running mean) is a different map and does not undo it."""
    block, levels = make_block("dual", "CVN")
    with torch.no_grad():
        out = block.train()(levels, update_stats=False)
        assert (block.train().inverse(out)[1] - levels[1]).abs().max() < 1e-10
        assert relative_error(block.eval().inverse(out)[1], levels[1]) > 1e-3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("volume_norm", VN_KINDS)
def test_whole_model_is_invertible(volume_norm, training):
    model = make_model(4, 2, volume_norm, size=(64, 48), channels=8)
    for block in model.blocks:
        block.running_mean.normal_(0.0, 0.1)
    model.train(training)
    images = randn(3, 3, 64, 48, seed=8)
    with torch.no_grad():
        latents = model(images)
        features = model.inconv(images)
        assert relative_error(latents[0], model.pyramid(images)[0]) > 0.1  # the flow does something
        back = model.inverse(latents)
        assert (back - features).abs().max() < 1e-10 * features.abs().max()
        assert (model.reconstruct_images(latents) - images).abs().max() < 1e-10
        levels_back = model.flow.inverse(latents)
    for a, b in zip(levels_back, model.pyramid(images), strict=True):
        assert (a - b).abs().max() < 1e-10 * b.abs().max()

    model32 = copy.deepcopy(model).float()
    with torch.no_grad():
        back32 = model32.reconstruct_images(model32(images.float()))
    assert relative_error(back32, images) < 1e-4


# ---------------------------------------------------------------- 1x1 mixing ------------


@pytest.mark.parametrize("channels", [1, 3, 8, 16])
def test_lu_mixing_has_unit_determinant_after_perturbation(channels):
    torch.manual_seed(channels)
    mixing = InvertibleConv1x1(channels).double()
    assert abs(abs(torch.linalg.det(mixing.weight()).item()) - 1.0) < 1e-12
    before = mixing.weight().detach().clone()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in mixing.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype))
        mixing.w_s.add_(3.0)  # a large overall log-scale must be normalised away
    weight = mixing.weight().detach()
    if channels > 1:
        assert relative_error(weight, before) > 0.1
    assert abs(abs(torch.linalg.det(weight).item()) - 1.0) < 1e-10
    # a constant added to w_s changes nothing: only its deviations from the mean count
    with torch.no_grad():
        mixing.w_s.add_(-7.5)
    assert relative_error(mixing.weight().detach(), weight) < 1e-14


def test_mixing_factors_are_strictly_triangular_and_gradients_respect_masks():
    mixing = InvertibleConv1x1(6).double()
    mixing.weight().sum().backward()
    # entries outside the strict triangles never influence W
    assert torch.all(mixing.w_l.grad.triu() == 0)
    assert torch.all(mixing.w_u.grad.tril() == 0)
    assert mixing.w_l.grad.tril(-1).abs().sum() > 0
    assert mixing.w_u.grad.triu(1).abs().sum() > 0


# ---------------------------------------------------------------- volume normalization --


def applied_log_scale(block: CouplingBlock, levels: list[torch.Tensor]) -> torch.Tensor:
    """log of the scale the block applies to its target, read off the block's output with
    the mixing made the identity and the shift removed (x = 1, so z = exp(s))."""
    probe = copy.deepcopy(block)
    channels = probe.mixing.w_s.numel()
    with torch.no_grad():
        probe.mixing.w_p.copy_(torch.eye(channels))
        probe.mixing.w_l.zero_()
        probe.mixing.w_u.zero_()
        probe.mixing.w_s.zero_()
        probe.mixing.s_sign.fill_(1.0)
        probe.param_net[2].weight[channels:].zero_()  # t = 0
        ones = list(levels)
        ones[probe.target] = torch.ones_like(levels[probe.target])
        return probe(ones, update_stats=False)[probe.target].log()


@pytest.mark.parametrize("volume_norm", VN_KINDS)
@pytest.mark.parametrize("kind, kwargs", BLOCK_CASES, ids=["up", "down", "down-full", "dual"])
def test_volume_normalization_in_training(kind, kwargs, volume_norm):
    block, levels = make_block(kind, volume_norm, **kwargs)
    log_scale = applied_log_scale(block.train(), levels)
    with torch.no_grad():
        s_raw = block.param_net[:2](block.conditioning(levels))
        s_raw = F.conv2d(s_raw, block.param_net[2].weight, padding=1)[:, : s_raw.shape[1] // 2]
        s = soft_clamp(s_raw, block.clamp)  # at full parameter resolution
    dims = VN_DIMS[volume_norm]
    expected = s - s.mean(dim=dims, keepdim=True)
    stride = s.shape[-1] // log_scale.shape[-1]
    expected = expected[..., ::stride, ::stride]
    assert relative_error(log_scale, expected) < 1e-12
    assert log_scale.abs().max() > 0.05  # the scales are not trivial
    if stride == 1 or volume_norm == "CVN":
        # the applied log-scales have zero mean along the VN dims: the map keeps volume
        assert log_scale.mean(dim=dims).abs().max() < 1e-14
    # soft clamp: |s| < clamp before normalization, even for huge raw outputs
    assert soft_clamp(torch.tensor([-1e9, 1e9], dtype=torch.float64), 2.0).abs().max() < 2.0


@pytest.mark.parametrize("volume_norm", VN_KINDS)
def test_eval_mode_uses_running_means_and_is_per_sample(volume_norm):
    model = make_model(3, 2, volume_norm, size=(32, 32), channels=8)
    for block in model.blocks:
        block.running_mean.normal_(0.0, 0.1)
    means = [block.running_mean.clone() for block in model.blocks]
    a, b, c = (randn(1, 3, 32, 32, seed=s) for s in (20, 21, 22))
    with torch.no_grad():
        model.eval()
        first = model(torch.cat([a, b]))
        second = model(torch.cat([a, c]))
        for z1, z2 in zip(first, second, strict=True):
            assert torch.allclose(z1[0], z2[0], rtol=0, atol=1e-13)
        assert all(
            torch.equal(m, bl.running_mean) for m, bl in zip(means, model.blocks, strict=True)
        )
        # the running means are really used: changing them changes the latents
        model.blocks[0].running_mean.add_(0.5)
        target = model.blocks[0].target
        assert relative_error(model(torch.cat([a, b]))[target], first[target]) > 1e-3
        model.blocks[0].running_mean.sub_(0.5)
        # in training the batch statistics couple the samples of a batch
        model.train()
        train_first = model(torch.cat([a, b]))
        train_second = model(torch.cat([a, c]))
    assert (
        max(relative_error(x[0], y[0]) for x, y in zip(train_first, train_second, strict=True))
        > 1e-6
    )


def expected_running_means(model: PyramidFlow, images: torch.Tensor) -> list[torch.Tensor]:
    """0.9 * old + 0.1 * batch mean of each block's soft-clamped log-scales, with the block
    inputs computed block by block (no statistics touched)."""
    levels = model.pyramid(images)
    out = []
    with torch.no_grad():
        for block in model.blocks:
            h = block.parameters_for(levels)
            s = soft_clamp(h[:, : h.shape[1] // 2], block.clamp)
            mean = s.mean(dim=VN_DIMS[block.volume_norm], keepdim=True)
            expected = block.running_mean.clone()
            view = expected[..., :: block.param_stride, :: block.param_stride]
            view.mul_(0.9).add_(0.1 * mean)
            out.append(expected)
            levels = block(levels, update_stats=False)
    return out


@pytest.mark.parametrize("memory", ["recompute", "store"])
@pytest.mark.parametrize("volume_norm", VN_KINDS)
def test_training_step_updates_running_means_exactly_once(volume_norm, memory):
    model = make_model(4, 2, volume_norm, size=(32, 32), channels=8)
    model.config.memory = memory
    for block in model.blocks:
        block.running_mean.normal_(0.0, 0.1)
    images = randn(2, 3, 32, 32, seed=30)
    expected = expected_running_means(model, images)
    model.loss(model(images)).backward()
    for block, want in zip(model.blocks, expected, strict=True):
        assert (block.running_mean - want).abs().max() < 1e-12
    # a no-grad forward in training mode also updates once
    expected = expected_running_means(model, images)
    with torch.no_grad():
        model(images)
    for block, want in zip(model.blocks, expected, strict=True):
        assert (block.running_mean - want).abs().max() < 1e-12


# ---------------------------------------------------------------- structure -------------


def test_paper_default_structure_and_parameter_counts():
    torch.manual_seed(0)
    model = PyramidFlow(Config(levels=4, stacks=4, channels=16, kernel_size=7, image_size=64))
    kinds = [(b.kind, b.start) for b in model.blocks]
    assert kinds == [("dual", 0), ("down", 2), ("up", 0), ("dual", 1)] * 4
    assert len(model.blocks) == 16
    conv_weights = sum(
        b.param_net[0].weight.numel() + b.param_net[2].weight.numel() for b in model.blocks
    )
    assert conv_weights == 1_404_928
    lu = sum(p.numel() for b in model.blocks for p in b.mixing.parameters())
    assert conv_weights + lu == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert conv_weights + lu == 1_413_376
    for block in model.blocks:
        first, last = block.param_net[0], block.param_net[2]
        assert first.in_channels == (32 if block.kind == "dual" else 16)
        assert first.kernel_size == last.kernel_size == (7, 7)
        assert first.bias is None and last.bias is None
        assert torch.all(last.weight == 0)
        assert isinstance(block.param_net[1], torch.nn.LeakyReLU)
        assert block.param_net[1].negative_slope == 0.01
        # CVN running means: one value per pixel at the parameter resolution
        param_level = block.start + 1 if block.kind == "dual" else block.start
        assert tuple(block.running_mean.shape) == (1, 1, 64 >> param_level, 64 >> param_level)
    svn = PyramidFlow(Config(levels=4, stacks=1, channels=16, image_size=64, volume_norm="SVN"))
    assert all(tuple(b.running_mean.shape) == (1, 16, 1, 1) for b in svn.blocks)


def test_block_plan_follows_the_spec_and_transforms_every_level():
    assert block_plan(2) == [("down", 0), ("up", 0)]
    assert block_plan(3) == [("dual", 0), ("up", 0), ("down", 1)]
    assert block_plan(5) == [("dual", 0), ("dual", 2), ("up", 0), ("dual", 1), ("down", 3)]
    assert block_plan(8) == [
        ("dual", 0), ("dual", 2), ("dual", 4), ("down", 6),
        ("up", 0), ("dual", 1), ("dual", 3), ("dual", 5),
    ]  # fmt: skip
    for levels in range(2, 10):
        model = make_model(levels, 1, size=(2 ** (levels - 1),) * 2, channels=4)
        targets = sorted(block.target for block in model.blocks)
        assert targets == list(range(levels)), levels


def test_fresh_model_is_the_mixing_only():
    """The zero-initialised last convolutions make every block start as z = W x: each
    latent level is its band mixed by the product of its blocks' matrices."""
    model = make_model(3, 2, size=(32, 32), channels=8, randomized=False)
    images = randn(2, 3, 32, 32, seed=40)
    with torch.no_grad():
        latents = model(images)
        expected = model.pyramid(images)
        for block in model.blocks:
            expected[block.target] = torch.einsum(
                "oc,bchw->bohw", block.mixing.weight(), expected[block.target]
            )
    for a, b in zip(latents, expected, strict=True):
        assert relative_error(a, b) < 1e-13


def test_input_projection_is_frozen_orthogonal_and_latent_shapes():
    model = make_model(4, 1, size=(64, 48), channels=8)
    weight = model.inconv.weight
    assert not weight.requires_grad
    columns = weight[:, :, 0, 0]
    assert relative_error(columns.T @ columns, torch.eye(3, dtype=columns.dtype)) < 1e-6
    before = weight.detach().clone()
    images = randn(2, 3, 64, 48, seed=50)
    latents = model(images)
    model.loss(latents).backward()
    assert weight.grad is None
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    assert torch.equal(weight, before)

    with torch.no_grad():
        latents = model.eval()(images)
    assert [tuple(z.shape) for z in latents] == [
        (2, 8, 64, 48), (2, 8, 32, 24), (2, 8, 16, 12), (2, 8, 8, 6),
    ]  # fmt: skip
    assert all(torch.isfinite(z).all() for z in latents)


def test_check_input_errors_are_clear():
    cvn = make_model(3, 1, "CVN", size=(32, 32), channels=4)
    svn = make_model(3, 1, "SVN", size=(32, 32), channels=4)
    with pytest.raises(ValueError, match="3-channel images, got 1 channels"):
        cvn(randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        cvn(randn(3, 32, 32))
    with pytest.raises(ValueError, match="CVN.*32x32.*cannot run at 64x64"):
        cvn(randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"30x32 must be divisible by 2\^\(levels-1\) = 4"):
        svn(randn(2, 3, 30, 32))
    # SVN keeps per-channel statistics only: another size divisible by 4 is fine
    with torch.no_grad():
        latents = svn.eval()(randn(2, 3, 40, 24))
    assert tuple(latents[-1].shape) == (2, 4, 10, 6)


@pytest.mark.parametrize(
    "levels, stacks, volume_norm, size",
    [(2, 1, "CVN", (16, 24)), (2, 1, "SVN", (16, 24)), (5, 2, "CVN", (16, 32)),
     (5, 2, "SVN", (16, 32)), (3, 3, "SVN", (8, 12))],
)  # fmt: skip
def test_any_depth_builds_trains_and_inverts(levels, stacks, volume_norm, size):
    model = make_model(levels, stacks, volume_norm, size=size, channels=4)
    plan = block_plan(levels)
    assert len(model.blocks) == stacks * len(plan)
    images = randn(2, 3, *size, seed=60)
    latents = model(images)
    assert len(latents) == levels
    loss = model.loss(latents)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(b.param_net[2].weight.grad.abs().sum() > 0 for b in model.blocks)
    with torch.no_grad():
        back = model.reconstruct_images(model(images))
    assert (back - images).abs().max() < 1e-10
