"""Adapters that put this engine inside other tools' pipelines; each needs its own optional
extra (``pip install "pyramidflow[anomalib]"`` for :mod:`.anomalib`) and is imported by name,
never from ``pyramidflow`` itself."""
