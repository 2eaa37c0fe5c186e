"""The memory-saving invertible sequence (``memory='recompute'``) against plain autograd.

Recompute must give the gradients of plain autograd (``'store'``) for the inputs and every
parameter, keep only the latents (and parameters) for backward whatever the depth,
evaluate each parameter network once per block in backward, update the VN running means
once per step, and refuse double backward with a clear error. The exact savings (stride-2
Down convolution, channel reduction before compose, rfft2) must match the straightforward
formulas within rounding.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pyramidflow_kernels as ops
import pytest
import torch
from pyramidflow_kernels.pyramid_reference import compose
from pyramidflow_kernels.testing import relative_error

from pyramidflow import Config, PyramidFlow
from pyramidflow.model.numerics import (
    float32_gradient_error,
    latent_objective,
    recorded_activation_pattern,
    with_activation_pattern,
)

FLOAT64_TOL = 1e-9
# Float32 gradients against float64 taking the same LeakyReLU branches
# (pyramidflow.numerics): all parameters together, and each tensor alone (looser: a
# tensor whose gradient is small against the others, such as the zero-mean w_s of the
# 1x1 mixing, carries the rounding of the shared backward signal relative to less).
FLOAT32_OVERALL_TOL = 1e-5
FLOAT32_TENSOR_TOL = 1e-4


def make_model(
    levels: int,
    stacks: int,
    volume_norm: str = "CVN",
    size: int = 32,
    channels: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **model_kwargs,
) -> PyramidFlow:
    """A small model whose zero-initialised last convolutions are made non-zero, so that
    every block really scales and shifts."""
    torch.manual_seed(seed)
    in_channels = min(3, channels)
    config = Config(
        levels=levels, stacks=stacks, channels=channels, kernel_size=3,
        volume_norm=volume_norm, image_size=(size, size), in_channels=in_channels,
        mean=(0.5,) * in_channels, std=(0.25,) * in_channels, backend="torch",
    )  # fmt: skip
    model = PyramidFlow(config, **model_kwargs)
    for block in model.blocks:
        torch.nn.init.normal_(block.param_net[2].weight, std=0.1)
    return model.to(dtype).train()


def make_levels(model: PyramidFlow, batch: int, seed: int = 1) -> list[torch.Tensor]:
    """Random pyramid levels (B, C, H/2^l, W/2^l) that require grad."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    height, width = cfg.image_size
    return [
        torch.randn(batch, cfg.channels, height >> i, width >> i, generator=gen, dtype=dtype)
        .requires_grad_(True)
        for i in range(cfg.levels)
    ]  # fmt: skip


def objective(latents: list[torch.Tensor], seed: int = 2) -> torch.Tensor:
    """A fixed random nonlinear scalar of the latents (every latent element matters), the
    same function in float32 and float64."""
    return latent_objective(latents, seed)


def step_gradients(model: PyramidFlow, levels: list[torch.Tensor], memory: str):
    """Latents and gradients (inputs, then every parameter) of one objective step."""
    inputs = [t.detach().clone().requires_grad_(True) for t in levels]
    latents = model.flow(inputs, memory=memory)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(objective(latents), inputs + params)
    return [z.detach() for z in latents], grads


