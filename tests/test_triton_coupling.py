"""Triton affine coupling against the torch reference, on ``--device`` (conftest.py: Triton's
CPU interpreter by default, compiled kernels with ``--device cuda``).

The reference runs in float64 (upcast inputs); the Triton kernels run in float32 and
must agree to a relative RMS error of 1e-5 for the output and every gradient.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere

import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton does not import: the Triton kernels cannot run")

import pyramidflow_kernels  # noqa: E402
from conftest import op_test_device  # noqa: E402
from pyramidflow_kernels import (  # noqa: E402
    coupling_recompute,
    coupling_reference,
    coupling_triton,
)
from pyramidflow_kernels.testing import relative_error  # noqa: E402

TOL = 1e-5
DEVICE = op_test_device()


def make_inputs(channels, batch, stride, volume_norm, seed=0, height=12, width=20):
    """x (B, C, 12, 20), h at stride x that size, a well-conditioned W, a running mean."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen)
    h = 1.5 * torch.randn(batch, 2 * channels, stride * height, stride * width, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=gen))
    weight = q + 0.2 * torch.randn(channels, channels, generator=gen)
    shape = (1, 1, stride * height, stride * width) if volume_norm == "CVN" else (1, channels, 1, 1)
    running_mean = 0.3 * torch.randn(shape, generator=gen)
    return tuple(t.to(DEVICE) for t in (x, h, weight, running_mean))


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
@pytest.mark.parametrize("stride", [1, 2], ids=["k1", "k2"])
@pytest.mark.parametrize("batch", [1, 3], ids=["B1", "B3"])
@pytest.mark.parametrize("channels", [3, 16], ids=["C3", "C16"])
def test_forward_and_gradients_match_reference(channels, batch, stride, volume_norm, training):
    x, h, weight, running_mean = make_inputs(channels, batch, stride, volume_norm)
    ours = leaves(x, h, weight)
    theirs = leaves(x, h, weight, dtype=torch.float64)
    options = {"volume_norm": volume_norm, "training": training}

    z, mean = coupling_triton.affine_coupling(*ours, running_mean, **options)
    z_ref, mean_ref = coupling_reference.affine_coupling(*theirs, running_mean.double(), **options)
    assert z.shape == x.shape and z.dtype == x.dtype
    assert mean.shape == mean_ref.shape
    assert relative_error(z, z_ref) <= TOL
    assert relative_error(mean, mean_ref) <= TOL

    gen = torch.Generator().manual_seed(1)
    grad_z = torch.randn(z.shape, generator=gen).to(DEVICE)
    loss = (z * grad_z).sum()
    loss_ref = (z_ref * grad_z.double()).sum()
    if training:  # the returned batch mean is differentiable too
        grad_mean = torch.randn(mean.shape, generator=gen).to(DEVICE)
        loss = loss + (mean * grad_mean).sum()
        loss_ref = loss_ref + (mean_ref * grad_mean.double()).sum()
    loss.backward()
    loss_ref.backward()
    for name, mine, ref in zip(("x", "h", "weight"), ours, theirs, strict=True):
        assert relative_error(mine.grad, ref.grad) <= TOL, f"grad {name}"


@pytest.mark.parametrize(
    ("stride", "volume_norm", "training"), [(2, "SVN", True), (1, "CVN", True), (1, "SVN", False)]
)
def test_channels_in_several_chunks_match_reference(stride, volume_norm, training):
    """C = 37: the kernels loop over run-time chunks of 16 channels (the inverse's
    backward over 8), the last one partial."""
    test_forward_and_gradients_match_reference(37, 2, stride, volume_norm, training)


