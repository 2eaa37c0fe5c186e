"""The model: building blocks, the memory-saving invertible sequence, the flow, scoring
against a latent template, and float32 accuracy checks. Imports only the leaves
(config, errors, progress) and ``pyramidflow_kernels``."""

from .flow import PyramidFlow, level_sizes

__all__ = ["PyramidFlow", "level_sizes"]
