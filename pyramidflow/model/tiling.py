"""Coupling blocks evaluated in row bands: the flow's transients at a fixed size.

At full resolution a block's parameter network holds its input, hidden and output
(2C channels each) and, in the recompute backward, their gradients and the local graph:
several latent pyramids' worth at 2048 px. Evaluated on bands of the target level's rows
instead, with the (k - 1) / 2 extra rows per convolution each side that the band's
output depends on (zeros beyond the image, as the convolutions' own padding), every
band computes exactly the whole-image sums; only one band's transients are live at a
time. The coupling itself is per pixel (CVN's batch mean is per pixel too), so the
band's z, x and gradients are the whole-image ones restricted to the band.

The forward and the recompute backward cut a block into the same bands (they are a
function of the shapes and the budget), so the ``h`` used to invert a block in the
backward is computed exactly as the ``h`` that produced its output in the forward.

Not tiled: SVN in training (its batch mean runs over whole images), a synchronized VN
(distributed training) and programs traced with symbolic sizes (``torch.export`` with a
dynamic batch); those blocks run whole, as before.

Budget: ``Config.memory_budget`` MiB per band (0: never tile; None: automatic,
:func:`automatic_budget_mb`). A block is tiled only when its estimated whole-image
transient (:func:`band_transient_bytes`, measured by ``bench/band_transient.py``) exceeds
the budget, so small images run exactly the untiled code.

The walk writes a band's reconstructed input and its gradient over the same rows of the
block's output and output gradient when it may (:func:`held_only_here`: buffers it
allocated, or latents and gradients it was handed that nothing else shares), so the
step's floor is one latent pyramid and one gradient pyramid plus one band.

The same budget cuts the pyramid decomposition into channel chunks
(:func:`decompose_in_place`): all of its operations act per channel, so this is exact
without any halo, and the finest band is written over the projected features.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pyramidflow_kernels as ops
import torch

from .layers import CouplingBlock

MAX_AUTOMATIC_BUDGET_MB = 256
# Finest-level planes (B x H x W) live per channel of a chunk in the pyramid decomposition
# beyond its input and outputs: the blur's passes, the pixel-replicated coarser level and
# its blur (bench/memory_phases.py's 'pyramid decompose' phase: 8.2 at 2048 px in chunks
# of 2 channels).
DECOMPOSE_PLANES_PER_CHANNEL = 8
# Below this many target rows per band the halo recomputation ((k-1)/2 rows per
# convolution each side) costs more time than the memory is worth.
MIN_BAND_ROWS = 16
Bands = list[tuple[int, int]]


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GiB
        return 8 << 30


# Read once, outside any trace (torch.compile cannot trace os.sysconf).
_MEMORY_BYTES: dict[tuple[str, int | None], int] = {("cpu", None): _physical_memory()}


def automatic_budget_mb(device: torch.device) -> int:
    """Band budget when none is configured: 1/32 of the device's memory (the GPU's, or
    the machine's RAM for the CPU), at most 256 MiB."""
    key = (device.type, device.index if device.type == "cuda" else None)
    total = _MEMORY_BYTES.get(key)
    if total is None:
        if device.type != "cuda" or torch.compiler.is_compiling():
            return MAX_AUTOMATIC_BUDGET_MB
        total = _MEMORY_BYTES[key] = torch.cuda.get_device_properties(device).total_memory
    return max(1, min(MAX_AUTOMATIC_BUDGET_MB, int(total / 32 / 2**20)))