@pytest.mark.parametrize("kept", [False, True], ids=["reduced", "kept-mean"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
@pytest.mark.parametrize("stride", [1, 2], ids=["k1", "k2"])
@pytest.mark.parametrize("batch", [1, 3], ids=["B1", "B3"])
def test_recompute_step_gradients_equal_autograd_of_the_forward(
    batch, stride, volume_norm, training, kept
):
    """The torch recompute step's written-out chain rule gives what autograd gives through
    the reference forward at the rebuilt input (float64), for every VN, pick stride and
    mode; x undoes the forward."""
    from pyramidflow_kernels import coupling_reference as reference

    gen = torch.Generator().manual_seed(batch + 10 * stride)
    channels, height, width = 5, 6, 10
    x = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    h = 1.5 * torch.randn(batch, 2 * channels, stride * height, stride * width, generator=gen,
                          dtype=torch.float64)  # fmt: skip
    weight = torch.linalg.qr(torch.randn(channels, channels, generator=gen, dtype=torch.float64))[0]
    shape = (1, 1, stride * height, stride * width) if volume_norm == "CVN" else (1, channels, 1, 1)
    running_mean = 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    options = {"volume_norm": volume_norm, "training": training}
    leaves = [t.clone().requires_grad_(True) for t in (x, h, weight)]
    z, mean = reference.affine_coupling(*leaves, running_mean, **options)
    grad_z = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad(z, leaves, grad_z)
    ours = reference.affine_coupling_recompute(
        z.detach(), grad_z, h, weight, running_mean, **options,
        batch_mean=mean.detach() if kept else None,
    )  # fmt: skip
    assert relative_error(ours[0], x) < FLOAT64_TOL
    for name, mine, theirs in zip(("grad x", "grad h", "grad weight"), ours[1:], expected,
                                  strict=True):  # fmt: skip
        assert relative_error(mine, theirs) < FLOAT64_TOL, name


@pytest.mark.parametrize("batch", [2, 3], ids=["B2", "B3"])
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
@pytest.mark.parametrize("stacks", [1, 4], ids=["S1", "S4"])
@pytest.mark.parametrize("levels", [2, 4, 8], ids=["L2", "L4", "L8"])
def test_recompute_gradients_match_store(levels, stacks, volume_norm, batch):
    # float64: the two modes are the same function evaluated in another order. (In float32
    # they may take other LeakyReLU branches: see test_float32_gradients_match_float64.)
    size = 128 if levels == 8 else 32
    model = make_model(levels, stacks, volume_norm, size=size)
    levels_in = make_levels(model, batch)
    z_store, g_store = step_gradients(copy.deepcopy(model), levels_in, "store")
    z_recompute, g_recompute = step_gradients(copy.deepcopy(model), levels_in, "recompute")
    for ours, theirs in zip(z_recompute, z_store, strict=True):
        assert relative_error(ours, theirs) < FLOAT64_TOL
    assert (
        len(g_recompute)
        == len(g_store)
        == levels + sum(p.requires_grad for p in model.parameters())
    )
    errors = [relative_error(a, b) for a, b in zip(g_recompute, g_store, strict=True)]
    assert max(errors) < FLOAT64_TOL, f"worst gradient relative error {max(errors):.2e}"


def briefly_trained(model: PyramidFlow, steps: int = 3) -> PyramidFlow:
    """``model`` after a few Adam steps of the Fourier loss on random images."""
    gen = torch.Generator().manual_seed(7)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    height, width = model.config.image_size
    for _ in range(steps):
        images = torch.randn(2, model.config.in_channels, height, width, generator=gen)
        loss = model.loss(model(images.to(params[0].dtype)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


FLOAT32_CASES = [
    # (levels, stacks, size, inputs, state)
    (8, 4, 128, "levels", "init"),
    (8, 4, 128, "images", "init"),
    (4, 4, 64, "images", "trained"),
    (2, 4, 32, "levels", "init"),
]


@pytest.mark.parametrize("memory", ["store", "recompute"])
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
@pytest.mark.parametrize(
    "levels, stacks, size, inputs, state", FLOAT32_CASES,
    ids=[f"L{c[0]}-S{c[1]}-{c[2]}px-{c[3]}-{c[4]}" for c in FLOAT32_CASES],
)  # fmt: skip
def test_float32_gradients_match_float64(levels, stacks, size, inputs, state, volume_norm, memory):
    model = make_model(levels, stacks, volume_norm, size=size, dtype=torch.float32)
    if state == "trained":
        model = briefly_trained(model)
    if inputs == "levels":
        batch = make_levels(model, 2)
    else:
        gen = torch.Generator().manual_seed(3)
        batch = torch.randn(2, model.config.in_channels, size, size, generator=gen)
    error = float32_gradient_error(model, batch, memory=memory)
    assert error.overall < FLOAT32_OVERALL_TOL, f"all parameters: {error.overall:.2e}"
    worst = max(error.per_tensor, key=error.per_tensor.get)
    assert error.per_tensor[worst] < FLOAT32_TENSOR_TOL, f"{worst}: {error.per_tensor[worst]:.2e}"
    if error.kink_flips == 0:
        assert error.overall_plain == error.overall


def test_activation_pattern_replay_gives_the_same_gradients_and_follows_the_pattern():
    model = make_model(4, 1, "CVN", size=32)
    levels_in = make_levels(model, 2)
    with recorded_activation_pattern(model) as pattern:
        _, expected = step_gradients(copy.deepcopy(model), levels_in, "store")
    assert sorted(pattern) == list(range(len(model.blocks)))
    _, replayed = step_gradients(with_activation_pattern(model, pattern), levels_in, "store")
    assert max(relative_error(a, b) for a, b in zip(replayed, expected, strict=True)) < 1e-13
    # the replayed model takes the given branch even where the sign says otherwise
    flipped = {**pattern, 0: ~pattern[0]}
    _, other = step_gradients(with_activation_pattern(model, flipped), levels_in, "store")
    first_conv = len(levels_in)  # block 0's first parameter network weight
    assert relative_error(other[first_conv], expected[first_conv]) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["SSE41", "AVX2"])
def test_float32_numerics_hold_under_other_onednn_kernels(isa):
    """oneDNN picks convolution kernels per processor (and ONEDNN_MAX_CPU_ISA caps them):
    the float32 accuracy tests must pass whichever it picks."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
        "-k", "test_float32_gradients_match_float64 and L8",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_recompute_gradients_match_store_in_eval_mode():
    model = make_model(4, 2).eval()
    for block in model.blocks:
        block.running_mean.normal_(0.0, 0.1)
    levels_in = make_levels(model, 2)
    _, g_store = step_gradients(model, levels_in, "store")
    _, g_recompute = step_gradients(model, levels_in, "recompute")
    assert (
        max(relative_error(a, b) for a, b in zip(g_recompute, g_store, strict=True)) < FLOAT64_TOL
    )


def test_gradcheck_through_recompute():
    model = make_model(3, 1, "CVN", size=8, channels=2, dtype=torch.float64)
    levels_in = make_levels(model, 2)
    first, last = model.blocks[0], model.blocks[-1]
    chosen = [first.param_net[2].weight, last.mixing.w_u]
    assert model.config.memory == "recompute"

    def flow(*args):
        # the chosen parameters are gradcheck inputs: perturbing them perturbs the model
        return tuple(model.flow(list(args[: len(levels_in)]), memory="recompute"))

    assert torch.autograd.gradcheck(flow, (*levels_in, *chosen), eps=1e-6, atol=1e-6, rtol=1e-5)


def saved_bytes(model: PyramidFlow, levels_in, memory: str) -> tuple[int, int]:
    """(bytes saved for backward by the flow, bytes of them that are parameters), with
    tensors sharing a storage counted once."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        latents = model.flow(levels_in, memory=memory)
    sum(z.sum() for z in latents).backward()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_bytes = sum(n for ptr, n in storages.items() if ptr in param_ptrs)
    return sum(storages.values()), param_bytes


def test_saved_memory_is_latents_plus_parameters_whatever_the_depth():
    activation_bytes = {}
    for stacks in (1, 2, 4, 8):
        model = make_model(4, stacks, dtype=torch.float32)
        levels_in = make_levels(model, 2)
        total, params = saved_bytes(model, levels_in, "recompute")
        latent_bytes = sum(t.numel() * t.element_size() for t in levels_in)
        all_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert abs(total - (latent_bytes + all_param_bytes)) <= 0.1 * (
            latent_bytes + all_param_bytes
        )
        activation_bytes[stacks] = total - params
        store_total, store_params = saved_bytes(model, levels_in, "store")
        assert store_total - store_params > 4 * stacks * latent_bytes  # the hooks do count
    assert len(set(activation_bytes.values())) == 1, activation_bytes


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_running_means_after_one_step_equal_store(volume_norm):
    model = make_model(4, 2, volume_norm)
    levels_in = make_levels(model, 2)
    store, recompute = copy.deepcopy(model), copy.deepcopy(model)
    for twin, memory in ((store, "store"), (recompute, "recompute")):
        objective(twin.flow(levels_in, memory=memory)).backward()
    for ours, theirs in zip(recompute.blocks, store.blocks, strict=True):
        assert theirs.running_mean.abs().max() > 0
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-12, atol=0)


def test_double_backward_raises_and_autograd_grad_works():
    model = make_model(4, 2)
    levels_in = make_levels(model, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = objective(model.flow(levels_in, memory="recompute"))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, params, create_graph=True)

    loss = objective(model.flow(levels_in, memory="recompute"))
    grads = torch.autograd.grad(loss, params)
    assert all(p.grad is None for p in params)  # autograd.grad leaves .grad alone
    loss = objective(model.flow(levels_in, memory="store"))
    expected = torch.autograd.grad(loss, params)
    assert max(relative_error(a, b) for a, b in zip(grads, expected, strict=True)) < FLOAT64_TOL

    # store mode keeps higher-order gradients available
    loss = objective(model.flow(levels_in, memory="store"))
    (first,) = torch.autograd.grad(loss, [params[0]], create_graph=True)
    assert first.requires_grad


def test_retained_graph_gives_the_same_gradients_twice():
    # the latents' node hands the latents over on every backward, not just the first
    model = make_model(4, 2)
    levels_in = make_levels(model, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = objective(model.flow(levels_in, memory="recompute"))
    first = torch.autograd.grad(loss, params + levels_in, retain_graph=True)
    second = torch.autograd.grad(loss, params + levels_in)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_latents_changed_in_place_before_backward_raise():
    model = make_model(4, 2)
    latents = model.flow(make_levels(model, 2), memory="recompute")
    loss = objective(latents)
    with torch.no_grad():
        latents[0].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_gradients_of_a_loss_using_some_latents_only_match_store():
    model = make_model(4, 2)
    levels_in = make_levels(model, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for memory in ("store", "recompute"):
        latents = model.flow(levels_in, memory=memory)
        loss = (latents[1] ** 2).sum() + latents[3].sum()
        wrt = params + levels_in
        found = torch.autograd.grad(loss, wrt, allow_unused=True)
        grads[memory] = [
            torch.zeros_like(t) if g is None else g for g, t in zip(found, wrt, strict=True)
        ]
    errors = [relative_error(a, b) for a, b in zip(grads["recompute"], grads["store"], strict=True)]
    assert max(errors) < FLOAT64_TOL


@pytest.mark.parametrize("memory, calls_per_block", [("recompute", 2), ("store", 1)])
def test_parameter_network_runs_once_per_block_in_backward(memory, calls_per_block):
    model = make_model(4, 2, dtype=torch.float32)
    model.config.memory = memory
    calls = {"forward": 0, "backward": 0}
    phase = ["forward"]

    def count(module, args, output):
        calls[phase[0]] += 1

    for block in model.blocks:
        block.param_net.register_forward_hook(count)
    images = torch.randn(2, 3, 32, 32)
    loss = model.loss(model(images))
    phase[0] = "backward"
    loss.backward()
    n_blocks = len(model.blocks)
    assert calls["forward"] + calls["backward"] == calls_per_block * n_blocks
    assert calls["backward"] == (n_blocks if memory == "recompute" else 0)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_strided_down_block_equals_straightforward():
    strided = make_model(4, 2, "CVN")
    plain = make_model(4, 2, "CVN", strided_down=False)
    plain.load_state_dict(strided.state_dict())
    assert any(block.param_stride == 2 for block in strided.blocks)
    assert all(block.param_stride == 1 for block in plain.blocks)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)

    latents = {}
    for name, model in (("strided", strided), ("plain", plain)):
        out = model(images)
        model.loss(out).backward()
        latents[name] = [z.detach() for z in out]
    for a, b in zip(latents["strided"], latents["plain"], strict=True):
        assert relative_error(a, b) < FLOAT64_TOL
    for (name, a), b in zip(strided.named_parameters(), plain.parameters(), strict=True):
        if not a.requires_grad:
            continue
        assert relative_error(a.grad, b.grad) < FLOAT64_TOL, name

    # the strided model updates the running mean at the pixels it uses (even ones)
    for a, b in zip(strided.blocks, plain.blocks, strict=True):
        step = a.param_stride
        used = (..., slice(None, None, step), slice(None, None, step))
        torch.testing.assert_close(a.running_mean[used], b.running_mean[used])

    strided.eval()
    plain.eval()
    with torch.no_grad():
        for a, b in zip(strided(images), plain(images), strict=True):
            assert relative_error(a, b) < FLOAT64_TOL


def straightforward_fourier_loss(latents: list[torch.Tensor]) -> torch.Tensor:
    """Compose full-channel squared pair differences, then channel mean, then fft2."""
    batch = latents[0].shape[0]
    maps = []
    for i in range(batch):
        for j in range(i + 1, batch):
            composed = compose([(z[i : i + 1] - z[j : j + 1]) ** 2 for z in latents])
            maps.append(composed.mean(dim=1)[0])
    return torch.fft.fft2(torch.stack(maps)).abs().mean()


def test_channel_reduction_first_loss_and_map_match_straightforward():
    model = make_model(4, 1, size=32, channels=4)
    latents = [t.detach().requires_grad_(True) for t in make_levels(model, 3)]
    loss = ops.fourier_loss(latents, backend="torch")
    expected = straightforward_fourier_loss(latents)
    assert abs(loss.item() - expected.item()) <= FLOAT64_TOL * expected.abs().item()
    grads = torch.autograd.grad(loss, latents)
    expected_grads = torch.autograd.grad(expected, latents)
    for a, b in zip(grads, expected_grads, strict=True):
        assert relative_error(a, b) < FLOAT64_TOL

    template = [z.detach().mean(dim=0) for z in make_levels(model, 4, seed=5)]
    amap, scores = ops.anomaly_map(latents, template, backend="torch")
    expected_map = compose([(z - t).abs() for z, t in zip(latents, template, strict=True)])
    expected_map = expected_map.mean(dim=1)
    assert relative_error(amap, expected_map) < FLOAT64_TOL
    assert relative_error(scores, expected_map.amax(dim=(-2, -1))) < FLOAT64_TOL
