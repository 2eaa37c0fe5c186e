"""Memory-saving autograd for a sequence of coupling blocks.

:class:`InvertibleSequence` runs every block without keeping activations and saves only
the final latents (and the parameters, which cost no extra memory). Backward walks the
blocks in reverse: for each block it evaluates the parameter network once, with grad
enabled, on the conditioning levels (unchanged by the block, so identical to the
forward's); the same (s, t) invert the block and carry the local graph that is
back-propagated. Running statistics are updated in the forward only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import CouplingBlock


def _trainable(block: nn.Module) -> list[nn.Parameter]:
    return [p for p in block.parameters() if p.requires_grad]


class _InvertibleSequenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, n_levels, *levels_and_params):  # type: ignore[override]
        levels = [t.detach() for t in levels_and_params[:n_levels]]
        with torch.no_grad():
            for block in blocks:
                levels = block(levels, update_stats=True)
        ctx.blocks = blocks
        ctx.n_levels = n_levels
        ctx.save_for_backward(*levels, *levels_and_params[n_levels:])
        return tuple(levels)

    @staticmethod
    def backward(ctx, *grad_latents):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "memory='recompute' supports one backward pass only (no create_graph / "
                "double backward); use memory='store' for higher-order gradients"
            )
        n_levels, blocks = ctx.n_levels, ctx.blocks
        levels = [t.detach() for t in ctx.saved_tensors[:n_levels]]
        live_at_input = _live_levels(blocks, ctx.needs_input_grad[2 : 2 + n_levels])
        grads: list[torch.Tensor | None] = [
            torch.zeros_like(level) if g is None else g
            for level, g in zip(levels, grad_latents, strict=True)
        ]
        param_grads: list[torch.Tensor | None] = []
        for block, live in zip(reversed(blocks), reversed(live_at_input), strict=True):
            params = _trainable(block)
            with torch.enable_grad():
                conditioned = list(levels)
                cond_inputs = []
                for index in block.conditions:
                    if live[index]:
                        conditioned[index] = levels[index].detach().requires_grad_(True)
                        cond_inputs.append((index, conditioned[index]))
                h = block.parameters_for(conditioned)
                with torch.no_grad():
                    x = block.untransform(levels[block.target], h)
                x_leaf = x.detach().requires_grad_(live[block.target])
                z = block.transform(x_leaf, h, update_stats=False)
                wrt = [x_leaf] if live[block.target] else []
                wrt += [leaf for _, leaf in cond_inputs] + params
                results = (
                    list(torch.autograd.grad(z, wrt, grads[block.target], allow_unused=True))
                    if wrt
                    else []
                )
            levels[block.target] = x
            grads[block.target] = results.pop(0) if live[block.target] else None
            for index, _ in cond_inputs:
                g = results.pop(0)
                if g is not None:
                    grads[index] = g if grads[index] is None else grads[index] + g
            param_grads[:0] = results
            del h, z, results
        input_grads = [
            g if needed else None
            for g, needed in zip(grads, ctx.needs_input_grad[2 : 2 + n_levels], strict=True)
        ]
        return (None, None, *input_grads, *param_grads)


def _live_levels(
    blocks: Sequence[CouplingBlock], inputs_need_grad: Sequence[bool]
) -> list[list[bool]]:
    """Per block, which levels at its input carry a gradient back to something that needs
    one: an input level that requires grad, or a level some earlier block transformed."""
    live = list(inputs_need_grad)
    per_block = []
    for block in blocks:
        per_block.append(list(live))
        live[block.target] = True
    return per_block


class InvertibleSequence(nn.Module):
    """Runs coupling blocks in order; ``memory='recompute'`` keeps activation memory
    constant in depth, ``'store'`` is plain autograd (kept for speed and higher-order
    gradients)."""

    def __init__(self, blocks: Sequence[CouplingBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, levels: Sequence[torch.Tensor], memory: str = "recompute"
    ) -> list[torch.Tensor]:
        """Transform the pyramid levels into latents."""
        params = [p for block in self.blocks for p in _trainable(block)]
        needs_graph = torch.is_grad_enabled() and (
            any(p.requires_grad for p in params) or any(t.requires_grad for t in levels)
        )
        if memory == "recompute" and needs_graph:
            out = _InvertibleSequenceFunction.apply(
                tuple(self.blocks), len(levels), *levels, *params
            )
            return list(out)
        if memory not in ("recompute", "store"):
            raise ValueError(f"memory must be 'recompute' or 'store', got {memory!r}")
        levels = list(levels)
        for block in self.blocks:
            levels = block(levels)
        return levels

    def inverse(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Undo all blocks, last first."""
        levels = list(latents)
        for block in reversed(self.blocks):
            levels = block.inverse(levels)
        return levels
