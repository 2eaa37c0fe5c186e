"""The building blocks of PyramidFlow: input projection, 1x1 mixing, coupling blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyramidflow_kernels as ops
import torch
import torch.nn.functional as F
from pyramidflow_kernels.coupling_reference import soft_clamp, vn_dims
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .precision import backward_scope, conv_scope, parameter_output


class InputProjection(nn.Module):
    """Frozen 1x1 convolution in -> C (orthogonal init, no bias), semi-invertible."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        weight = torch.empty(channels, in_channels, 1, 1)
        nn.init.orthogonal_(weight)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, C, H, W), never tracked by autograd."""
        with torch.no_grad():
            return F.conv2d(images, self.weight)

    def inverse(self, features: torch.Tensor) -> torch.Tensor:
        """Least-squares preimage: (B, C, H, W) -> (B, in, H, W) via the pseudo-inverse."""
        pinv = torch.linalg.pinv(self.weight[:, :, 0, 0].double()).to(features.dtype)
        return torch.einsum("ic,bchw->bihw", pinv, features)


class InvertibleConv1x1(nn.Module):
    """Glow LU 1x1 convolution with volume normalization: |det W| = 1.

    W = P (L_strict + I) (U_strict + diag(sign * exp(w_s - mean(w_s)))); buffer and
    parameter names follow the authors' code so their weights map one to one.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diagonal = torch.diagonal(upper)
        u_mask = torch.triu(torch.ones(channels, channels), diagonal=1)
        self.register_buffer("w_p", p.float())
        self.register_buffer("u_mask", u_mask)
        self.register_buffer("l_mask", u_mask.T.contiguous())
        self.register_buffer("s_sign", torch.sign(diagonal).float())
        self.register_buffer("l_eye", torch.eye(channels))
        self.w_l = nn.Parameter(lower.float())
        self.w_s = nn.Parameter(diagonal.abs().log().float())
        self.w_u = nn.Parameter(torch.triu(upper, diagonal=1).float())

    def weight(self) -> torch.Tensor:
        """The (C, C) mixing matrix."""
        log_diag = self.w_s - self.w_s.mean()
        lower = self.w_l * self.l_mask + self.l_eye
        upper = self.w_u * self.u_mask + torch.diag(self.s_sign * torch.exp(log_diag))
        return self.w_p @ lower @ upper


Levels = list[torch.Tensor]
RowFetch = Callable[[int, int, int], torch.Tensor]


