"""Import models trained with the authors' public PyramidFlow code.

Their ``train.py`` writes one ``.npz`` (``numpy.savez``) holding the architecture
(``num_layer``, ``vn_dims``, ``ksize``, ``channel``, ``num_stack``, ...) and state dicts
pickled inside object arrays (``state_dict_pixel``, ``state_dict_pro``). See
``reference_checkpoint.md`` for the layout.

Pickles can run code, so by default the object arrays are read with a restricted
unpickler that only rebuilds numpy object arrays of dicts of CPU tensors; the tensor
storages themselves go through ``torch.load(weights_only=True)``. ``allow_pickle=True``
uses numpy's unrestricted loader: only for files you trust.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format

from ..config import MVTEC_TEXTURES, Config
from ..errors import PyramidFlowError
from ..model.flow import PyramidFlow, level_sizes
from ..model.layers import block_plan

REFERENCE_PREFIX = "nf.moduleslst"
DEFAULT_IMAGE_SIZE = 256  # the authors' input size without the ResNet front end
_BLOCK_KEY = re.compile(r"^nf\.moduleslst\.(\d+)\.(.+)$")
_BLOCK_SUFFIXES = {
    "affineParams.conv.0.weight": "param_net.0.weight",
    "affineParams.conv.2.weight": "param_net.2.weight",
    "affineParams.norm.running_mean": "running_mean",
    **{f"conv1x1.{n}": f"mixing.{n}" for n in (
        "w_p", "w_l", "w_u", "w_s", "s_sign", "l_mask", "u_mask", "l_eye"
    )},
}  # fmt: skip


class ReferenceImportError(PyramidFlowError, ValueError):
    """An authors' checkpoint that cannot be imported (one-line message)."""


# --- state-dict conversion ---------------------------------------------------------------