def _sizes(levels: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    return [(t.shape[-2], t.shape[-1]) for t in levels]


def band_transient_bytes(block: CouplingBlock, levels: Sequence[torch.Tensor], rows: int) -> int:
    """Estimated peak transient of the recompute backward of a band of ``rows`` target rows:
    twice each of its tensors (the tensor and its gradient or a saved copy), the
    conditioning rows and hidden rows with their halos, the rows of h and of the target;
    and once more the rows of h: the coupling step hands the parameter network's graph a
    whole grad h, held until that graph's backward returns.

    Calibrated by ``bench/band_transient.py``, which measures one band's backward (README,
    "High resolution": the ratios per block and band height). Before the walk called the
    coupling step, grad h was made and freed inside autograd and the count without it
    was 0.91 to 1.09 times the measurement; an earlier count, without the factor 2's
    reasoning, was 2.3 to 2.7 times (bands were half as tall as the budget allowed)."""
    sizes = _sizes(levels)
    target = levels[block.target]
    batch, channels, width = target.shape[0], target.shape[1], target.shape[-1]
    conv_in = block.param_net[0]
    pad, stride = conv_in.padding[0], block.param_stride
    param_width = sizes[block.start + 1 if block.kind == "dual" else block.start][1]
    rows_h = rows * block.param_rows_per_target_row(sizes)
    rows_hidden = (rows_h - 1) * stride + 1 + 2 * pad
    rows_condition = rows_hidden + 2 * pad
    h_elements = rows_h * (param_width // stride) * 2 * channels
    elements = (
        rows_condition * param_width * conv_in.in_channels
        + rows_hidden * param_width * conv_in.out_channels
        + rows_h * (param_width // stride) * conv_in.out_channels
        + rows * width * channels
    )
    return (2 * elements + h_elements) * batch * target.element_size()


def row_bands(block: CouplingBlock, levels: Sequence[torch.Tensor], budget_mb: int) -> Bands | None:
    """Bands [t0, t1) of the target level's rows for this block, or None to run it whole
    (no budget, a block that cannot be tiled, or one whose transient fits the budget)."""
    if budget_mb <= 0 or not block.tileable():
        return None
    if any(isinstance(t.shape[i], torch.SymInt) for t in levels for i in range(t.dim())):
        return None  # traced with symbolic sizes (export): a plan would guard on them
    height = levels[block.target].shape[-2]
    fixed = band_transient_bytes(block, levels, 0)  # the halos: the estimate is affine
    per_row = band_transient_bytes(block, levels, 1) - fixed
    rows = max(MIN_BAND_ROWS, ((budget_mb << 20) - fixed) // per_row)
    if rows >= height:
        return None
    return [(start, min(start + rows, height)) for start in range(0, height, rows)]


def _storage_holders(tensor: torch.Tensor) -> int | None:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    try:
        return None if use_count is None else use_count(tensor.untyped_storage()._cdata)
    except (AttributeError, RuntimeError, TypeError):  # no real storage (traced, subclass)
        return None


_ONE_HOLDER = _storage_holders(torch.empty(1))


def _without_overlap(tensor: torch.Tensor) -> bool:
    """No two elements share memory (not an expanded tensor): writable band by band."""
    span = 1
    for stride, size in sorted(
        (st, n) for st, n in zip(tensor.stride(), tensor.shape, strict=True) if n > 1
    ):
        if stride < span:
            return False
        span += stride * (size - 1)
    return True


def held_only_here(tensor: torch.Tensor) -> bool:
    """Whether no other tensor (a view, a saved copy, the caller's latents) shares
    ``tensor``'s memory and no two of its elements do, so that the walk may overwrite it.
    Reads torch's storage use count (a private function: where it is missing, answers
    False and nothing is overwritten)."""
    holders = _storage_holders(tensor)
    return holders is not None and holders == _ONE_HOLDER and _without_overlap(tensor)


def _like_band(band: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``full``'s shape with the memory layout of ``band`` (the op's
    output layout for the whole image): later ops then sum in the untiled order."""
    order = sorted(range(band.dim()), key=lambda d: (-band.stride(d), d))
    return torch.empty_permuted(full.shape, order, dtype=band.dtype, device=band.device)


def _mean_rows(block: CouplingBlock, h0: int, h1: int) -> torch.Tensor:
    """The running mean the coupling op sees for rows [h0, h1) of h."""
    view = block.running_mean_view()
    return view[..., h0:h1, :] if block.volume_norm == "CVN" else view


def forward_block(
    block: CouplingBlock, levels: list[torch.Tensor], bands: Bands, owned: set[int],
    update_stats: bool,
) -> None:  # fmt: skip
    """Apply the block band by band (no autograd), replacing ``levels[block.target]``.

    ``owned``: levels this flow allocated itself, which it may overwrite in place (a band
    of the output replaces the same band of the input, which nothing reads again).
    """
    sizes, target = _sizes(levels), block.target
    step = block.param_rows_per_target_row(sizes)
    x = levels[target]
    out = x if target in owned else None
    weight = block.mixing.weight()
    means = []

    def fetch(index: int, a: int, b: int) -> torch.Tensor:
        return levels[index][..., a:b, :]

    for t0, t1 in bands:
        h = block.parameters_for_rows(fetch, sizes, t0 * step, t1 * step)
        z, mean = block.couple(x[..., t0:t1, :], h, weight, _mean_rows(block, t0 * step, t1 * step))
        del h
        if out is None:
            out = _like_band(z, x)
        out[..., t0:t1, :] = z
        means.append(mean)
    if update_stats:
        block.update_running_mean(torch.cat(means, dim=-2))
    levels[target] = out  # type: ignore[assignment]
    owned.add(target)


def backward_block(
    block: CouplingBlock,
    levels: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    live: Sequence[bool],
    bands: Bands,
    owned_levels: set[int],
    owned_grads: set[int],
) -> list[torch.Tensor | None]:
    """One block of the recompute backward, band by band; returns its parameters'
    gradients. ``levels[target]`` becomes the block's input (reconstructed with the
    inverse), ``grads`` the gradients at its input; ``owned_*`` as in
    :func:`forward_block` (tensors this walk allocated, safe to update in place)."""
    sizes, target = _sizes(levels), block.target
    step = block.param_rows_per_target_row(sizes)
    params = [p for p in block.parameters() if p.requires_grad]
    conditions = [index for index in block.conditions if live[index]]
    for index in conditions:  # band gradients are added into these in place
        if grads[index] is None:
            grads[index] = torch.zeros_like(levels[index])
        elif index not in owned_grads:
            grads[index] = grads[index].clone(memory_format=torch.contiguous_format)
        owned_grads.add(index)
    z_full, grad_z = levels[target], grads[target]
    if grad_z is None:
        grad_z = torch.zeros_like(z_full)
    # allocated at the first band, with the layout the whole-image op would give them
    x_full = z_full if target in owned_levels else None
    grad_x = grad_z if live[target] and target in owned_grads else None
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    for t0, t1 in bands:
        leaves: list[tuple[int, int, torch.Tensor]] = []

        def fetch(index: int, a: int, b: int, leaves=leaves) -> torch.Tensor:
            rows = levels[index][..., a:b, :]
            if live[index]:
                rows = rows.detach().requires_grad_(True)
                leaves.append((index, a, rows))
            return rows

        with torch.enable_grad():
            # as in the whole-block walk, h goes in unnamed (the arguments are evaluated in
            # order: fetch has collected the band's leaves before the list of them is made)
            x, grad, results = block.transform_backward(
                z_full[..., t0:t1, :], grad_z[..., t0:t1, :],
                block.parameters_for_rows(fetch, sizes, t0 * step, t1 * step),
                block.mixing.weight(), _mean_rows(block, t0 * step, t1 * step),
                [leaf for _, _, leaf in leaves] + params,
            )  # fmt: skip
        if x_full is None:
            x_full = _like_band(x, z_full)
        x_full[..., t0:t1, :] = x
        if live[target]:
            if grad_x is None:
                grad_x = _like_band(grad, grad_z)
            grad_x[..., t0:t1, :] = grad
        for index, a, leaf in leaves:
            g = results.pop(0)
            if g is not None:
                grads[index][..., a : a + leaf.shape[-2], :] += g  # type: ignore[index]
        for j, g in enumerate(results):
            if g is not None:
                param_grads[j] = g if param_grads[j] is None else param_grads[j] + g
    levels[target] = x_full  # type: ignore[assignment]
    owned_levels.add(target)
    grads[target] = grad_x
    if grad_x is not None:
        owned_grads.add(target)
    return param_grads


def decompose_channel_chunk(features: torch.Tensor, budget_mb: int) -> int | None:
    """Channels per chunk of the pyramid decomposition within the budget, or None to
    decompose all channels at once (they fit, or no budget)."""
    if budget_mb <= 0 or any(isinstance(n, torch.SymInt) for n in features.shape):
        return None
    batch, channels, height, width = features.shape
    per_channel = DECOMPOSE_PLANES_PER_CHANNEL * batch * height * width * features.element_size()
    chunk = max(1, (budget_mb << 20) // per_channel)
    return None if chunk >= channels else chunk


def decompose_in_place(
    features: torch.Tensor, levels: int, chunk: int, backend: str
) -> list[torch.Tensor]:
    """:func:`pyramidflow_kernels.pyramid_decompose` of ``features`` a few channels at a time
    (every operation of the pyramid acts per channel, so each chunk's bands are the whole
    decomposition's), the finest band written over ``features`` (which the caller hands
    over): the transients are one chunk's instead of all channels'."""
    outputs: list[torch.Tensor] = [features]
    for c0 in range(0, features.shape[1], chunk):
        bands = ops.pyramid_decompose(features[:, c0 : c0 + chunk], levels, backend=backend)
        if c0 == 0:
            outputs += [
                torch.empty((features.shape[0], features.shape[1], *band.shape[-2:]),
                            dtype=band.dtype, device=band.device)
                for band in bands[1:]
            ]  # fmt: skip
        for out, band in zip(outputs, bands, strict=True):
            out[:, c0 : c0 + chunk] = band
        del bands
    return outputs
