"""Memory-saving autograd for a sequence of coupling blocks.

:class:`InvertibleSequence` runs every block without keeping activations and saves only
the final latents (and the parameters, which cost no extra memory). Backward walks the
blocks in reverse: for each block it evaluates the parameter network once, with grad
enabled, on the conditioning levels (unchanged by the block, so identical to the
forward's). With that h, ``affine_coupling_recompute`` inverts the block (its VN batch
mean reduced once; SVN's, C numbers per block, kept from the forward) and runs the fused
coupling backward, whose grad h goes straight into the parameter network's graph: the
coupling itself is not re-run to get a graph.
Running statistics are updated in the forward only.

The latents are saved by a separate identity node (:class:`_KeepLatents`) whose backward
runs just before the walk and hands the latents and their gradients over: autograd then
drops its own references to both, so each latent and each incoming gradient is freed
as soon as the walk replaces it (unless the graph is retained or the caller still holds
the latents). Without this, one pyramid of latents and one of gradients would stay
pinned beside their replacements from the second stack on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .layers import CouplingBlock
from .tiling import (
    automatic_budget_mb,
    backward_block,
    forward_block,
    held_only_here,
    row_bands,
)


def _trainable(block: nn.Module) -> list[nn.Parameter]:
    return [p for p in block.parameters() if p.requires_grad]


class _Handover:
    """What :class:`_KeepLatents` passes to the flow's backward: the latents and their
    gradients, held by nothing else, so each can be freed as soon as it is replaced."""

    __slots__ = ("latents", "grads")

    def __init__(self) -> None:
        self.latents: list[torch.Tensor] | None = None
        self.grads: list[torch.Tensor | None] | None = None

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        if self.latents is None or self.grads is None:
            raise RuntimeError("the latents' backward did not run before the flow's backward")
        latents, grads = self.latents, self.grads
        self.latents = self.grads = None
        return latents, grads


class _KeepLatents(torch.autograd.Function):
    """Identity on the latents that holds them for the flow's backward.

    Autograd frees a node's saved tensors (unless the graph is retained) and the gradients
    it received as soon as that node's backward returns. This node's backward runs right
    before the flow's and hands both over, instead of returning the gradients: so the
    latents and their incoming gradients are not pinned for the whole reverse walk next to
    the reconstructed levels and the new gradients (a pyramid-sized buffer each).
    """

    @staticmethod
    def forward(ctx, handover, *latents):  # type: ignore[override]
        ctx.handover = handover
        ctx.save_for_backward(*latents)
        ctx.set_materialize_grads(False)
        return tuple(z.detach() for z in latents)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        ctx.handover.latents = [t.detach() for t in ctx.saved_tensors]
        # detached: a tensor of our own, so that whoever else keeps the gradient (a hook)
        # shows in its storage's use count and it is never overwritten (tiling.held_only_here)
        ctx.handover.grads = [None if g is None else g.detach() for g in grads]
        return (None,) * (1 + len(grads))


class _InvertibleSequenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, handover, observer, budget_mb, n_levels, *levels_and_params):  # type: ignore[override]
        levels = [t.detach() for t in levels_and_params[:n_levels]]
        with torch.no_grad():
            levels, ctx.batch_means = _run_blocks(blocks, levels, budget_mb)
        ctx.blocks, ctx.handover, ctx.n_levels = blocks, handover, n_levels
        ctx.observer, ctx.budget_mb = observer, budget_mb
        ctx.save_for_backward(*levels_and_params[n_levels:])
        ctx.set_materialize_grads(False)
        return tuple(levels)

    @staticmethod
    def backward(ctx, *_unused):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "memory='recompute' supports one backward pass only (no create_graph / "
                "double backward); use memory='store' for higher-order gradients"
            )
        n_levels, blocks = ctx.n_levels, ctx.blocks
        needs_input_grad = ctx.needs_input_grad[5 : 5 + n_levels]
        levels, grad_latents = ctx.handover.take()
        live_at_input = _live_levels(blocks, needs_input_grad)
        grads: list[torch.Tensor | None] = [
            torch.zeros_like(level) if g is None else g
            for level, g in zip(levels, grad_latents, strict=True)
        ]
        # Tensors this walk may update in place: those it allocates, and the latents and
        # gradients it was handed when nothing else holds them (a caller may).
        owned_levels = {i for i, z in enumerate(levels) if held_only_here(z)}
        owned_grads = {i for i, g in enumerate(grad_latents) if g is None or held_only_here(g)}
        del grad_latents
        param_grads: list[torch.Tensor | None] = []
        walk = zip(reversed(blocks), reversed(live_at_input), reversed(ctx.batch_means),
                   strict=True)  # fmt: skip
        for block, live, batch_mean in walk:
            bands = row_bands(block, levels, ctx.budget_mb)
            if bands is not None:
                param_grads[:0] = backward_block(
                    block, levels, grads, live, bands, owned_levels, owned_grads
                )
                if ctx.observer is not None:
                    ctx.observer(block)
                continue
            target = block.target
            with torch.enable_grad():
                conditioned = list(levels)
                cond_inputs = []
                for index in block.conditions:
                    if live[index]:
                        conditioned[index] = levels[index].detach().requires_grad_(True)
                        cond_inputs.append((index, conditioned[index]))
                # z, its gradient, h and the mixing weight go in unnamed (Python 3.11+
                # hands a call's argument references to the callee): the call frees z and
                # grad z once x and grad x exist, and h and the weight before their graphs
                # run backward
                x, grad_x, results = block.transform_backward(
                    _take(levels, target), _take(grads, target),
                    _parameters_releasing(block, conditioned), block.mixing.weight(),
                    block.running_mean_view(),
                    [leaf for _, leaf in cond_inputs] + _trainable(block), batch_mean,
                )  # fmt: skip
            levels[target] = x
            owned_levels.add(target)
            grads[target] = grad_x if live[target] else None
            owned_grads.add(target)
            for index, _ in cond_inputs:
                g = results.pop(0)
                if g is not None:
                    grads[index] = g if grads[index] is None else grads[index] + g
                    owned_grads.add(index)
            param_grads[:0] = results
            del results, cond_inputs, x, grad_x
            if ctx.observer is not None:
                ctx.observer(block)
        input_grads = [
            g if needed else None for g, needed in zip(grads, needs_input_grad, strict=True)
        ]
        return (None, None, None, None, None, *input_grads, *param_grads)


def _take(tensors: list, index: int) -> torch.Tensor:
    """``tensors[index]``, leaving None in its place."""
    taken, tensors[index] = tensors[index], None
    return taken


def _parameters_releasing(block: CouplingBlock, conditioned: list) -> torch.Tensor:
    """``block.parameters_for(conditioned)``, then ``conditioned`` emptied (it holds the
    target level too, which the walk is about to free)."""
    h = block.parameters_for(conditioned)
    conditioned.clear()
    return h


def _run_blocks(
    blocks: Sequence[CouplingBlock], levels: list[torch.Tensor], budget_mb: int
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Apply the blocks without autograd, in row bands where the budget asks for them;
    returns the levels and, per block, the VN batch mean it kept (or None)."""
    owned: set[int] = set()
    kept_means: list[torch.Tensor | None] = []
    for block in blocks:
        bands = row_bands(block, levels, budget_mb)
        if bands is None:
            levels = block(levels, update_stats=True, kept_means=kept_means)
            owned.add(block.target)
        else:
            levels = list(levels)
            forward_block(block, levels, bands, owned, update_stats=True)
            kept_means.append(None)
    return levels, kept_means


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
        # Called with each block right after its backward in recompute mode (the memory
        # profile of bench/memory_phases.py reads the peak per block through it).
        self.backward_observer: Callable[[CouplingBlock], None] | None = None
        # MiB per row band (pyramidflow.model.tiling); None: automatic, 0: never tile.
        self.memory_budget: int | None = None

    def budget_mb(self, device: torch.device) -> int:
        """The band budget in effect on ``device``."""
        if self.memory_budget is None:
            return automatic_budget_mb(device)
        return self.memory_budget

    def forward(
        self, levels: Sequence[torch.Tensor], memory: str = "recompute"
    ) -> list[torch.Tensor]:
        """Transform the pyramid levels into latents."""
        params = [p for block in self.blocks for p in _trainable(block)]
        needs_graph = torch.is_grad_enabled() and (
            any(p.requires_grad for p in params) or any(t.requires_grad for t in levels)
        )
        if memory == "recompute" and needs_graph:
            handover = _Handover()
            out = _InvertibleSequenceFunction.apply(
                tuple(self.blocks),
                handover,
                self.backward_observer,
                self.budget_mb(levels[0].device),
                len(levels),
                *levels,
                *params,
            )
            return list(_KeepLatents.apply(handover, *out))
        if memory not in ("recompute", "store"):
            raise ValueError(f"memory must be 'recompute' or 'store', got {memory!r}")
        if not needs_graph:
            return _run_blocks(self.blocks, list(levels), self.budget_mb(levels[0].device))[0]
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
