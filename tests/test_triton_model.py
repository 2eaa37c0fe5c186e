"""A whole training step with every op on Triton equals the torch reference.

``model.set_backend("triton")`` routes the pyramid, the coupling (forward and inverse)
and the Fourier loss through the Triton kernels (in Triton's CPU interpreter unless
TRITON_INTERPRET=0 is set on a CUDA machine). The oracle is the same model on the torch
path in float64; the Triton model runs in float32 and must agree to a relative RMS error
of 1e-5 for the latents, the loss, every parameter gradient and the VN running means, in
both memory modes; so must the eval-mode latents and anomaly map afterwards.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere

import collections  # noqa: E402
import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton does not import: the Triton kernels cannot run")

from conftest import op_test_device  # noqa: E402
from pyramidflow_kernels import ops  # noqa: E402
from pyramidflow_kernels.testing import relative_error  # noqa: E402

from pyramidflow import Config, PyramidFlow  # noqa: E402

TOL = 1e-5
DEVICE = op_test_device()  # conftest.py: --device
SIZE = 32


def make_model(volume_norm: str, memory: str) -> PyramidFlow:
    """L = 3, S = 1, C = 6, k = 3 with random parameter networks (the last convolution is
    zero at initialisation, which would hide the scale and shift) and running means."""
    torch.manual_seed(0)
    config = Config(
        levels=3, stacks=1, channels=6, kernel_size=3, volume_norm=volume_norm,
        image_size=SIZE, memory=memory, backend="torch",
    )  # fmt: skip
    model = PyramidFlow(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.param_net[0], block.param_net[2]):
                layer.weight.copy_(0.1 * torch.randn(layer.weight.shape, generator=gen))
            block.running_mean.copy_(0.1 * torch.randn(block.running_mean.shape, generator=gen))
    return model.train()


def count_triton_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Wrap every Triton op implementation so that the test can see it really ran."""
    calls = {name: 0 for name in ops.TRITON_MODULES}
    for name in ops.TRITON_MODULES:
        module = ops._triton_module(name)
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def training_step(model: PyramidFlow, images: torch.Tensor):
    latents = model(images)
    loss = model.loss(latents)
    loss.backward()
    return [z.detach() for z in latents], loss.detach()


@pytest.mark.parametrize("memory", ["recompute", "store"])
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_training_step_on_triton_equals_torch(volume_norm, memory, monkeypatch):
    reference = make_model(volume_norm, memory).double()
    model = copy.deepcopy(reference).float().to(DEVICE)
    model.set_backend("triton")
    assert model.config.backend == "triton" and reference.config.backend == "torch"
    assert all(block.backend == "triton" for block in model.blocks)
    calls = count_triton_calls(monkeypatch)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))

    lat_ref, loss_ref = training_step(reference, images.double())
    lat, loss = training_step(model, images.to(DEVICE))
    assert calls["pyramid_decompose"] == 1
    assert calls["affine_coupling"] == len(model.blocks)
    recomputed = len(model.blocks) if memory == "recompute" else 0
    assert calls["affine_coupling_inverse"] == 0  # the walk inverts inside the recompute op
    assert calls["affine_coupling_recompute"] == recomputed
    assert calls["fourier_loss"] == 1

    assert len(lat) == 3
    for mine, ref in zip(lat, lat_ref, strict=True):
        assert mine.dtype == torch.float32
        assert relative_error(mine, ref) <= TOL
    assert loss > 0
    assert relative_error(loss, loss_ref) <= TOL
    named_ref = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
            continue
        expected = named_ref[name].grad
        assert expected.abs().sum() > 0, name
        assert relative_error(param.grad, expected) <= TOL, name
        checked += 1
    assert checked == 5 * len(model.blocks)  # 2 convolutions + w_l, w_s, w_u per block
    buffers_ref = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            assert relative_error(buffer, buffers_ref[name]) <= TOL, name

    # eval mode afterwards: latents (running means) and the anomaly map against a template
    reference.eval()
    model.eval()
    with torch.no_grad():
        lat_ref = reference(images.double())
        lat = model(images.to(DEVICE))
        template_ref = [z.mean(dim=0) + 0.1 for z in lat_ref]
        template = [t.float().to(DEVICE) for t in template_ref]
        map_ref, score_ref = reference.anomaly_map(lat_ref, template_ref)
        amap, score = model.anomaly_map(lat, template)
    for mine, ref in zip(lat, lat_ref, strict=True):
        assert relative_error(mine, ref) <= TOL
    assert calls["anomaly_map"] == 1
    assert relative_error(amap, map_ref) <= TOL
    assert relative_error(score, score_ref) <= TOL