def _pad_rows(x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    """x with zero rows above and below (x itself, not a copy, when there are none)."""
    return F.pad(x, (0, 0, top, bottom)) if top or bottom else x


def _conv_layout(condition: torch.Tensor) -> torch.Tensor:
    """The parameter network's input in channels-last order on CPU and CUDA. oneDNN
    convolves channels-last tensors as they are (NCHW ones are reordered to its blocked
    layout first: activation-sized buffers in every backward, and time); cuDNN's fastest
    (tensor-core) kernels are NHWC ones. Same values up to float rounding."""
    if condition.device.type in ("cpu", "cuda"):
        return condition.contiguous(memory_format=torch.channels_last)
    return condition


def _nearest_rows(
    fetch: RowFetch, index: int, sizes: Sequence[tuple[int, int]], size: tuple[int, int],
    r0: int, r1: int,
) -> torch.Tensor:  # fmt: skip
    """Rows [r0, r1) of ``F.interpolate(level index, size)`` (nearest, factor 2^n either
    way), from the rows of the level they copy."""
    height = sizes[index][0]
    if height >= size[0]:
        step = height // size[0]
        return F.interpolate(fetch(index, r0 * step, r1 * step), size=(r1 - r0, size[1]))
    step = size[0] // height
    q0, q1 = r0 // step, -(-r1 // step)
    rows = F.interpolate(fetch(index, q0, q1), size=((q1 - q0) * step, size[1]))
    return rows[..., r0 - q0 * step : r1 - q0 * step, :]


class CouplingBlock(nn.Module):
    """One pyramid coupling block: transforms one level conditioned on its neighbours.

    kind ``up`` (levels j, j+1; transforms j from nearest-up x[j+1]), ``down`` (transforms
    j+1 from x[j], parameters picked at even pixels), ``dual`` (transforms j+1 from
    [nearest x[j], nearest x[j+2]]). The conditioning levels pass through unchanged, so
    :meth:`parameters_for` gives the same output before and after the block.
    """

    def __init__(
        self,
        kind: str,
        start: int,
        channels: int,
        kernel_size: int,
        volume_norm: str,
        param_hw: tuple[int, int],
        clamp: float = 2.0,
        strided_down: bool = True,
        backend: str = "auto",
        conv_precision: str = "fp32",
    ) -> None:
        super().__init__()
        if kind not in ("up", "down", "dual"):
            raise ValueError(f"unknown block kind {kind!r}")
        self.kind, self.start, self.clamp = kind, start, clamp
        self.volume_norm, self.backend = volume_norm, backend
        self.conv_precision = conv_precision  # pyramidflow.model.precision
        self.target = start if kind == "up" else start + 1
        self.conditions = {"up": (start + 1,), "down": (start,), "dual": (start, start + 2)}[kind]
        in_channels = 2 * channels if kind == "dual" else channels
        pad = kernel_size // 2
        # The down block only reads its parameters at even pixels; with CVN the batch
        # mean is per pixel, so a stride-2 second conv gives exactly those values. SVN
        # averages over all pixels and so needs the full-resolution output.
        self.param_stride = 2 if kind == "down" and strided_down and volume_norm == "CVN" else 1
        self.param_net = nn.Sequential(
            nn.Conv2d(in_channels, 2 * channels, kernel_size, padding=pad, bias=False),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(
                2 * channels, 2 * channels, kernel_size, padding=pad, bias=False,
                stride=self.param_stride,
            ),
        )  # fmt: skip
        nn.init.zeros_(self.param_net[2].weight)
        mean_shape = (1, 1, *param_hw) if volume_norm == "CVN" else (1, channels, 1, 1)
        self.register_buffer("running_mean", torch.zeros(mean_shape))
        self.mixing = InvertibleConv1x1(channels)
        self.momentum = 0.1
        # Distributed training (pyramidflow.distributed) sets this: local VN batch mean ->
        # global batch mean, differentiable. None: the batch is this process's own.
        self.vn_sync: Callable[[torch.Tensor], torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, start={self.start}, target={self.target}"

    def conditioning(self, levels: Levels) -> torch.Tensor:
        """The parameter network's input, at the parameter resolution."""
        if self.kind == "up":
            return F.interpolate(levels[self.start + 1], size=levels[self.start].shape[-2:])
        if self.kind == "down":
            return levels[self.start]
        size = levels[self.start + 1].shape[-2:]
        return torch.cat(
            [F.interpolate(levels[self.start], size=size),
             F.interpolate(levels[self.start + 2], size=size)],
            dim=1,
        )  # fmt: skip

    def parameters_for(self, levels: Levels) -> torch.Tensor:
        """Raw parameter-network output [s_raw, t] (B, 2C, ...), in the levels' dtype."""
        condition = _conv_layout(self.conditioning(levels))
        with conv_scope(self.conv_precision, condition.device):
            h = self.param_net(condition)
        return parameter_output(h, condition.dtype)

    def running_mean_view(self) -> torch.Tensor:
        if self.param_stride == 1:
            return self.running_mean
        return self.running_mean[..., :: self.param_stride, :: self.param_stride]

    def _vn_correction(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """With ``vn_sync`` in training: (global minus local VN batch mean of the log-scale,
        global mean). The op subtracts the local mean; x * exp(-correction) does the rest."""
        if not self.training or self.vn_sync is None:
            return None
        log_scale = soft_clamp(h[:, : h.shape[1] // 2], self.clamp)
        local = log_scale.mean(dim=vn_dims(self.volume_norm), keepdim=True)
        global_mean = self.vn_sync(local)
        return global_mean - local, global_mean

    def _picked(self, correction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The correction at the target's pixels (CVN parameters may be at 2x resolution)."""
        if self.volume_norm != "CVN":
            return correction
        step_h = correction.shape[-2] // target.shape[-2]
        step_w = correction.shape[-1] // target.shape[-1]
        return correction[..., ::step_h, ::step_w]

    def couple(
        self, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, running_mean: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The coupling op on (a row band of) the target level: (z, VN mean subtracted)."""
        return ops.affine_coupling(
            x, h, weight, running_mean, volume_norm=self.volume_norm, training=self.training,
            clamp=self.clamp, backend=self.backend,
        )  # fmt: skip

    def uncouple(
        self, z: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, running_mean: torch.Tensor
    ) -> torch.Tensor:
        """Inverse of :meth:`couple` with the same ``h``, ``weight`` and ``running_mean``."""
        return ops.affine_coupling_inverse(
            z, h, weight, running_mean, volume_norm=self.volume_norm, training=self.training,
            clamp=self.clamp, backend=self.backend,
        )  # fmt: skip

    def update_running_mean(self, mean: torch.Tensor) -> None:
        """Fold a training batch's VN mean into the running mean (momentum 0.1)."""
        if not self.training:
            return
        with torch.no_grad():
            view = self.running_mean_view()
            view.mul_(1.0 - self.momentum).add_(mean.detach().to(view.dtype), alpha=self.momentum)

    def transform(
        self, x: torch.Tensor, h: torch.Tensor, update_stats: bool,
        kept_means: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Coupling of the target level given the parameter output ``h``. With
        ``kept_means``, appends the VN batch mean the coupling subtracted where
        :meth:`keeps_batch_mean` (else None), for :meth:`transform_backward`."""
        synced = self._vn_correction(h)
        if synced is not None:
            x = x * torch.exp(-self._picked(synced[0], x))
        z, mean = self.couple(x, h, self.mixing.weight(), self.running_mean_view())
        if update_stats:
            self.update_running_mean(mean if synced is None else synced[1])
        if kept_means is not None:
            kept_means.append(mean.detach() if self.keeps_batch_mean() else None)
        return z

    def keeps_batch_mean(self) -> bool:
        """Whether a recompute forward keeps this block's VN batch mean for the backward:
        SVN's is C numbers, and keeping it spares the backward a reduction over h. A CVN
        mean is a parameter-sized map: kept per block it would grow with depth."""
        return self.training and self.volume_norm == "SVN"

    def untransform(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`transform` (no statistics are touched)."""
        x = self.uncouple(z, h, self.mixing.weight(), self.running_mean_view())
        synced = self._vn_correction(h)
        if synced is not None:
            x = x * torch.exp(self._picked(synced[0], z))
        return x

    def transform_backward(
        self, z: torch.Tensor, grad_z: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
        running_mean: torch.Tensor, wrt: Sequence[torch.Tensor],
        batch_mean: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:  # fmt: skip
        """The recompute backward of :meth:`transform` on (a band of) the target level.

        From the output ``z`` and its gradient ``grad_z``: ``(x, grad_x, grads)``, the
        block's input rebuilt with the inverse, its gradient, and the gradients of the
        tensors ``wrt`` that ``h`` and ``weight`` (passed with their graphs, and held by
        nothing else, so that they are freed before their graphs run backward) were
        computed from. The fused coupling backward gives grad h straight to the parameter
        network: the forward is not re-run to get a graph. ``batch_mean``: the one
        :meth:`transform` kept, if it did (the op then does not reduce h for it).
        """
        x, grad_x, grad_h, grad_weight = ops.affine_coupling_recompute(
            z, grad_z, h.detach(), weight.detach(), running_mean,
            volume_norm=self.volume_norm, training=self.training, clamp=self.clamp,
            batch_mean=batch_mean, backend=self.backend,
        )  # fmt: skip
        del z, grad_z  # freed here unless the caller holds them
        outputs, grads = [h, weight], [grad_h, grad_weight]
        synced = self._vn_correction(h)
        if synced is not None:
            # the coupling's input was x * exp(-c), c the synced correction (a function of h)
            log_factor = self._picked(synced[0], x)
            x = x * torch.exp(log_factor.detach())
            outputs.append(x * torch.exp(-log_factor))
            grads.append(grad_x)
            grad_x = grad_x * torch.exp(-log_factor.detach())
        edges = [get_gradient_edge(t) for t in outputs if t.requires_grad]
        grads = [g for t, g in zip(outputs, grads, strict=True) if t.requires_grad]
        del h, weight, outputs, synced
        if not edges or not wrt:
            return x, grad_x, [None] * len(wrt)
        with backward_scope(self.conv_precision, x.device):
            results = torch.autograd.grad(edges, wrt, grads, allow_unused=True)
        return x, grad_x, list(results)

    # Row bands (pyramidflow.model.tiling): the block evaluated on rows of its target level.

    def tileable(self) -> bool:
        """Whether every row band of the target depends only on nearby rows: true unless a
        batch mean over whole images is involved (SVN in training, or a synced VN)."""
        if self.vn_sync is not None and self.training:
            return False
        return self.volume_norm == "CVN" or not self.training

    def param_rows_per_target_row(self, sizes: Sequence[tuple[int, int]]) -> int:
        """Rows of ``h`` per row of the target level (2 for an unstrided Down block)."""
        param_height = sizes[self.start + 1 if self.kind == "dual" else self.start][0]
        return param_height // self.param_stride // sizes[self.target][0]

    def conditioning_rows(self, fetch: RowFetch, sizes: Sequence[tuple[int, int]], c0: int,
                          c1: int) -> torch.Tensor:  # fmt: skip
        """Rows [c0, c1) of :meth:`conditioning`, read through ``fetch(index, a, b)``, which
        returns rows [a, b) of level ``index``."""
        size = sizes[self.start + 1 if self.kind == "dual" else self.start]
        if self.kind == "down":
            return fetch(self.start, c0, c1)
        if self.kind == "up":
            return _nearest_rows(fetch, self.start + 1, sizes, size, c0, c1)
        return torch.cat(
            [_nearest_rows(fetch, self.start, sizes, size, c0, c1),
             _nearest_rows(fetch, self.start + 2, sizes, size, c0, c1)],
            dim=1,
        )  # fmt: skip

    def parameters_for_rows(self, fetch: RowFetch, sizes: Sequence[tuple[int, int]], h0: int,
                            h1: int) -> torch.Tensor:  # fmt: skip
        """Rows [h0, h1) of :meth:`parameters_for`, computed from the conditioning rows they
        depend on: (k - 1) / 2 more per convolution on each side, zeros beyond the image
        (the convolutions' own padding), so the sums are those of the whole-image network."""
        conv_in, activation, conv_out = self.param_net
        pad, stride = conv_in.padding[0], self.param_stride
        height = sizes[self.start + 1 if self.kind == "dual" else self.start][0]
        m0, m1 = h0 * stride - pad, (h1 - 1) * stride + pad + 1  # hidden rows needed
        v0, v1 = max(m0, 0), min(m1, height)  # of which inside the image
        c0, c1 = v0 - pad, v1 + pad  # conditioning rows for those
        condition = _conv_layout(self.conditioning_rows(fetch, sizes, max(c0, 0), min(c1, height)))
        with conv_scope(self.conv_precision, condition.device):
            padded = _pad_rows(condition, max(c0, 0) - c0, c1 - min(c1, height))
            hidden = activation(F.conv2d(padded, conv_in.weight, padding=(0, pad)))
            hidden = _pad_rows(hidden, v0 - m0, m1 - v1)
            h = F.conv2d(hidden, conv_out.weight, stride=stride, padding=(0, pad))
        return parameter_output(h, condition.dtype)

    def forward(
        self, levels: Levels, update_stats: bool = True,
        kept_means: list[torch.Tensor | None] | None = None,
    ) -> Levels:  # fmt: skip
        """Apply the block; returns a new list with the target level replaced
        (``kept_means``: see :meth:`transform`)."""
        out = list(levels)
        out[self.target] = self.transform(
            levels[self.target], self.parameters_for(levels), update_stats, kept_means
        )
        return out

    def inverse(self, levels: Levels) -> Levels:
        """Undo the block (uses batch statistics in training mode, running ones in eval)."""
        out = list(levels)
        out[self.target] = self.untransform(levels[self.target], self.parameters_for(levels))
        return out


def block_plan(levels: int) -> list[tuple[str, int]]:
    """(kind, start) of every block of one stack, in order (docs/method.md section 6)."""
    plan: list[tuple[str, int]] = []
    for first in (0, 1):
        if first == 1:
            plan.append(("up", 0))
        for start in range(first, levels, 2):
            if start + 2 < levels:
                plan.append(("dual", start))
            elif start + 1 < levels:
                plan.append(("down", start))
    return plan
