"""Triton Fourier loss and anomaly map against the torch reference, forward and backward.

Runs in Triton's CPU interpreter unless TRITON_INTERPRET=0 is set on a CUDA machine.
The reference runs in float64 (upcast inputs); the Triton kernels run in float32 and
must agree to a relative RMS error of 1e-5 for the outputs and every gradient.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton does not import: the Triton kernels cannot run")

import pyramidflow_kernels  # noqa: E402
from conftest import op_test_device  # noqa: E402
from pyramidflow_kernels import loss_map_reference, loss_map_triton  # noqa: E402
from pyramidflow_kernels.testing import relative_error  # noqa: E402

TOL = 1e-5
DEVICE = op_test_device()  # conftest.py: --device

# (B, C, H, W, levels): B >= 2 for the loss; odd coarse sizes (24x40 at L=4 ends at 3x5)
SHAPES = [(2, 3, 24, 40, 2), (3, 16, 48, 80, 5), (3, 3, 24, 40, 4)]


def pyramid(batch, channels, height, width, levels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, height >> i, width >> i, generator=gen).to(DEVICE)
        for i in range(levels)
    ]


def leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize(("height", "width"), [(6, 8), (5, 7), (4, 1), (3, 2)])
def test_rfft2_adjoint_matches_autograd(height, width):
    gen = torch.Generator().manual_seed(height * width)
    x = torch.randn(2, height, width, dtype=torch.float64, generator=gen, requires_grad=True)
    spectrum = torch.fft.rfft2(x)
    grad = torch.randn(spectrum.shape, dtype=spectrum.dtype, generator=gen)
    (expected,) = torch.autograd.grad(spectrum, x, grad)
    assert torch.allclose(loss_map_triton.rfft2_adjoint(grad, width), expected, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fourier_loss_and_gradients_match_reference(shape):
    latents = pyramid(*shape)
    ours, theirs = leaves(latents), leaves(latents, torch.float64)
    loss = loss_map_triton.fourier_loss(ours)
    loss_ref = loss_map_reference.fourier_loss(theirs)
    assert loss.shape == () and loss.dtype == latents[0].dtype
    assert relative_error(loss, loss_ref) <= TOL
    loss.backward()
    loss_ref.backward()
    for level, (mine, expected) in enumerate(zip(ours, theirs, strict=True)):
        assert relative_error(mine.grad, expected.grad) <= TOL, f"grad of level {level}"


def test_fourier_loss_in_float64():
    latents = leaves(pyramid(2, 3, 16, 24, 3, seed=3), torch.float64)
    reference = leaves(latents)
    loss = loss_map_triton.fourier_loss(latents)
    loss_ref = loss_map_reference.fourier_loss(reference)
    assert loss.dtype == torch.float64
    assert relative_error(loss, loss_ref) <= 1e-12
    loss.backward()
    loss_ref.backward()
    assert all(
        relative_error(a.grad, b.grad) <= 1e-10 for a, b in zip(latents, reference, strict=True)
    )


# the pair kernels take image blocks of up to 8: B = 9 and 17 end with a partial block
@pytest.mark.parametrize("batch", [3, 9, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_pair_differences_and_their_gradient_match_torch(batch, dtype):
    gen = torch.Generator().manual_seed(batch)
    z = torch.randn(batch, 3, 4, 6, dtype=torch.float64, generator=gen)
    first, second = loss_map_reference.pair_indices(batch, z.device)
    exact = z.clone().requires_grad_(True)
    expected = ((exact[first] - exact[second]) ** 2).mean(dim=1, keepdim=True)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    (expected_grad,) = torch.autograd.grad(expected, exact, upstream)
    z_ours = z.to(dtype).to(DEVICE)
    ours = loss_map_triton.pair_sq_diff_launch(z_ours)
    grad = loss_map_triton.pair_sq_diff_grad_launch(upstream.to(dtype).to(DEVICE), z_ours)
    tol = TOL if dtype == torch.float32 else 1e-12
    assert ours.shape == expected.shape and ours.dtype == dtype
    assert relative_error(ours, expected) <= tol
    assert relative_error(grad, expected_grad) <= tol


def test_identical_images_give_zero_loss_and_finite_zero_gradient():
    first = pyramid(1, 3, 16, 16, 3, seed=4)
    latents = leaves([torch.cat([z, z]) for z in first])
    loss = loss_map_triton.fourier_loss(latents)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.equal(z.grad, torch.zeros_like(z)) for z in latents)


def test_fourier_loss_needs_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        loss_map_triton.fourier_loss(pyramid(1, 3, 8, 8, 2))


# 19 images: the |z - T| kernel takes 16 images per program, so one full and one partial
ANOMALY_SHAPES = [*SHAPES, (19, 3, 16, 24, 2)]


@pytest.mark.parametrize("shape", ANOMALY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("template_batch_dim", [True, False], ids=["1CHW", "CHW"])
def test_anomaly_map_and_score_match_reference(shape, template_batch_dim):
    latents = pyramid(*shape)
    template = [z[0] + 0.5 for z in pyramid(1, *shape[1:], seed=9)]
    if template_batch_dim:
        template = [t[None] for t in template]
    amap, score = loss_map_triton.anomaly_map(latents, template)
    amap_ref, score_ref = loss_map_reference.anomaly_map(
        [z.double() for z in latents], [t.double() for t in template]
    )
    assert amap.shape == (shape[0], shape[2], shape[3]) and score.shape == (shape[0],)
    assert relative_error(amap, amap_ref) <= TOL
    assert relative_error(score, score_ref) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_anomaly_map_propagates_nan_as_torch(dtype):
    """A NaN latent makes its image's map NaN where the torch backend's is, and its score
    NaN (``tl.max`` alone would drop it); the other images keep finite maps and scores."""
    latents = [z.to(dtype) for z in pyramid(3, 3, 16, 24, 3, seed=5)]
    latents[1][1, 2, 3, 4] = float("nan")  # image 1, at a coarser level
    latents[0][2, :, 7, 9] = float("nan")  # image 2, every channel of one fine pixel
    template = [z[0].to(dtype) for z in pyramid(1, 3, 16, 24, 3, seed=6)]
    amap, score = loss_map_triton.anomaly_map(latents, template)
    amap_ref, score_ref = loss_map_reference.anomaly_map(
        [z.double() for z in latents], [t.double() for t in template]
    )
    nan = torch.isnan(amap_ref)
    assert torch.equal(torch.isnan(amap), nan) and torch.equal(
        torch.isnan(score), score_ref.isnan()
    )
    assert torch.equal(score_ref.isnan(), torch.tensor([False, True, True], device=score.device))
    tol = TOL if dtype == torch.float32 else 1e-12
    assert relative_error(amap[~nan], amap_ref[~nan]) <= tol
    assert relative_error(score[0], score_ref[0]) <= tol


def test_anomaly_map_is_inference_only():
    latents = leaves(pyramid(2, 3, 8, 8, 2))
    template = [torch.zeros_like(z[0]) for z in latents]
    with pytest.raises(RuntimeError, match="inference only"):
        loss_map_triton.anomaly_map(latents, template)
    with torch.no_grad():
        amap, _ = loss_map_triton.anomaly_map(latents, template)
    assert amap.shape == (2, 8, 8)


def test_public_ops_dispatch_to_triton(monkeypatch):
    latents = pyramid(2, 3, 16, 16, 2)
    template = [z[0] for z in pyramid(1, 3, 16, 16, 2, seed=1)]
    calls = []
    real_loss, real_map = loss_map_triton.fourier_loss, loss_map_triton.anomaly_map
    monkeypatch.setattr(
        loss_map_triton, "fourier_loss", lambda z: calls.append("loss") or real_loss(z)
    )
    monkeypatch.setattr(
        loss_map_triton, "anomaly_map", lambda z, t: calls.append("map") or real_map(z, t)
    )
    monkeypatch.setenv("PYRAMIDFLOW_BACKEND", "triton")
    loss = pyramidflow_kernels.fourier_loss(latents)
    amap, _ = pyramidflow_kernels.anomaly_map(latents, template)
    assert calls == ["loss", "map"]
    assert relative_error(loss, pyramidflow_kernels.fourier_loss(latents, backend="torch")) <= TOL
    assert (
        relative_error(amap, pyramidflow_kernels.anomaly_map(latents, template, backend="torch")[0])
        <= TOL
    )
