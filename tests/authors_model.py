"""Test oracle: the authors' PyramidFlow forward, written plainly from the spec.

Independent of ``pyramidflow``: it uses the authors' state-dict key names
(``inconv.weight``, ``nf.moduleslst.{i}.affineParams.conv.{0,2}.weight``,
``nf.moduleslst.{i}.affineParams.norm.running_mean``, ``nf.moduleslst.{i}.conv1x1.*``),
builds the blocks in the authors' order and runs their eval-mode forward with
straightforward convolutions (docs/method.md sections 1-6, reference_checkpoint.md).

A config here is the authors' ``save_dict`` subset: ``num_layer``, ``num_stack``,
``channel``, ``ksize``, ``vn_dims`` ((0, 1) = CVN, (0, 2, 3) = SVN).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

PREFIX = "nf.moduleslst"


def block_order(num_layer: int, num_stack: int) -> list[tuple[str, int]]:
    """(kind, start level) of every block, in the authors' construction order."""
    order = []
    for _ in range(num_stack):
        for range_start in (0, 1):
            if range_start == 1:
                order.append(("up", 0))
            for start in range(range_start, num_layer, 2):
                if start + 2 < num_layer:
                    order.append(("dual", start))
                elif start + 1 < num_layer:
                    order.append(("down", start))
    return order


def param_level(kind: str, start: int) -> int:
    """Pyramid level at whose resolution a block's parameter network runs."""
    return start + 1 if kind == "dual" else start


