"""Shared by the bench scripts: import the kernels whether or not the package is installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_kernels_importable() -> None:
    """Import ``pyramidflow_kernels`` from the installed package, else from ``kernels/``."""
    try:
        import pyramidflow_kernels  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "pyramidflow_kernels", ROOT / "kernels" / "__init__.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["pyramidflow_kernels"] = module
        spec.loader.exec_module(module)
