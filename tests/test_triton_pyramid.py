"""Triton pyramid decompose / compose against the torch reference, forward and backward.

Runs in Triton's CPU interpreter unless TRITON_INTERPRET=0 is set on a CUDA machine.
The reference runs in float64 (upcast inputs); the Triton kernels run in float32 and
must agree to a relative RMS error of 1e-5 for the output and every gradient.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton", reason="Triton does not import: the Triton kernels cannot run")

import pyramidflow_kernels  # noqa: E402
from conftest import op_test_device  # noqa: E402
from pyramidflow_kernels import pyramid_reference, pyramid_triton  # noqa: E402
from pyramidflow_kernels.testing import relative_error  # noqa: E402

TOL = 1e-5
DEVICE = op_test_device()  # conftest.py: --device

# (B, C, H, W, levels): odd coarse sizes on purpose (24x40 at L=4 ends at 3x5)
SHAPES = [(1, 3, 24, 40, 2), (3, 16, 48, 80, 5), (2, 3, 24, 40, 4)]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def check_decompose(shape, seed=0):
    batch, channels, height, width, levels = shape
    x = randn(batch, channels, height, width, seed=seed)
    ours, theirs = leaf(x), leaf(x, torch.float64)
    bands = pyramid_triton.pyramid_decompose(ours, levels)
    bands_ref = pyramid_reference.decompose(theirs, levels)
    assert len(bands) == levels
    for level, (band, ref) in enumerate(zip(bands, bands_ref, strict=True)):
        assert band.shape == ref.shape and band.dtype == x.dtype
        assert relative_error(band, ref) <= TOL, f"band {level}"
    grads = [randn(*b.shape, seed=seed + 10 + i) for i, b in enumerate(bands)]
    torch.autograd.backward(bands, grads)
    torch.autograd.backward(bands_ref, [g.double() for g in grads])
    assert relative_error(ours.grad, theirs.grad) <= TOL


def check_compose(shape, seed=0):
    batch, channels, height, width, levels = shape
    bands = [randn(batch, channels, height >> i, width >> i, seed=seed + i) for i in range(levels)]
    ours = [leaf(b) for b in bands]
    theirs = [leaf(b, torch.float64) for b in bands]
    out = pyramid_triton.pyramid_compose(ours)
    ref = pyramid_reference.compose(theirs)
    assert out.shape == ref.shape and out.dtype == bands[0].dtype
    assert relative_error(out, ref) <= TOL
    grad = randn(*out.shape, seed=seed + 100)
    out.backward(grad)
    ref.backward(grad.double())
    for level, (mine, expected) in enumerate(zip(ours, theirs, strict=True)):
        assert relative_error(mine.grad, expected.grad) <= TOL, f"grad of band {level}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decompose_and_its_gradient_match_reference(shape):
    check_decompose(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compose_and_its_gradient_match_reference(shape):
    check_compose(shape)


@settings(max_examples=5, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 3),
    levels=st.integers(2, 3),
    coarse_h=st.integers(1, 5),
    coarse_w=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_random_shapes_match_reference(batch, channels, levels, coarse_h, coarse_w, seed):
    step = 2 ** (levels - 1)
    shape = (batch, channels, coarse_h * step, coarse_w * step, levels)
    check_decompose(shape, seed)
    check_compose(shape, seed)


def test_compose_inverts_decompose_in_float64():
    x = randn(2, 3, 24, 40, seed=5).double()
    bands = pyramid_triton.pyramid_decompose(x, 4)
    assert all(b.dtype == torch.float64 for b in bands)
    assert relative_error(pyramid_triton.pyramid_compose(bands), x) <= 1e-12


def test_up_adjoint_is_the_adjoint_of_up():
    coarse = randn(1, 3, 6, 10, seed=6).double()
    fine = randn(1, 3, 12, 20, seed=7).double()
    lhs = (pyramid_triton.up_add(coarse, None) * fine).sum()
    rhs = (coarse * pyramid_triton.up_adjoint(fine)).sum()
    assert abs((lhs - rhs).item()) <= 1e-12 * abs(lhs.item())
    # and Up itself is the reference's pixel replication followed by the blur
    assert (
        relative_error(pyramid_triton.up_add(coarse, None), pyramid_reference.up(coarse)) <= 1e-12
    )


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        pyramid_triton.pyramid_decompose(randn(1, 1, 20, 24), 4)
    with pytest.raises(ValueError, match="level sizes"):
        pyramid_triton.pyramid_compose([randn(1, 1, 8, 8), randn(1, 1, 3, 4)])


def test_public_ops_dispatch_to_triton(monkeypatch):
    bands = [randn(1, 2, 16, 16), randn(1, 2, 8, 8)]
    calls = []
    real = pyramid_triton.pyramid_compose

    def spy(arg):
        calls.append(arg)
        return real(arg)

    monkeypatch.setattr(pyramid_triton, "pyramid_compose", spy)
    monkeypatch.setenv("PYRAMIDFLOW_BACKEND", "triton")
    out = pyramidflow_kernels.pyramid_compose(bands)
    assert len(calls) == 1
    assert relative_error(out, pyramidflow_kernels.pyramid_compose(bands, backend="torch")) <= TOL
    assert len(pyramidflow_kernels.pyramid_decompose(bands[0], 2)) == 2


def test_ops_are_registered_with_torch_library():
    for name in ("pyramid_down", "pyramid_up_add", "pyramid_up_adjoint"):
        assert hasattr(torch.ops.pyramidflow, name)
    x = randn(1, 1, 8, 8)
    assert torch.equal(torch.ops.pyramidflow.pyramid_down(x), pyramid_triton.down(x))


def tied_images() -> dict[str, torch.Tensor]:
    """Images whose blurred 2x2 blocks tie exactly away from the border: constant, constant
    along rows (left and right tie), constant along columns (top and bottom tie)."""
    ramp = torch.arange(16, dtype=torch.float64)
    return {
        "constant": torch.full((1, 2, 16, 24), 0.75, dtype=torch.float64),
        "rows": (ramp[:, None] * 0.1).expand(1, 2, 16, 24).contiguous(),
        "columns": (torch.arange(24.0, dtype=torch.float64) * 0.1).expand(1, 2, 16, 24),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["constant", "rows", "columns"])
def test_down_gradient_takes_the_first_of_tied_pixels_as_torch(kind, dtype):
    """Max-pool ties: the Triton backward routes each coarse gradient to the first maximal
    pixel in row-major order, as torch's max_pool2d (the torch backend) does."""
    x = tied_images()[kind].to(DEVICE).contiguous()
    grad = randn(1, 2, 8, 12, seed=1)
    ours, theirs = leaf(x, dtype), leaf(x)
    pyramid_triton.down(ours).backward(grad.to(dtype))
    pyramid_reference.down(theirs).backward(grad.double())
    assert relative_error(ours.grad, theirs.grad) <= (TOL if dtype == torch.float32 else 1e-12)
    if kind == "constant":  # interior blocks tie 4 ways: all of it goes to the top left
        routed = pyramid_triton.window_launch(x, pyramid_triton.MODE_ROUTE, torch.ones_like(grad))
        interior = routed[..., 4:-4, 4:-4].reshape(1, 2, 4, 2, 8, 2)
        assert torch.equal(interior[:, :, :, 0, :, 0], torch.ones_like(interior[:, :, :, 0, :, 0]))
        assert interior.sum() == interior[:, :, :, 0, :, 0].sum()


