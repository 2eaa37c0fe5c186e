"""Float32 accuracy of the flow's gradients, measured against float64.

The parameter networks use LeakyReLU, whose derivative jumps from 1 to 0.01 at zero. A
pre-activation within float32 rounding of zero (|a| ~ 1e-7 of its scale; about one in
10^7 of them) can land on the other side of the kink than in float64, and the float32
gradient then uses the other slope for that element. One such flip among ~10^6
pre-activations of a 128 px block moves the parameter gradients by ~1e-3 relative: it
is not rounding amplified by an unstable formula but a different (and equally valid)
branch of a piecewise-linear function. Recompute mode re-evaluates the parameter
networks on reconstructed levels (within ~3e-7 of the forward's), so its branch
decisions can differ from the forward's, and from store mode's, in the same way.

So the well-posed comparison is float32 against float64 of the *same computation*: the
float64 run takes the activation pattern (the sign of every pre-activation) that the
float32 run used to build its gradients. :func:`float32_gradient_error` reports both
that error and the plain one, with the number of flipped pre-activations.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from pyramidflow_kernels.testing import relative_error
from torch import nn

from .flow import PyramidFlow

Pattern = dict[int, torch.Tensor]


def latent_objective(latents: Sequence[torch.Tensor], seed: int = 2) -> torch.Tensor:
    """A fixed random linear + quadratic scalar of the latents. The weights are drawn in
    float64 whatever the latents' dtype, so float32 and float64 runs optimise the same
    function."""
    gen = torch.Generator().manual_seed(seed)
    total = latents[0].new_zeros(())
    for z in latents:
        weights = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        total = total + (weights.to(z) * z).sum() + 0.1 * (z * z).mean()
    return total


@contextmanager
def recorded_activation_pattern(model: PyramidFlow) -> Iterator[Pattern]:
    """Record, per block, which pre-activations of its parameter network were positive in
    the evaluation that built the gradient graph (the forward's in store mode, the
    backward's in recompute mode: evaluations under no_grad are not recorded)."""
    pattern: Pattern = {}
    handles = []
    for index, block in enumerate(model.blocks):

        def keep(_module, _inputs, output, index=index):
            if torch.is_grad_enabled():
                pattern[index] = (output > 0).detach().clone()

        handles.append(block.param_net[0].register_forward_hook(keep))
    try:
        yield pattern
    finally:
        for handle in handles:
            handle.remove()


class _PatternedLeakyReLU(nn.Module):
    """LeakyReLU whose branch per element is given instead of read off the sign."""

    def __init__(self, positive: torch.Tensor, negative_slope: float) -> None:
        super().__init__()
        self.positive, self.negative_slope = positive, negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.positive, x, self.negative_slope * x)


def with_activation_pattern(model: PyramidFlow, pattern: Pattern) -> PyramidFlow:
    """A copy of ``model`` whose parameter networks follow a recorded activation pattern
    (each block's network must be evaluated with grad once, at the recorded shape)."""
    copied = copy.deepcopy(model)
    for index, block in enumerate(copied.blocks):
        if index in pattern:
            slope = block.param_net[1].negative_slope
            block.param_net[1] = _PatternedLeakyReLU(pattern[index], slope)
    return copied


@dataclasses.dataclass(frozen=True)
class GradientError:
    """Float32 gradients against float64: ||g32 - g64|| / ||g64||."""

    overall: float  # all parameters together, against float64 of the same branches
    per_tensor: dict[str, float]  # each parameter alone, same reference
    overall_plain: float  # all parameters together, against the plain float64 run
    kink_flips: int  # pre-activations on the other side of zero than in float64


def _gradients(
    model: PyramidFlow,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    memory: str,
    objective: Callable[[Sequence[torch.Tensor]], torch.Tensor],
) -> tuple[list[str], list[torch.Tensor]]:
    dtype = next(model.parameters()).dtype
    model.config.memory = memory
    if isinstance(inputs, torch.Tensor):
        latents = model(inputs.to(dtype))
    else:
        latents = model.flow([t.detach().to(dtype) for t in inputs], memory=memory)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(objective(latents), [p for _, p in named])
    return [name for name, _ in named], [g.detach().double() for g in grads]


def float32_gradient_error(
    model: PyramidFlow,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    memory: str,
    objective: Callable[[Sequence[torch.Tensor]], torch.Tensor] = latent_objective,
) -> GradientError:
    """Gradients of ``objective(latents)`` w.r.t. every trainable parameter in float32
    (``memory`` mode) against float64 of the same model, inputs and objective.

    ``inputs``: an image batch (through the whole model) or pyramid levels (into
    ``model.flow``). ``model`` is not modified (its running statistics included).
    """
    # The pattern hooks see whole-image parameter networks: run untiled (row bands give
    # the same sums, pyramidflow.model.tiling, but call the convolutions per band).
    model = copy.deepcopy(model)
    model.set_memory_budget(0)
    model32 = copy.deepcopy(model).float()
    with recorded_activation_pattern(model32) as pattern:
        names, g32 = _gradients(model32, inputs, memory, objective)
    model64 = copy.deepcopy(model).double()
    with recorded_activation_pattern(model64) as plain_pattern:
        _, g64_plain = _gradients(model64, inputs, "store", objective)
    matched = with_activation_pattern(model, pattern).double()
    _, g64 = _gradients(matched, inputs, "store", objective)
    flips = sum(int((pattern[i] != plain_pattern[i]).sum()) for i in pattern)
    per_tensor = {name: relative_error(a, e) for name, a, e in zip(names, g32, g64, strict=True)}
    return GradientError(
        overall=relative_error(g32, g64),
        per_tensor=per_tensor,
        overall_plain=relative_error(g32, g64_plain),
        kink_flips=flips,
    )