@pytest.mark.parametrize(
    ("channels", "batch", "stride", "volume_norm", "training"),
    [
        (37, 2, 1, "SVN", True),
        (3, 1, 2, "SVN", True),
        (16, 3, 1, "CVN", True),
        (16, 1, 2, "CVN", False),
        (3, 3, 1, "SVN", False),
        (5, 2, 2, "SVN", True),
        (5, 2, 1, "CVN", False),
    ],
)
def test_inverse_matches_reference_and_undoes_forward(
    channels, batch, stride, volume_norm, training
):
    x, h, weight, running_mean = make_inputs(channels, batch, stride, volume_norm, seed=2)
    options = {"volume_norm": volume_norm, "training": training}
    with torch.no_grad():
        z, _ = coupling_triton.affine_coupling(x, h, weight, running_mean, **options)
        assert (
            relative_error(
                coupling_triton.affine_coupling_inverse(z, h, weight, running_mean, **options), x
            )
            <= TOL
        )

    ours = leaves(z, h, weight)
    theirs = leaves(z, h, weight, dtype=torch.float64)
    out = coupling_triton.affine_coupling_inverse(*ours, running_mean, **options)
    ref = coupling_reference.affine_coupling_inverse(*theirs, running_mean.double(), **options)
    assert relative_error(out, ref) <= TOL
    grad_x = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (out * grad_x).sum().backward()
    (ref * grad_x.double()).sum().backward()
    for name, mine, expected in zip(("z", "h", "weight"), ours, theirs, strict=True):
        assert relative_error(mine.grad, expected.grad) <= TOL, f"grad {name}"


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_float64_kernels_match_reference_to_float64_precision(inverse):
    """float64 inputs run the kernels in float64, in chunks of 4 channels (2 in both
    backwards): C = 6 makes a partial last chunk. The soft clamp's arctangent
    is a single-precision polynomial in both dtypes: ~1e-8 is the float64 path's floor."""
    x, h, weight, running_mean = make_inputs(6, 2, 2, "SVN", seed=5)
    ours = leaves(x, h, weight, dtype=torch.float64)
    theirs = leaves(x, h, weight, dtype=torch.float64)
    options = {"volume_norm": "SVN", "training": True}
    mean = running_mean.double()
    if inverse:
        out = coupling_triton.affine_coupling_inverse(*ours, mean, **options)
        ref = coupling_reference.affine_coupling_inverse(*theirs, mean, **options)
    else:
        out = coupling_triton.affine_coupling(*ours, mean, **options)[0]
        ref = coupling_reference.affine_coupling(*theirs, mean, **options)[0]
    assert out.dtype == torch.float64
    assert relative_error(out, ref) <= 1e-7
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (out * grad.to(DEVICE)).sum().backward()
    (ref * grad.to(DEVICE)).sum().backward()
    for name, mine, expected in zip(("x", "h", "weight"), ours, theirs, strict=True):
        assert relative_error(mine.grad, expected.grad) <= 1e-7, f"grad {name}"


@pytest.mark.parametrize(
    "channels, batch, stride, volume_norm, training",
    [
        (3, 2, 1, "CVN", True),  # CVN mean reduced in the fused kernel (B 2..4)
        (16, 3, 1, "CVN", True),
        (3, 1, 1, "CVN", True),  # B = 1 and B > 4: the VN sum kernel first
        (16, 5, 1, "CVN", True),
        (5, 2, 2, "CVN", True),
        (5, 2, 2, "SVN", True),
        (20, 2, 1, "CVN", True),  # two channel chunks
        (16, 2, 1, "CVN", False),
        (5, 2, 2, "SVN", False),
    ],
)
def test_recompute_step_matches_reference(channels, batch, stride, volume_norm, training):
    """The fused recompute kernel (inverse, then the forward's backward at the rebuilt x)
    gives the reference's x and gradients, and x undoes the forward."""
    x, h, weight, running_mean = make_inputs(channels, batch, stride, volume_norm, seed=2)
    options = {"volume_norm": volume_norm, "training": training}
    with torch.no_grad():
        z, _ = coupling_triton.affine_coupling(x, h, weight, running_mean, **options)
    grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ours = coupling_recompute.affine_coupling_recompute(z, grad_z, h, weight, running_mean,
                                                        **options)  # fmt: skip
    wide = (t.double() for t in (z, grad_z, h, weight, running_mean))
    theirs = coupling_reference.affine_coupling_recompute(*wide, **options)
    assert relative_error(ours[0], x) <= TOL
    for name, mine, expected in zip(("x", "grad x", "grad h", "grad weight"), ours, theirs,
                                    strict=True):  # fmt: skip
        assert mine.dtype == torch.float32
        assert relative_error(mine, expected) <= TOL, name


