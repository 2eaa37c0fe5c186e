"""The convolution precision policy (``Config.conv_precision``, pyramidflow.model.precision).

bf16 runs exactly the parameter networks in bfloat16 and everything else in float32;
tf32 is fp32 on a CPU; the recompute backward re-evaluates every parameter network to the
forward's h bit for bit (whole images and row bands); on CUDA the policy's flags are set
inside the scope and restored after it. The demo's accuracy with bf16 is a bench
(bench/precision_check.py), not a test.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from pyramidflow_kernels import ops
from pyramidflow_kernels.testing import relative_error
from torch._subclasses.fake_tensor import FakeTensorMode

from pyramidflow import Config, PyramidFlow
from pyramidflow.cli.common import config_from_args
from pyramidflow.cli.train import add_command
from pyramidflow.model import layers, precision, tiling
from pyramidflow.training import loop


def make_model(conv_precision: str = "fp32", **overrides) -> PyramidFlow:
    """L = 3, S = 2, C = 4, k = 3 at 32 px with non-zero last convolutions."""
    torch.manual_seed(0)
    settings = dict(levels=3, stacks=2, channels=4, kernel_size=3, image_size=32,
                    conv_precision=conv_precision, backend="torch")  # fmt: skip
    model = PyramidFlow(Config(**{**settings, **overrides}))
    for block in model.blocks:
        torch.nn.init.normal_(block.param_net[2].weight, std=0.1)
    return model.train()


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_conv_precision_is_validated_and_round_trips_through_json():
    with pytest.raises(ValueError, match="conv_precision must be one of fp32, tf32, bf16"):
        Config(conv_precision="fp16")
    config = Config(conv_precision="bf16")
    assert Config.from_json(config.to_json()).conv_precision == "bf16"
    assert Config().conv_precision == "fp32"
    assert Config.from_dict({k: v for k, v in Config().to_dict().items()
                             if k != "conv_precision"}).conv_precision == "fp32"  # fmt: skip
    model = make_model()
    with pytest.raises(ValueError, match="conv_precision"):
        model.set_conv_precision("half")


def test_train_flag_sets_the_conv_precision():
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    base = ["train", "data", "--out", "m.safetensors"]
    assert config_from_args(parser.parse_args(base)).conv_precision == "fp32"
    args = parser.parse_args([*base, "--conv-precision", "bf16"])
    assert config_from_args(args).conv_precision == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--conv-precision", "fp16"])


def test_bf16_runs_the_parameter_networks_in_bfloat16_and_the_coupling_in_float32(monkeypatch):
    model = make_model("bf16")
    block = model.blocks[0]
    levels = model.pyramid(images())
    with torch.no_grad():
        h = block.parameters_for(levels)
        # the same network explicitly in bfloat16: input and weights rounded, output cast
        net = copy.deepcopy(block.param_net).to(torch.bfloat16)
        condition = block.conditioning(levels).contiguous(memory_format=torch.channels_last)
        expected = net(condition.to(torch.bfloat16)).float()
        block.conv_precision = "fp32"
        h_fp32 = block.parameters_for(levels)
    assert h.dtype == torch.float32
    assert torch.equal(h, expected)
    assert 1e-4 < relative_error(h, h_fp32) < 1e-2  # bfloat16 rounding, no more

    seen = []
    real = ops.affine_coupling

    def spy(x, h, weight, running_mean, **options):
        seen.append((x.dtype, h.dtype, weight.dtype))
        return real(x, h, weight, running_mean, **options)

    monkeypatch.setattr(layers.ops, "affine_coupling", spy)
    latents = model(images())
    assert seen and all(d == (torch.float32,) * 3 for d in seen)
    assert all(z.dtype == torch.float32 for z in latents)
    model.loss(latents).backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_bf16_gradients_stay_near_the_fp32_ones():
    grads = {}
    for policy in ("fp32", "bf16"):
        model = make_model(policy)
        model.loss(model(images())).backward()
        grads[policy] = [p.grad for p in model.parameters() if p.requires_grad]
    assert relative_error(grads["bf16"], grads["fp32"]) < 3e-2


def test_tf32_is_fp32_on_a_cpu():
    latents = {}
    for policy in ("fp32", "tf32"):
        with torch.no_grad():
            latents[policy] = make_model(policy)(images())
    assert all(torch.equal(a, b) for a, b in zip(latents["fp32"], latents["tf32"], strict=True))


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "bands"])
@pytest.mark.parametrize("policy", ["fp32", "bf16"])
def test_recompute_backward_gets_the_forward_h_bit_for_bit(policy, tiled, monkeypatch):
    """Every parameter-network evaluation of the backward equals, bit for bit, the forward's
    evaluation of the same input (the last block's inputs are the saved latents, so there
    the backward's h is the forward's own); the row bands included."""
    model = make_model(policy, memory_budget=1 if tiled else 0)
    if tiled:  # bands of 7 rows in every block (the test shapes are tiny for the budget)
        monkeypatch.setattr(tiling, "MIN_BAND_ROWS", 1)
        per_row = (1 << 20) // 7
        monkeypatch.setattr(tiling, "band_transient_bytes", lambda block, levels, n: n * per_row)
    evaluations: list[tuple[int, bool, torch.Tensor]] = []

    def replayed(index: int, method, fetch_rows):
        """Wrap ``method`` (parameters_for or parameters_for_rows): record h, and for an
        evaluation with grad (the backward's) evaluate the same inputs again as the
        forward does (no grad) and require the same bits."""

        def wrapper(*args):
            rows: list[torch.Tensor] = []
            args = fetch_rows(args, rows)
            h = method(*args)
            evaluations.append((index, torch.is_grad_enabled(), h.detach().clone()))
            if torch.is_grad_enabled():
                replay = iter(rows)
                with torch.no_grad():
                    again = method(*fetch_rows(args, None, replay))
                assert torch.equal(h.detach(), again), f"block {index}"
            return h

        return wrapper

    def whole(args, rows, replay=None):
        (levels,) = args
        if replay is not None:
            return (next(replay),)
        rows.append([t.detach().clone() for t in levels])
        return (levels,)

    def bands(args, rows, replay=None):
        fetch, *rest = args
        if replay is not None:
            return (lambda i, a, b: next(replay), *rest)

        def recording(i, a, b):
            t = fetch(i, a, b)
            rows.append(t.detach().clone())
            return t

        return (recording, *rest)

    for index, block in enumerate(model.blocks):
        for name, fetch_rows in (("parameters_for", whole), ("parameters_for_rows", bands)):
            monkeypatch.setattr(block, name, replayed(index, getattr(block, name), fetch_rows))
    last = len(model.blocks) - 1  # down(1): target level 2, 8 rows
    assert len(model.tiling_summary()["tiled_blocks"]) == (len(model.blocks) if tiled else 0)
    model.loss(model(images())).backward()
    assert {i for i, grad, _ in evaluations if grad} == set(range(len(model.blocks)))
    forward = [h for i, grad, h in evaluations if i == last and not grad]
    backward = [h for i, grad, h in evaluations if i == last and grad]
    assert len(forward) == len(backward) == (2 if tiled else 1)  # bands of 7 + 1 rows
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))


def test_cuda_scope_sets_the_policy_and_pins_cudnn_then_restores_the_flags():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic)
    try:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic = (
            True, False, True, False,
        )  # fmt: skip
        cuda = torch.device("cuda")
        for policy, tf32 in (("fp32", False), ("tf32", True)):
            with precision.conv_scope(policy, cuda):
                assert (cudnn.allow_tf32, matmul.allow_tf32) == (tf32, tf32)
                assert not cudnn.benchmark and cudnn.deterministic
            with precision.backward_scope(policy, cuda):
                assert (cudnn.allow_tf32, matmul.allow_tf32) == (tf32, tf32)
                assert cudnn.benchmark and not cudnn.deterministic  # the user's, untouched
            flags = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic)
            assert flags == (True, False, True, False)
        with precision.conv_scope("tf32", torch.device("cpu")):
            assert not cudnn.deterministic  # nothing to pin on a CPU
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic = before


def test_cuda_parameter_output_is_float32_nchw_for_the_triton_coupling():
    with FakeTensorMode():  # a CUDA tensor's metadata, on any machine
        h = torch.empty(2, 8, 16, 16, device="cuda", dtype=torch.bfloat16,
                        memory_format=torch.channels_last)  # fmt: skip
        out = precision.parameter_output(h, torch.float32)
        assert out.dtype == torch.float32 and out.is_contiguous()
    cpu_h = torch.empty(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert precision.parameter_output(cpu_h, torch.float32) is cpu_h  # CPU: no copy


def test_resume_may_change_the_conv_precision(tmp_path):
    config = Config(levels=3, stacks=1, channels=4, kernel_size=3, image_size=32, epochs=1,
                    lr=1e-3)  # fmt: skip
    path = tmp_path / "state.safetensors"
    torch.manual_seed(0)
    loop.train(PyramidFlow(config), images(4), config, checkpoint_path=path)
    resumed = config.replace(epochs=2, conv_precision="bf16")
    model = PyramidFlow(resumed)
    report = loop.train(model, images(4), resumed, checkpoint_path=path, resume=True)
    assert report.start_epoch == 1 and len(report.epoch_losses) == 2
    assert all(block.conv_precision == "bf16" for block in model.blocks)
