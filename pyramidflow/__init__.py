"""pyramidflow: defect localization with PyramidFlow, trained on good images only."""

from .config import Config
from .model import PyramidFlow

__version__ = "0.1.0"

__all__ = ["Config", "PyramidFlow", "__version__"]
