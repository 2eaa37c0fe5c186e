"""Shared by the bench scripts: kernels importable without installing, the machine's name."""

from __future__ import annotations

import importlib.util
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def device_name(device: str = "cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU model from /proc/cpuinfo."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(device: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What every results file starts with: device and its name, torch version, thread
    count, the command line that made it (``argv``: the script's arguments when called
    from Python, default the process's) and when it started."""
    import torch

    arguments = sys.argv[1:] if argv is None else list(argv)
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *arguments]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