# CVN at B = 2..4 is left out: the fused kernel sums its mean in another order than the
# forward's VN sum kernel, so there the kept mean may differ from it in the last bit.
@pytest.mark.parametrize("volume_norm, batch", [("SVN", 2), ("SVN", 5), ("CVN", 5)])
def test_recompute_step_with_the_forwards_kept_mean_is_unchanged_bit_for_bit(volume_norm, batch):
    """Passing the forward's VN batch mean (as the recompute walk does for SVN) spares the
    reduction over h and changes no bit where the op would reduce it as the forward did,
    in the Triton op and in the reference; a mean of another shape is refused by name."""
    x, h, weight, running_mean = make_inputs(5, batch, 2, volume_norm, seed=3)
    options = {"volume_norm": volume_norm, "training": True}
    grad_z = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    for module, forward in ((coupling_recompute, coupling_triton), (coupling_reference,) * 2):
        with torch.no_grad():
            z, kept = forward.affine_coupling(x, h, weight, running_mean, **options)
        args = (z, grad_z, h, weight, running_mean)
        reduced = module.affine_coupling_recompute(*args, **options)
        given = module.affine_coupling_recompute(*args, **options, batch_mean=kept)
        for name, a, b in zip(("x", "grad x", "grad h", "grad weight"), given, reduced,
                              strict=True):  # fmt: skip
            assert torch.equal(a, b), f"{module.__name__}: {name}"
        with pytest.raises(ValueError, match="batch_mean must have shape"):
            module.affine_coupling_recompute(*args, **options, batch_mean=kept.flatten())


def test_recompute_step_in_float64_matches_reference_to_float64_precision():
    x, h, weight, running_mean = (t.double() for t in make_inputs(6, 2, 1, "CVN", seed=5))
    options = {"volume_norm": "CVN", "training": True}
    z, _ = coupling_reference.affine_coupling(x, h, weight, running_mean, **options)
    grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grad_z = grad_z.to(DEVICE)
    ours = coupling_recompute.affine_coupling_recompute(z, grad_z, h, weight, running_mean,
                                                        **options)  # fmt: skip
    theirs = coupling_reference.affine_coupling_recompute(z, grad_z, h, weight, running_mean,
                                                          **options)  # fmt: skip
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine.dtype == torch.float64
        assert relative_error(mine, expected) <= 1e-7


def test_non_power_of_two_channels_forward_and_gradients():
    x, h, weight, running_mean = make_inputs(5, 2, 2, "CVN", seed=4, height=7, width=9)
    ours = leaves(x, h, weight)
    theirs = leaves(x, h, weight, dtype=torch.float64)
    z, _ = coupling_triton.affine_coupling(*ours, running_mean, volume_norm="CVN", training=True)
    z_ref, _ = coupling_reference.affine_coupling(
        *theirs, running_mean.double(), volume_norm="CVN", training=True
    )
    assert relative_error(z, z_ref) <= TOL
    z.square().sum().backward()
    z_ref.square().sum().backward()
    for mine, ref in zip(ours, theirs, strict=True):
        assert relative_error(mine.grad, ref.grad) <= TOL


def test_public_op_dispatches_to_triton(monkeypatch):
    calls = []
    original = coupling_triton.affine_coupling

    def spy(*args, **kwargs):
        calls.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(coupling_triton, "affine_coupling", spy)
    x, h, weight, running_mean = make_inputs(3, 2, 1, "SVN")
    z, _ = pyramidflow_kernels.affine_coupling(
        x, h, weight, running_mean, volume_norm="SVN", training=True, backend="triton"
    )
    z_ref, _ = pyramidflow_kernels.affine_coupling(
        x, h, weight, running_mean, volume_norm="SVN", training=True, backend="torch"
    )
    assert calls == [True]
    assert relative_error(z, z_ref) <= TOL