@pytest.mark.parametrize("forced", ["triton", "torch"])
def test_backend_variable_applies_to_a_model_left_on_auto(monkeypatch, forced):
    from pyramidflow_kernels import coupling_triton, pyramid_triton

    calls: list[str] = []
    for module, name in (
        (pyramid_triton, "pyramid_decompose"),
        (coupling_triton, "affine_coupling"),
    ):
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    monkeypatch.setenv("PYRAMIDFLOW_BACKEND", forced)
    config = Config(levels=2, stacks=1, channels=4, kernel_size=3, image_size=(SIZE, SIZE))
    assert config.backend == "auto"
    model = PyramidFlow(config).to(DEVICE)
    with torch.no_grad():
        model(torch.randn(2, 3, SIZE, SIZE, device=DEVICE))
    expected = ["pyramid_decompose", "affine_coupling", "affine_coupling"]
    assert calls == (expected if forced == "triton" else [])


# Triton launches of one recompute training step at S = 4, L = 4 (CVN, 16 blocks) before the
# walk called a fused backward (main at 58db6b7): per block 2 in the forward and 6 in the
# walk (VN sum, inverse, VN sum and forward again for a graph, backward, VN gradient),
# plus 22 for the pyramid and the loss.
LAUNCHES_BEFORE = 150


def count_triton_launches(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Count every kernel launch by kernel name, through each Triton op module's ``launch``
    (the one function all of them start kernels with)."""
    from pyramidflow_kernels import coupling_triton, loss_map_triton, pyramid_triton

    launches: collections.Counter = collections.Counter()
    for module in (coupling_triton, loss_map_triton, pyramid_triton):

        def counted(kernel, grid, *args, _real=module.launch, **constexprs):
            launches[kernel.fn.__name__] += 1
            return _real(kernel, grid, *args, **constexprs)

        monkeypatch.setattr(module, "launch", counted)
    return launches


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_recompute_step_launches_each_coupling_kernel_once_per_block_and_pass(
    volume_norm, monkeypatch
):
    torch.manual_seed(0)
    config = Config(
        levels=4, stacks=4, channels=4, kernel_size=3, image_size=16, memory_budget=0,
        backend="triton", volume_norm=volume_norm,
    )  # fmt: skip
    model = PyramidFlow(config).to(DEVICE).train()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    launches = count_triton_launches(monkeypatch)
    training_step(model, images.to(DEVICE))
    blocks = len(model.blocks)
    assert blocks == 16
    # per block: the forward's VN sum and coupling; the walk's one fused recompute kernel
    # (inverse + backward) and the VN gradient correction. The walk reduces no mean: CVN's
    # fused kernel reduces it per pixel itself, SVN's comes kept from the forward.
    coupling = {
        "_vn_sum_kernel": blocks,
        "_coupling_fwd_kernel": blocks,
        "_coupling_recompute_kernel": blocks,
        "_vn_grad_kernel": blocks,
        "_coupling_inv_kernel": 0,
        "_coupling_bwd_kernel": 0,
    }
    assert {k: launches[k] for k in coupling} == coupling
    total = sum(launches.values())
    assert total == 4 * blocks + 22
    # 86 of 150, 57 % (SVN made 102 before it kept its mean)
    assert total <= 0.6 * LAUNCHES_BEFORE
