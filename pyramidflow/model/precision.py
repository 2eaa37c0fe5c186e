"""The precision policy of the parameter networks' convolutions (``Config.conv_precision``).

The 7x7 convolutions of the parameter networks are most of a training step's arithmetic;
everything else (the coupling, volume normalization, loss, template, anomaly map) is
memory bound and stays in the model's dtype (float32). The policy applies to those
convolutions only, wherever they run (whole images or row bands, forward or the
recompute backward):

- ``fp32``: IEEE float32 (on CUDA, TF32 is switched off for them: PyTorch's own default
  lets cuDNN use TF32 for float32 convolutions).
- ``tf32``: on CUDA (Ampere and newer), cuDNN and cuBLAS may use TF32 (10-bit mantissa
  products, float32 accumulation). Elsewhere the same as ``fp32``: CPUs have no TF32.
- ``bf16``: the convolutions run under ``torch.autocast`` in bfloat16 (CPU and CUDA);
  their output ``h`` is cast back to the model's dtype before the coupling.

On CUDA the convolutions' scope also pins cuDNN's algorithm choice (``benchmark`` off,
``deterministic`` on): the recompute backward re-evaluates each parameter network and
must get the forward's ``h`` bit for bit from the same input, which a benchmarked or
nondeterministic algorithm choice does not promise. The flags are process-wide; each
scope restores them on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..config import CONV_PRECISIONS

__all__ = ["CONV_PRECISIONS", "backward_scope", "conv_scope", "parameter_output"]


@contextlib.contextmanager
def _cuda_flags(**flags: bool) -> Iterator[None]:
    """Set torch.backends flags (``cudnn_<name>`` or ``matmul_<name>``), restored on exit."""
    owners = {"cudnn": torch.backends.cudnn, "matmul": torch.backends.cuda.matmul}
    previous = {}
    for key, value in flags.items():
        owner, name = key.split("_", 1)
        previous[key] = getattr(owners[owner], name)
        setattr(owners[owner], name, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            owner, name = key.split("_", 1)
            setattr(owners[owner], name, value)


def _tf32_flags(precision: str) -> dict[str, bool]:
    tf32 = precision == "tf32"
    return {"cudnn_allow_tf32": tf32, "matmul_allow_tf32": tf32}


def conv_scope(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the parameter networks' convolutions run in on ``device`` (forward):
    autocast to bfloat16 for ``bf16``; on CUDA the TF32 switches of the policy and a
    pinned cuDNN algorithm choice. Off CUDA a plain autocast or ``nullcontext`` (which
    ``torch.compile`` and ``torch.export`` trace without a graph break)."""
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    if device.type != "cuda":
        return autocast
    pinned = {"cudnn_benchmark": False, "cudnn_deterministic": True}
    return _stacked(_cuda_flags(**pinned, **_tf32_flags(precision)), autocast)


@contextlib.contextmanager
def _stacked(*contexts: contextlib.AbstractContextManager) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def backward_scope(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context their gradients are computed in: the TF32 switches of the policy on
    CUDA (a bfloat16 forward needs nothing here: autograd runs each backward in its
    forward's dtype); a no-op elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return _cuda_flags(**_tf32_flags(precision))


def parameter_output(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The convolutions' output as the coupling takes it: in the model's ``dtype`` (a
    bfloat16 ``h`` cast back), and on CUDA in NCHW order (cuDNN returns channels-last for
    a channels-last input; the Triton coupling would otherwise copy it on each of its
    calls). ``h`` itself when nothing changes."""
    layout = torch.contiguous_format if h.is_cuda else torch.preserve_format
    return h.to(dtype=dtype, memory_format=layout)
