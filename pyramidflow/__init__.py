"""pyramidflow: defect localization with PyramidFlow, trained on good images only."""

from .api import Detector, Evaluation, Prediction
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .config import Config
from .model import PyramidFlow
from .reference_import import load_reference_checkpoint

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Config",
    "Detector",
    "Evaluation",
    "Prediction",
    "PyramidFlow",
    "__version__",
    "load_checkpoint",
    "load_reference_checkpoint",
    "save_checkpoint",
]