def with_nans(*shape: int, seed: int) -> torch.Tensor:
    x = randn(*shape, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x.view(-1)[torch.randperm(x.numel(), generator=gen)[:3]] = float("nan")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decompose_propagates_nan_as_torch(dtype):
    """A NaN reaches every band the torch backend's max-pool carries it to (``tl.maximum``
    alone would drop it), and the gradient is routed to the NaN as torch does."""
    x = with_nans(2, 3, 16, 24, seed=3)
    ours, theirs = leaf(x, dtype), leaf(x, torch.float64)
    bands = pyramid_triton.pyramid_decompose(ours, 3)
    expected = pyramid_reference.decompose(theirs, 3)
    tol = TOL if dtype == torch.float32 else 1e-12
    for level, (band, ref) in enumerate(zip(bands, expected, strict=True)):
        nan = torch.isnan(ref)
        assert nan.any() and torch.equal(torch.isnan(band), nan), f"NaNs of band {level}"
        assert relative_error(band[~nan], ref[~nan]) <= tol, f"band {level}"
    # Down alone: a band's gradient also flows through Up's adjoint, a blur of the band's
    # NaN-free gradient, but the max-pool's routing is what NaNs can change
    grad = randn(2, 3, 8, 12, seed=20)
    pyramid_triton.down(ours).backward(grad.to(dtype))
    pyramid_reference.down(theirs).backward(grad.double())
    assert torch.isfinite(theirs.grad).all()
    assert relative_error(ours.grad, theirs.grad) <= tol