def make_state_dict(
    config: Mapping[str, Any],
    image_size: int,
    *,
    seed: int = 0,
    trained: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random, non-trivial weights in the authors' key layout.

    The second convolution is NOT zero (as after training), w_l / w_u carry noise in the
    parts their masks hide, and running means are non-zero at their full trained shape
    (``trained=False`` leaves them at the authors' initial (1, 1, 1, 1) zeros).
    """
    gen = torch.Generator().manual_seed(seed)
    C, k = config["channel"], config["ksize"]
    cvn = tuple(config["vn_dims"]) == (0, 1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, _ = torch.linalg.qr(randn(C, 3))  # orthonormal columns, as nn.init.orthogonal_
    state = {"inconv.weight": q.reshape(C, 3, 1, 1)}
    for i, (kind, start) in enumerate(block_order(config["num_layer"], config["num_stack"])):
        p = f"{PREFIX}.{i}"
        k_in = 2 * C if kind == "dual" else C
        state[f"{p}.affineParams.conv.0.weight"] = randn(2 * C, k_in, k, k) / (k_in * k * k) ** 0.5
        state[f"{p}.affineParams.conv.2.weight"] = (
            0.7 * randn(2 * C, 2 * C, k, k) / (2 * C * k * k) ** 0.5
        )
        if not trained:
            mean = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
        elif cvn:
            side = image_size >> param_level(kind, start)
            mean = 0.2 * randn(1, 1, side, side)
        else:
            mean = 0.2 * randn(1, C, 1, 1)
        state[f"{p}.affineParams.norm.running_mean"] = mean
        orth, _ = torch.linalg.qr(randn(C, C))
        perm, lower, upper = torch.linalg.lu(orth)
        diag = torch.diagonal(upper)
        u_mask = torch.triu(torch.ones(C, C, dtype=torch.float64), diagonal=1)
        state[f"{p}.conv1x1.w_p"] = perm
        state[f"{p}.conv1x1.u_mask"] = u_mask
        state[f"{p}.conv1x1.l_mask"] = u_mask.T.clone()
        state[f"{p}.conv1x1.s_sign"] = torch.sign(diag)
        state[f"{p}.conv1x1.l_eye"] = torch.eye(C, dtype=torch.float64)
        state[f"{p}.conv1x1.w_l"] = lower + 0.1 * randn(C, C)
        state[f"{p}.conv1x1.w_s"] = diag.abs().log() + 0.1 * randn(C)
        state[f"{p}.conv1x1.w_u"] = upper + 0.1 * randn(C, C)
    return {key: value.to(dtype) for key, value in state.items()}


def _blur(x: torch.Tensor) -> torch.Tensor:
    row = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype)
    kernel = (row[:, None] * row[None, :] / 256.0).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2)), kernel, groups=x.shape[1])


def laplacian_pyramid(x: torch.Tensor, num_layer: int) -> list[torch.Tensor]:
    """Max-pool Laplacian pyramid, finest first (docs/method.md section 2)."""
    gaussians = [x]
    for _ in range(num_layer - 1):
        gaussians.append(F.max_pool2d(_blur(gaussians[-1]), kernel_size=2, stride=2))
    bands = []
    for fine, coarse in zip(gaussians[:-1], gaussians[1:], strict=True):
        up = _blur(F.interpolate(coarse, size=fine.shape[-2:], mode="nearest"))
        bands.append(fine - up)
    bands.append(gaussians[-1])
    return bands


def _mixing_matrix(state: Mapping[str, torch.Tensor], p: str) -> torch.Tensor:
    w_s = state[f"{p}.conv1x1.w_s"]
    lower = state[f"{p}.conv1x1.w_l"] * state[f"{p}.conv1x1.l_mask"] + state[f"{p}.conv1x1.l_eye"]
    upper = state[f"{p}.conv1x1.w_u"] * state[f"{p}.conv1x1.u_mask"] + torch.diag(
        state[f"{p}.conv1x1.s_sign"] * torch.exp(w_s - w_s.mean())
    )
    return state[f"{p}.conv1x1.w_p"] @ lower @ upper


def _scale_and_shift(
    state: Mapping[str, torch.Tensor], p: str, cond: torch.Tensor, ksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = F.conv2d(cond, state[f"{p}.affineParams.conv.0.weight"], padding=ksize // 2)
    hidden = F.leaky_relu(hidden, 0.01)
    out = F.conv2d(hidden, state[f"{p}.affineParams.conv.2.weight"], padding=ksize // 2)
    s_raw, shift = out.chunk(2, dim=1)
    log_scale = 2.0 * 0.636 * torch.atan(s_raw / 2.0)
    log_scale = log_scale - state[f"{p}.affineParams.norm.running_mean"]  # eval-mode VN
    return torch.exp(log_scale), shift


def latents(
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], images: torch.Tensor
) -> list[torch.Tensor]:
    """Eval-mode latents of ``images`` (B, 3, H, W), finest first, in images' dtype."""
    state = {key: value.to(images.dtype) for key, value in state.items()}
    L, k = config["num_layer"], config["ksize"]
    x = laplacian_pyramid(F.conv2d(images, state["inconv.weight"]), L)
    for i, (kind, j) in enumerate(block_order(L, config["num_stack"])):
        p = f"{PREFIX}.{i}"
        if kind == "up":
            cond = F.interpolate(x[j + 1], size=x[j].shape[-2:], mode="nearest")
            scale, shift = _scale_and_shift(state, p, cond, k)
            target = j
        elif kind == "down":
            scale, shift = _scale_and_shift(state, p, x[j], k)
            size = x[j + 1].shape[-2:]
            scale = F.interpolate(scale, size=size, mode="nearest")
            shift = F.interpolate(shift, size=size, mode="nearest")
            target = j + 1
        else:
            size = x[j + 1].shape[-2:]
            cond = torch.cat(
                [
                    F.interpolate(x[j], size=size, mode="nearest"),
                    F.interpolate(x[j + 2], size=size, mode="nearest"),
                ],
                dim=1,
            )
            scale, shift = _scale_and_shift(state, p, cond, k)
            target = j + 1
        weight = _mixing_matrix(state, p)
        x[target] = F.conv2d(scale * x[target] + shift, weight[:, :, None, None])
    return x