def _expected_reference_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every key of the authors' state dict for ``config`` with its shape (running
    means at their trained shape)."""
    C, k = config.channels, config.kernel_size
    sizes = level_sizes(config.image_size, config.levels)
    shapes: dict[str, tuple[int, ...]] = {"inconv.weight": (C, config.in_channels, 1, 1)}
    plan = block_plan(config.levels) * config.stacks
    for i, (kind, start) in enumerate(plan):
        p = f"{REFERENCE_PREFIX}.{i}"
        k_in = 2 * C if kind == "dual" else C
        shapes[f"{p}.affineParams.conv.0.weight"] = (2 * C, k_in, k, k)
        shapes[f"{p}.affineParams.conv.2.weight"] = (2 * C, 2 * C, k, k)
        h, w = sizes[start + 1 if kind == "dual" else start]
        vn_shape = (1, 1, h, w) if config.volume_norm == "CVN" else (1, C, 1, 1)
        shapes[f"{p}.affineParams.norm.running_mean"] = vn_shape
        for name in ("w_p", "w_l", "w_u", "l_mask", "u_mask", "l_eye"):
            shapes[f"{p}.conv1x1.{name}"] = (C, C)
        shapes[f"{p}.conv1x1.w_s"] = (C,)
        shapes[f"{p}.conv1x1.s_sign"] = (C,)
    return shapes


def _our_key(key: str) -> str:
    if key == "inconv.weight":
        return key
    match = _BLOCK_KEY.match(key)
    if match is None or match.group(2) not in _BLOCK_SUFFIXES:
        raise ReferenceImportError(f"unexpected key {key!r} in the authors' state dict")
    return f"flow.blocks.{match.group(1)}.{_BLOCK_SUFFIXES[match.group(2)]}"


def _describe(config: Config) -> str:
    return (
        f"L={config.levels}, S={config.stacks}, C={config.channels}, k={config.kernel_size}, "
        f"{config.volume_norm}, {config.image_size[0]}x{config.image_size[1]}"
    )


def convert_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Config
) -> dict[str, torch.Tensor]:
    """Map the authors' state dict onto :class:`PyramidFlow`'s keys for ``config``.

    Every key and shape is checked (errors name the key). Running means still at their
    initial (1, 1, 1, 1) are broadcast to our buffer shape. A Down block's second conv
    weight is used unchanged (our CVN Down block only runs it with stride 2).
    """
    expected = _expected_reference_shapes(config)
    missing = [key for key in expected if key not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ReferenceImportError(
            f"key {missing[0]!r}{more} missing from the authors' state dict for a model "
            f"with {_describe(config)}"
        )
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in expected:
            _our_key(key)  # raises for keys of unknown form
            raise ReferenceImportError(
                f"unexpected key {key!r} in the authors' state dict: a model with "
                f"{_describe(config)} has {len(expected)} keys"
            )
        if not isinstance(value, torch.Tensor):
            raise ReferenceImportError(f"{key!r} is a {type(value).__name__}, not a tensor")
        shape = expected[key]
        value = value.detach().cpu()
        if key.endswith("running_mean") and tuple(value.shape) != shape:
            if value.dim() != 4 or value.numel() != 1:
                raise ReferenceImportError(
                    f"{key!r} has shape {tuple(value.shape)}, expected {shape} (or the "
                    f"untrained (1, 1, 1, 1)) for a model with {_describe(config)}"
                )
            value = value.expand(shape)
        elif tuple(value.shape) != shape:
            raise ReferenceImportError(
                f"{key!r} has shape {tuple(value.shape)}, expected {shape} for a model with "
                f"{_describe(config)}"
            )
        converted[_our_key(key)] = value.contiguous().clone()
    return converted


def model_from_reference_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Config
) -> PyramidFlow:
    """A :class:`PyramidFlow` in eval mode holding the authors' weights."""
    converted = convert_reference_state_dict(state_dict, config)
    with torch.random.fork_rng(devices=[]):  # building draws random inits: keep the caller's
        model = PyramidFlow(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


# --- reading the authors' .npz -----------------------------------------------------------


def _safe_load_from_bytes(data: bytes) -> Any:
    """Replacement for ``torch.storage._load_from_bytes`` (a pickled tensor storage)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a numpy object array of a dict of CPU tensors needs: traced through
    ``find_class`` on ``np.savez`` files written with torch 2.13 / numpy 2.4 (numpy 1.x
    spells the array rebuild ``numpy.core.multiarray``), plus a few harmless builtins."""
    reconstruct, scalar = _numpy_reconstruct(), _numpy_scalar()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes under pickle protocol 2
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class _DisallowedGlobalError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only an allow-list of globals (nothing is imported)."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="ASCII")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _DisallowedGlobalError(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _DisallowedGlobalError(f"persistent id {pid!r}")


def _trust_hint(path: Path) -> str:
    return f"pass allow_pickle=True only if you trust {path.name}"


def _read_npz_member_safe(path: Path, archive: zipfile.ZipFile, key: str) -> Any:
    """Array ``key`` of an npz; object arrays through the restricted unpickler."""
    with archive.open(f"{key}.npy") as fp:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            _, _, dtype = npy_format.read_array_header_1_0(fp)
        elif version == (2, 0):
            _, _, dtype = npy_format.read_array_header_2_0(fp)
        else:
            dtype = None  # rare header version: numpy reads it (without pickle) below
        if dtype is not None and dtype.hasobject:
            try:
                return _RestrictedUnpickler(fp).load()
            except _DisallowedGlobalError as exc:
                raise ReferenceImportError(
                    f"{path}: refusing to unpickle {exc.name!r} in {key!r}: the safe loader "
                    f"only rebuilds dicts of tensors; {_trust_hint(path)}"
                ) from None
            except ReferenceImportError:
                raise
            except Exception as exc:
                raise ReferenceImportError(
                    f"{path}: cannot read {key!r} safely ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); {_trust_hint(path)}"
                ) from None
    with archive.open(f"{key}.npy") as fp:
        try:
            return npy_format.read_array(fp, allow_pickle=False)
        except ValueError as exc:
            raise ReferenceImportError(
                f"{path}: cannot read {key!r} without pickle ({exc}); {_trust_hint(path)}"
            ) from None


class _NpzReader:
    """Lazy access to the arrays of an authors' npz, safe or trusting."""

    def __init__(self, path: Path, allow_pickle: bool) -> None:
        self.path, self.allow_pickle = path, allow_pickle
        if not zipfile.is_zipfile(path):  # np.load would fall back to a bare pickle
            raise ReferenceImportError(f"{path}: not a readable .npz file (not a zip archive)")
        try:
            if allow_pickle:
                self._npz = np.load(path, allow_pickle=True)
                self.keys = set(self._npz.files)
            else:
                self._zip = zipfile.ZipFile(path)
                self.keys = {n[:-4] for n in self._zip.namelist() if n.endswith(".npy")}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ReferenceImportError(
                f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})"
            ) from None

    def close(self) -> None:
        (self._npz if self.allow_pickle else self._zip).close()

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys:
            raise ReferenceImportError(
                f"{self.path}: no {key!r} in this file (keys: {', '.join(sorted(self.keys))}); "
                "is it a checkpoint of the authors' train.py?"
            )
        if self.allow_pickle:
            return self._npz[key]
        return _read_npz_member_safe(self.path, self._zip, key)

    def scalar(self, key: str) -> Any:
        value = self[key]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            return value.item()
        return value.tolist() if isinstance(value, np.ndarray) else value


