"""pyramidflow: defect localization with PyramidFlow, trained on good images only."""

from .api import Detector, Evaluation, Prediction
from .config import Config
from .io.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .io.reference_import import load_reference_checkpoint
from .model.flow import PyramidFlow

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
