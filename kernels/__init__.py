"""pyramidflow_kernels: stateless PyramidFlow ops with a torch reference and Triton kernels.

Knows nothing of models, datasets or files. See ``ops`` for the signatures.
"""

from ._backend import BACKENDS, resolve_backend, triton_available
from .ops import (
    affine_coupling,
    affine_coupling_inverse,
    affine_coupling_recompute,
    anomaly_map,
    fourier_loss,
    pyramid_compose,
    pyramid_decompose,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "__version__",
    "affine_coupling",
    "affine_coupling_inverse",
    "affine_coupling_recompute",
    "anomaly_map",
    "fourier_loss",
    "pyramid_compose",
    "pyramid_decompose",
    "resolve_backend",
    "triton_available",
]