def test_bad_arguments_raise_clear_errors():
    x, h, weight, running_mean = make_inputs(3, 1, 1, "CVN")
    with pytest.raises(ValueError, match="running mean"):
        coupling_triton.affine_coupling(x, h, weight, None, volume_norm="CVN", training=False)
    with pytest.raises(ValueError, match="integer multiple"):
        coupling_triton.affine_coupling(
            x, h[..., :-1], weight, None, volume_norm="CVN", training=True
        )
    with pytest.raises(ValueError, match="CVN"):
        coupling_triton.affine_coupling(x, h, weight, running_mean, volume_norm="BN", training=True)


EXPORT_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from pyramidflow_kernels import coupling_triton as ct

    class Block(torch.nn.Module):
        def forward(self, x, h, w):
            z, m = ct.affine_coupling(x, h, w, None, volume_norm="SVN", training=True)
            return ct.affine_coupling_inverse(z, h, w, None, volume_norm="SVN", training=True), m

    args = (torch.randn(2, 16, 6, 10), torch.randn(2, 32, 12, 20), torch.randn(16, 16))
    graph = torch.export.export(Block(), args).graph
    print(sorted({str(n.target) for n in graph.nodes if n.op == "call_function"}))
    with FakeTensorMode():  # shapes only: nothing is launched
        x, h, w = (torch.randn(t.shape, requires_grad=True) for t in args)
        z, m = ct.affine_coupling(x, h, w, None, volume_norm="CVN", training=True)
        z.sum().backward()
        print("grads", tuple(x.grad.shape), tuple(h.grad.shape), tuple(w.grad.shape))
    """
)


def test_registered_ops_are_visible_to_export():
    """Without the interpreter the ops are torch.library triton_ops: export sees them as
    single nodes and their autograd traces (with fake tensors, so no GPU is needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pyramidflow.affine_coupling.default" in result.stdout
    assert "pyramidflow.affine_coupling_inverse.default" in result.stdout
    assert "grads (2, 16, 6, 10) (2, 32, 12, 20) (16, 16)" in result.stdout


def _randomize_parameter_nets(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.param_net[0], block.param_net[2]):
                layer.weight.copy_(0.05 * torch.randn(layer.weight.shape, generator=gen))


@pytest.mark.parametrize("volume_norm", ["CVN", "SVN"])
def test_training_step_with_triton_coupling_equals_torch(volume_norm):
    from pyramidflow.config import Config
    from pyramidflow.model.flow import PyramidFlow

    torch.manual_seed(0)
    config = Config(image_size=16, levels=3, stacks=1, channels=4, volume_norm=volume_norm)
    reference = PyramidFlow(config)
    _randomize_parameter_nets(reference, seed=5)
    reference.set_backend("torch")
    model = copy.deepcopy(reference).to(DEVICE)
    # Only the coupling runs in Triton: the pyramid and the loss stay on the torch path
    # so that this test checks the coupling alone inside the memory-saving flow.
    for block in model.blocks:
        block.backend = "triton"
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    inputs = {id(reference): images, id(model): images.to(DEVICE)}

    results = []
    for net in (reference, model):
        net.train()
        latents = net(inputs[id(net)])
        loss = net.loss(latents)
        loss.backward()
        results.append((latents, loss))
    (lat_ref, loss_ref), (lat, loss) = results
    for mine, ref in zip(lat, lat_ref, strict=True):
        assert relative_error(mine, ref) <= TOL
    assert relative_error(loss, loss_ref) <= TOL
    named_ref = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert relative_error(param.grad, named_ref[name].grad) <= TOL, name
            checked += 1
    assert checked > 0
    buffers_ref = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            assert relative_error(buffer, buffers_ref[name]) <= TOL, name
            assert buffer.abs().sum() > 0, name
    # eval mode subtracts those running means (strided views for CVN down blocks)
    with torch.no_grad():
        lat_ref = reference.eval()(images)
        lat = model.eval()(images.to(DEVICE))
    for mine, ref in zip(lat, lat_ref, strict=True):
        assert relative_error(mine, ref) <= TOL