def _image_size_from_state(
    state_dict: Mapping[str, Any], levels: int, volume_norm: str, image_size: Any, path: Path
) -> tuple[int, int]:
    given = None
    if image_size is not None:
        given = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        given = tuple(int(v) for v in given)
    if volume_norm != "CVN":
        return given or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    # The first Up block (level 0, the input resolution) follows the first pass of blocks.
    first_up = block_plan(levels).index(("up", 0))
    key = f"{REFERENCE_PREFIX}.{first_up}.affineParams.norm.running_mean"
    mean = state_dict.get(key)
    if isinstance(mean, torch.Tensor) and mean.dim() == 4 and mean.shape[-2:] != (1, 1):
        trained = (int(mean.shape[-2]), int(mean.shape[-1]))
        if given is not None and given != trained:
            raise ReferenceImportError(
                f"{path}: this CVN model was trained at {trained[0]}x{trained[1]} (per-pixel "
                f"statistics), not at the requested {given[0]}x{given[1]}"
            )
        return trained
    return given or (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)


def _check_front_end(reader: _NpzReader) -> None:
    resnet = int(reader.scalar("resnetX")) if "resnetX" in reader.keys else 0
    if resnet != 0:
        raise ReferenceImportError(
            f"{reader.path}: trained with the ResNet{resnet} front end (resnetX={resnet}), "
            "which is not supported offline; only models trained with resnetX=0 (encoder "
            "'none') can be imported"
        )


def _config_from_npz(reader: _NpzReader, state_dict: Mapping[str, Any], image_size: Any) -> Config:
    path = reader.path
    vn_dims = tuple(int(v) for v in np.atleast_1d(reader["vn_dims"]).tolist())
    if vn_dims == (0, 1):
        volume_norm = "CVN"
    elif vn_dims == (0, 2, 3):
        volume_norm = "SVN"
    else:
        raise ReferenceImportError(
            f"{path}: unknown vn_dims {vn_dims}; expected (0, 1) or (0, 2, 3)"
        )
    levels = int(reader.scalar("num_layer"))
    category = str(reader.scalar("cls_name")) if "cls_name" in reader.keys else None
    try:
        return Config(
            levels=levels,
            stacks=int(reader.scalar("num_stack")),
            channels=int(reader.scalar("channel")),
            kernel_size=int(reader.scalar("ksize")),
            volume_norm=volume_norm,
            image_size=_image_size_from_state(state_dict, levels, volume_norm, image_size, path),
            batch_size=int(reader.scalar("batch_size")) if "batch_size" in reader.keys else 2,
            augment=category in MVTEC_TEXTURES,
            category=category,
            scoring="paper",  # the authors' model, scored their way
        )
    except ValueError as exc:
        raise ReferenceImportError(f"{path}: {exc}") from None


def load_reference_checkpoint(
    path: str | os.PathLike[str],
    *,
    key: str = "state_dict_pixel",
    image_size: int | tuple[int, int] | None = None,
    allow_pickle: bool = False,
) -> PyramidFlow:
    """Load a model saved by the authors' ``train.py`` (an ``.npz``), in eval mode.

    ``key``: ``"state_dict_pixel"`` (best pixel AUROC) or ``"state_dict_pro"`` (best PRO).
    ``image_size``: input size; a trained CVN model's own size is read from its statistics
    (256 when untrained), SVN defaults to 256. The template is not in the file: recompute
    it from the training images. ``allow_pickle=True`` unpickles without restrictions:
    only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise ReferenceImportError(f"{path}: no such file")
    reader = _NpzReader(path, allow_pickle)
    try:
        _check_front_end(reader)
        state = reader[key]
        if isinstance(state, np.ndarray) and state.dtype.hasobject and state.ndim == 0:
            state = state.item()
        if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ReferenceImportError(f"{path}: {key!r} is not a dict of tensors")
        config = _config_from_npz(reader, state, image_size)
    finally:
        reader.close()
    config.extra["reference_import"] = {"file": path.name, "key": key}
    try:
        return model_from_reference_state_dict(state, config)
    except ReferenceImportError as exc:
        raise ReferenceImportError(f"{path}: {exc}") from None
