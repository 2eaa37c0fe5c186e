"""Backend selection shared by every op: ``auto``, ``torch`` or ``triton``."""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "PYRAMIDFLOW_BACKEND"


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it need not have a GPU: see ``interpreting``)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """Pick the concrete backend (``torch`` or ``triton``) for an op on ``tensor``.

    ``None`` and ``auto`` read ``$PYRAMIDFLOW_BACKEND`` (so the variable forces a backend
    wherever a caller or a config left the choice to the library); when it is unset too,
    ``auto`` chooses Triton for CUDA tensors when Triton imports, the torch reference
    otherwise. Forcing ``triton`` on a CPU tensor needs Triton's interpreter.
    """
    choice = (backend or "auto").lower()
    if choice == "auto":
        choice = (os.environ.get(ENV_VAR) or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(
            f"unknown backend {choice!r} (from argument or ${ENV_VAR}); use one of {BACKENDS}"
        )
    if choice == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was forced but Triton does not import")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(
                "backend 'triton' on a CPU tensor needs TRITON_INTERPRET=1 set before "
                "Triton is imported; use backend 'torch' or a CUDA tensor"
            )
    return choice
