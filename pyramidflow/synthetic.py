"""Deterministic synthetic demo data in the MVTec AD folder layout.

The generator renders a few small image categories (periodic and stochastic textures plus one
registered object) and writes them exactly like MVTec AD::

    ROOT/<category>/train/good/000.png
    ROOT/<category>/test/good/000.png
    ROOT/<category>/test/<defect_type>/000.png
    ROOT/<category>/ground_truth/<defect_type>/000_mask.png

Normal images vary (texture phase, per-thread/per-tile gains, flips for textures, 1-2 px position
jitter for the object, +-5 % brightness, Gaussian sensor noise of 2-4 gray levels). Defects are
drawn on top of a normal image rendered the same way; every defect is described by a coverage map
``alpha`` of the geometric shape that was drawn, and its mask is ``alpha >= 0.3`` (never a
threshold of the image difference). All randomness comes from ``np.random.default_rng`` seeded with
``(seed, category index, split, index)``, so identical arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "DEFECT_TYPES",
    "DEMO_CATEGORIES",
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "TEXTURE_CATEGORIES",
    "generate_category",
    "generate_demo_dataset",
    "render_defect",
    "render_normal",
]

#: Bump whenever the rendered pixels change, so stale cached datasets are not reused silently.
GENERATOR_VERSION = 2
#: Marker file written (last) inside a finished category folder; holds the generation parameters.
MARKER_NAME = ".complete"

DEMO_CATEGORIES: tuple[str, ...] = ("weave", "grain", "tile", "disc")
TEXTURE_CATEGORIES: frozenset[str] = frozenset({"weave", "grain", "tile"})
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "weave": ("scratch", "structural", "contamination", "faint_spot"),
    "grain": ("scratch", "crack", "stain", "hole"),
    "tile": ("crack", "hole", "contamination", "faint_spot"),
    "disc": ("scratch", "stain", "hole", "contamination"),
}

_MASK_THRESHOLD = 0.3  # coverage above which a pixel counts as defective
_BORDER = 4  # no defect pixel closer than this to the image border
_MIN_AREA, _MAX_AREA = 0.003, 0.05  # defect mask area as a fraction of the image
_MAX_TRIES = 200
_SPLIT_TRAIN, _SPLIT_TEST_GOOD, _SPLIT_DEFECT0 = 0, 1, 2

Array = np.ndarray


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates ``(yy, xx)``, read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _ramp(signed_dist: Array) -> Array:
    """Anti-aliased coverage from a signed distance (positive inside), 1 px transition."""
    return np.clip(signed_dist + 0.5, 0.0, 1.0)


def _unit_noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> Array:
    """Gaussian-filtered white noise (periodic boundary) normalised to zero mean, unit std."""
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    n -= n.mean()
    return n / (n.std() + 1e-12)


def _check_category(category: str) -> None:
    if category not in DEMO_CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {DEMO_CATEGORIES}")


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 32 or size % 8:
        raise ValueError(f"size must be an int multiple of 8 and >= 32, got {size!r}")


# --------------------------------------------------------------------------------------------
# normal renderers (clean float RGB in [0, 1], before brightness and noise)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scene:
    """Where defects may be placed: optional object support and a centre sampler."""

    support: Array | None
    sample_centre: Callable[[np.random.Generator], tuple[float, float]]
    fallback_centre: tuple[float, float]


def _texture_scene(size: int) -> _Scene:
    lo, hi = _BORDER + 0.1 * size, size - 1 - _BORDER - 0.1 * size

    def sample(rng: np.random.Generator) -> tuple[float, float]:
        cy, cx = rng.uniform(lo, hi, 2)
        return float(cy), float(cx)

    return _Scene(None, sample, ((size - 1) / 2, (size - 1) / 2))


def _render_weave(rng: np.random.Generator, size: int) -> tuple[Array, _Scene]:
    """Plain weave: alternating warp/weft thread segments with per-thread gains."""
    yy, xx = _grid(size)
    period = max(size / 10, 6.0) * rng.uniform(0.98, 1.02)
    py, px = rng.uniform(0.0, 2 * period, 2)
    u, v = (xx + px) / period, (yy + py) / period
    i, j = np.floor(u), np.floor(v)
    fu, fv = u - i, v - j
    n = int(size / period) + 4
    warp_gain = rng.uniform(0.94, 1.06, n)
    weft_gain = rng.uniform(0.94, 1.06, n)
    ii, jj = i.astype(np.int64) % n, j.astype(np.int64) % n
    warp_top = (ii + jj) % 2 == 0
    su, sv = np.sin(np.pi * fu).clip(0, 1), np.sin(np.pi * fv).clip(0, 1)
    shade = np.where(warp_top, su**0.6 * (0.7 + 0.3 * sv**0.25), sv**0.6 * (0.7 + 0.3 * su**0.25))
    gain = np.where(warp_top, warp_gain[ii], weft_gain[jj])
    fibre = 1.0 + 0.025 * _unit_noise(rng, size, 0.7)
    warp_col = np.array([0.80, 0.72, 0.56])
    weft_col = np.array([0.58, 0.49, 0.37])
    col = np.where(warp_top[..., None], warp_col, weft_col)
    img = col * ((0.35 + 0.65 * shade) * gain * fibre)[..., None]
    return img, _texture_scene(size)


def _render_grain(rng: np.random.Generator, size: int) -> tuple[Array, _Scene]:
    """Wood-like grain: warped growth rings plus anisotropic streak noise."""
    yy, xx = _grid(size)
    s = size / 128
    warp = _unit_noise(rng, size, size / 5)
    freq = rng.uniform(5.0, 7.0) / size
    slant = rng.uniform(-0.15, 0.15)
    t = (yy + slant * xx) * freq + 0.45 * warp + rng.uniform(0.0, 1.0)
    rings = (0.5 + 0.5 * np.cos(2 * np.pi * t)) ** 2
    streak = _unit_noise(rng, size, (max(0.6 * s, 0.5), 8.0 * s))
    fine = _unit_noise(rng, size, 0.6)
    tone = np.clip(0.62 - 0.34 * rings + 0.07 * streak + 0.025 * fine, 0.0, 1.0)
    dark = np.array([0.40, 0.25, 0.13])
    light = np.array([0.80, 0.60, 0.40])
    img = dark + (light - dark) * tone[..., None]
    return img, _texture_scene(size)


def _render_tile(rng: np.random.Generator, size: int) -> tuple[Array, _Scene]:
    """Terracotta tiles on a regular grid with grey grout and a soft bevel."""
    yy, xx = _grid(size)
    s = size / 128
    period = size / 4
    grout = max(2.0, 3.0 * s)
    oy, ox = rng.uniform(0.0, period, 2)
    u, v = (xx + ox) % period, (yy + oy) % period
    edge = np.minimum(np.minimum(u, period - u), np.minimum(v, period - v))
    tile_alpha = _ramp(edge - grout / 2)
    bevel = np.clip((edge - grout / 2) / (3.0 * s + 1.0), 0.0, 1.0)
    n = 6
    tile_gain = rng.uniform(0.97, 1.03, (n, n))
    ti = np.floor((yy + oy) / period).astype(np.int64) % n
    tj = np.floor((xx + ox) / period).astype(np.int64) % n
    speckle = 1.0 + 0.025 * _unit_noise(rng, size, 1.0)
    tile_val = tile_gain[ti, tj] * (0.86 + 0.14 * bevel) * speckle
    grout_val = 1.0 + 0.04 * _unit_noise(rng, size, 0.8)
    tile = np.array([0.72, 0.42, 0.30]) * tile_val[..., None]
    grout_rgb = np.array([0.46, 0.44, 0.41]) * grout_val[..., None]
    img = grout_rgb + (tile - grout_rgb) * tile_alpha[..., None]
    return img, _texture_scene(size)


def _render_disc(rng: np.random.Generator, size: int) -> tuple[Array, _Scene]:
    """A registered object: a shaded metal washer with a drop shadow on a slate background."""
    yy, xx = _grid(size)
    s = size / 128
    cy, cx = (size - 1) / 2 + rng.uniform(-1.5, 1.5, 2)
    r_out, r_in = 0.36 * size, 0.15 * size
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    cover = _ramp(r_out - r) * _ramp(r - r_in)
    # background with a gentle top-to-bottom gradient and a soft shadow offset to bottom-right
    bg_val = (1.06 - 0.12 * yy / size) * (1.0 + 0.02 * _unit_noise(rng, size, 2.0))
    off, soft = 2.5 * max(s, 0.5), 3.0 * max(s, 0.5)
    rs = np.hypot(dy - off, dx - off)
    shadow = np.clip((r_out - rs) / soft + 0.5, 0, 1) * np.clip((rs - r_in) / soft + 0.5, 0, 1)
    bg = np.array([0.20, 0.22, 0.26]) * (bg_val * (1.0 - 0.45 * shadow))[..., None]
    # metal: bevelled radial profile, light from the top-left, fine concentric machining marks
    rn = np.clip((r - r_in) / (r_out - r_in), 0.0, 1.0)
    profile = 0.80 + 0.20 * np.sin(np.pi * rn) ** 0.5
    light = -(dx + dy) / (np.sqrt(2.0) * r_out)
    marks = 0.025 * np.sin(2 * np.pi * r / max(3.0, 4.0 * s))
    metal_val = profile * (1.0 + 0.12 * light) + marks
    metal = np.array([0.70, 0.71, 0.74]) * metal_val[..., None]
    img = bg + (metal - bg) * cover[..., None]

    r_lo, r_hi = r_in + 0.3 * (r_out - r_in), r_out - 0.3 * (r_out - r_in)

    def sample(g: np.random.Generator) -> tuple[float, float]:
        theta, rad = g.uniform(0.0, 2 * np.pi), g.uniform(r_lo, r_hi)
        return float(cy + rad * np.sin(theta)), float(cx + rad * np.cos(theta))

    return img, _Scene(cover, sample, (float(cy), float(cx + (r_in + r_out) / 2)))


_RENDERERS: dict[str, Callable[[np.random.Generator, int], tuple[Array, _Scene]]] = {
    "weave": _render_weave,
    "grain": _render_grain,
    "tile": _render_tile,
    "disc": _render_disc,
}


def _render_base(category: str, rng: np.random.Generator, size: int) -> tuple[Array, _Scene, Array]:
    """Clean image (with flips and brightness) plus its sensor-noise field; fixed RNG order."""
    _check_category(category)
    _check_size(size)
    img, scene = _RENDERERS[category](rng, size)
    if category in TEXTURE_CATEGORIES:
        flip_v, flip_h = rng.random(2) < 0.5
        if flip_v:
            img = img[::-1]
        if flip_h:
            img = img[:, ::-1]
    img = img * rng.uniform(0.95, 1.05)
    sigma = rng.uniform(2.0, 4.0) / 255.0
    noise = rng.normal(0.0, sigma, (size, size, 3))
    return img, scene, noise


def _to_uint8(img: Array) -> Array:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def render_normal(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render one defect-free image of ``category`` as an HxWx3 uint8 array."""
    img, _, noise = _render_base(category, rng, size)
    return _to_uint8(img + noise)


# --------------------------------------------------------------------------------------------
# defects: geometry (coverage alpha) first, appearance (target colour) second
# --------------------------------------------------------------------------------------------


def _segment_dist(yy: Array, xx: Array, p0: Array, p1: Array) -> Array:
    d = p1 - p0
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-12)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _blob(rng: np.random.Generator, size: int, c: tuple[float, float], r: float) -> Array:
    """Irregular elliptical blob of mean radius ``r`` centred at ``c``."""
    yy, xx = _grid(size)
    phi = rng.uniform(0.0, np.pi)
    aspect = rng.uniform(0.65, 1.0)
    dy, dx = yy - c[0], xx - c[1]
    a = dx * np.cos(phi) + dy * np.sin(phi)
    b = (-dx * np.sin(phi) + dy * np.cos(phi)) / aspect
    d, theta = np.hypot(a, b), np.arctan2(b, a)
    radius = np.full_like(d, r)
    for k in (2, 3, 4, 5):
        radius += r * rng.uniform(-0.25, 0.25) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return _ramp(radius - d)


def _geom_scratch(rng: np.random.Generator, size: int, c: tuple[float, float]) -> Array:
    yy, xx = _grid(size)
    s = size / 128
    length = rng.uniform(0.22, 0.40) * size
    ang = rng.uniform(0.0, np.pi)
    half = 0.5 * length * np.array([np.sin(ang), np.cos(ang)])
    width = max(1.2, 2.0 * s) * rng.uniform(0.9, 1.2)
    cc = np.array(c)
    return _ramp(width / 2 - _segment_dist(yy, xx, cc - half, cc + half))


def _walk(rng: np.random.Generator, start: Array, heading: float, n: int, step: float) -> Array:
    pts = [start]
    for _ in range(n):
        heading += rng.normal(0.0, 0.45)
        pts.append(pts[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
    return np.array(pts)


def _geom_crack(rng: np.random.Generator, size: int, c: tuple[float, float]) -> Array:
    yy, xx = _grid(size)
    s = size / 128
    step = max(1.5, 0.035 * size)
    heading = rng.uniform(0.0, 2 * np.pi)
    start = np.array(c)
    fwd = _walk(rng, start, heading, int(rng.integers(4, 7)), step)
    back = _walk(rng, start, heading + np.pi, int(rng.integers(4, 7)), step)
    paths = [fwd, back]
    if rng.random() < 0.6:  # a short side branch
        k = int(rng.integers(1, len(fwd) - 1))
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)
        paths.append(_walk(rng, fwd[k], heading + turn, int(rng.integers(2, 4)), step))
    width = max(1.0, 1.6 * s) * rng.uniform(0.9, 1.2)
    dist = np.full((size, size), np.inf)
    for path in paths:
        for p0, p1 in zip(path[:-1], path[1:], strict=True):
            dist = np.minimum(dist, _segment_dist(yy, xx, p0, p1))
    return _ramp(width / 2 - dist)


def _geom_specks(rng: np.random.Generator, size: int, c: tuple[float, float]) -> Array:
    yy, xx = _grid(size)
    s = size / 128
    n = int(rng.integers(6, 13))
    centres = np.array(c) + rng.normal(0.0, 0.04 * size, (n, 2))
    radii = rng.uniform(1.0, 2.2, n) * max(s, 0.5)
    alpha = np.zeros((size, size))
    for (py, px), rad in zip(centres, radii, strict=True):
        alpha = np.maximum(alpha, _ramp(rad - np.hypot(yy - py, xx - px)))
    return alpha


def _blob_geom(r_lo: float, r_hi: float) -> Callable[..., Array]:
    def geom(rng: np.random.Generator, size: int, c: tuple[float, float]) -> Array:
        return _blob(rng, size, c, rng.uniform(r_lo, r_hi) * size)

    return geom


_GEOMETRY: dict[str, Callable[[np.random.Generator, int, tuple[float, float]], Array]] = {
    "scratch": _geom_scratch,
    "crack": _geom_crack,
    "contamination": _geom_specks,
    "stain": _blob_geom(0.055, 0.09),
    "faint_spot": _blob_geom(0.06, 0.10),
    "hole": _blob_geom(0.045, 0.075),
    "structural": _blob_geom(0.08, 0.11),
}

_SCRATCH_COLOUR = {
    "weave": (0.93, 0.90, 0.84),
    "grain": (0.93, 0.81, 0.63),
    "tile": (0.92, 0.86, 0.80),
    "disc": (0.97, 0.97, 1.00),
}
_STAIN_TINTS = {
    "weave": ((0.62, 0.50, 0.36), (0.55, 0.62, 0.85)),
    "grain": ((0.55, 0.50, 0.45), (0.50, 0.55, 0.85)),
    "tile": ((0.60, 0.55, 0.50), (0.85, 0.95, 1.25)),
    "disc": ((0.80, 0.50, 0.30), (0.62, 0.58, 0.50)),
}


def _acceptable(alpha: Array, size: int) -> bool:
    b = _BORDER
    touched = alpha > 0
    if touched[:b].any() or touched[-b:].any() or touched[:, :b].any() or touched[:, -b:].any():
        return False
    area = np.count_nonzero(alpha >= _MASK_THRESHOLD) / (size * size)
    return _MIN_AREA <= area <= _MAX_AREA


def _defect_alpha(
    defect_type: str, rng: np.random.Generator, size: int, scene: _Scene
) -> tuple[Array, tuple[float, float]]:
    """Rejection-sample a defect shape that fits the area and border constraints."""
    geom = _GEOMETRY[defect_type]
    for _ in range(_MAX_TRIES):
        centre = scene.sample_centre(rng)
        alpha = geom(rng, size, centre)
        if scene.support is not None:
            alpha = alpha * scene.support
        if _acceptable(alpha, size):
            return alpha, centre
    # Practically unreachable; a small blob that always satisfies the constraints.
    centre = scene.fallback_centre
    yy, xx = _grid(size)
    alpha = _ramp(0.06 * size - np.hypot(yy - centre[0], xx - centre[1]))
    b = _BORDER
    alpha[:b] = alpha[-b:] = 0.0
    alpha[:, :b] = alpha[:, -b:] = 0.0
    return alpha, centre


def _rotate_about(img: Array, centre: tuple[float, float], angle: float) -> Array:
    yy, xx = _grid(img.shape[0])
    ca, sa = np.cos(angle), np.sin(angle)
    dy, dx = yy - centre[0], xx - centre[1]
    coords = np.stack([centre[0] + ca * dy - sa * dx, centre[1] + sa * dy + ca * dx])
    return np.stack(
        [ndimage.map_coordinates(img[..., ch], coords, order=1, mode="mirror") for ch in range(3)],
        axis=-1,
    )


def _defect_target(
    category: str,
    defect_type: str,
    img: Array,
    centre: tuple[float, float],
    rng: np.random.Generator,
) -> Array:
    """The colour a fully covered defect pixel takes (same shape as ``img``)."""
    if defect_type == "scratch":
        return np.broadcast_to(
            np.array(_SCRATCH_COLOUR[category]) * rng.uniform(0.95, 1.0), img.shape
        )
    if defect_type == "crack":
        return img * rng.uniform(0.12, 0.25)
    if defect_type == "stain":
        tints = _STAIN_TINTS[category]
        tint = np.array(tints[int(rng.integers(len(tints)))]) * rng.uniform(0.9, 1.0)
        return img * tint
    if defect_type == "faint_spot":
        return img * (1.0 + rng.choice([-1.0, 1.0]) * rng.uniform(0.10, 0.15))
    if defect_type == "hole":
        return np.broadcast_to(np.array([0.05, 0.05, 0.06]) * rng.uniform(0.8, 1.2), img.shape)
    if defect_type == "contamination":
        return np.broadcast_to(np.array([0.98, 0.97, 0.93]) * rng.uniform(0.95, 1.0), img.shape)
    if defect_type == "structural":
        angle = rng.choice([-1.0, 1.0]) * np.deg2rad(rng.uniform(25.0, 65.0))
        return _rotate_about(img, centre, angle)
    raise ValueError(f"unknown defect type {defect_type!r}")  # pragma: no cover


def render_defect(
    category: str, defect_type: str, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render a defective image and its bool mask.

    The normal part consumes ``rng`` exactly like :func:`render_normal`, so with equally seeded
    generators the two images are identical outside the defect.
    """
    _check_category(category)
    if defect_type not in DEFECT_TYPES[category]:
        raise ValueError(
            f"unknown defect type {defect_type!r} for {category!r}; "
            f"expected one of {DEFECT_TYPES[category]}"
        )
    img, scene, noise = _render_base(category, rng, size)
    alpha, centre = _defect_alpha(defect_type, rng, size, scene)
    target = _defect_target(category, defect_type, img, centre, rng)
    a = alpha[..., None]
    out = img * (1.0 - a) + target * a
    return _to_uint8(out + noise), alpha >= _MASK_THRESHOLD


# --------------------------------------------------------------------------------------------
# writing to disk
# --------------------------------------------------------------------------------------------


def _rng(seed: int, category: str, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, DEMO_CATEGORIES.index(category), split, index])


def _save_png(array: Array, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _params(
    category: str, size: int, n_train: int, n_test_good: int, n_defect: int, seed: int
) -> dict[str, object]:
    return {
        "generator_version": GENERATOR_VERSION,
        "category": category,
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect_per_type": n_defect,
        "seed": seed,
        "defect_types": list(DEFECT_TYPES[category]),
    }


def _check_counts(n_train: int, n_test_good: int, n_defect: int, seed: int) -> None:
    for name, value, low in (
        ("n_train", n_train, 1),
        ("n_test_good", n_test_good, 0),
        ("n_test_defect_per_type", n_defect, 0),
        ("seed", seed, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _marker_matches(folder: Path, params: dict[str, object]) -> bool:
    try:
        return json.loads((folder / MARKER_NAME).read_text()) == params
    except (OSError, ValueError):
        return False


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _conflict(folder: Path) -> FileExistsError:
    return FileExistsError(
        f"{folder} exists but is incomplete or was generated with different parameters; "
        "pass overwrite=True or pick another folder"
    )


def _write_category(
    folder: Path, category: str, size: int, n_train: int, n_good: int, n_defect: int, seed: int
) -> None:
    for split, sub, count in ((_SPLIT_TRAIN, "train", n_train), (_SPLIT_TEST_GOOD, "test", n_good)):
        out = folder / sub / "good"
        out.mkdir(parents=True)
        for i in range(count):
            _save_png(
                render_normal(category, _rng(seed, category, split, i), size), out / f"{i:03d}.png"
            )
    for k, defect in enumerate(DEFECT_TYPES[category]):
        out, gt = folder / "test" / defect, folder / "ground_truth" / defect
        out.mkdir(parents=True)
        gt.mkdir(parents=True)
        for i in range(n_defect):
            rng = _rng(seed, category, _SPLIT_DEFECT0 + k, i)
            img, mask = render_defect(category, defect, rng, size)
            _save_png(img, out / f"{i:03d}.png")
            _save_png(mask.astype(np.uint8) * 255, gt / f"{i:03d}_mask.png")


def generate_category(
    root: str | Path,
    category: str,
    *,
    size: int = 128,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_defect_per_type: int = 6,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write one category under ``root/category`` and return that folder.

    A complete folder with matching parameters (see :data:`MARKER_NAME`) is left untouched. Any
    other existing non-empty folder raises :class:`FileExistsError` unless ``overwrite`` is true.
    The category is written into a temporary sibling folder and renamed into place at the end.
    """
    _check_category(category)
    _check_size(size)
    _check_counts(n_train, n_test_good, n_test_defect_per_type, seed)
    root = Path(root)
    target = root / category
    params = _params(category, size, n_train, n_test_good, n_test_defect_per_type, seed)
    if _marker_matches(target, params):
        return target
    if (target.exists() or target.is_symlink()) and not overwrite and not _is_empty_dir(target):
        raise _conflict(target)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.tmp-", dir=root))
    try:
        _write_category(tmp, category, size, n_train, n_test_good, n_test_defect_per_type, seed)
        (tmp / MARKER_NAME).write_text(json.dumps(params, sort_keys=True) + "\n")
        if target.exists() or target.is_symlink():
            # Move the old folder aside first so the swap never exposes a half-written folder.
            trash = Path(tempfile.mkdtemp(prefix=f".{category}.old-", dir=root))
            os.rename(target, trash / category)
            try:
                os.rename(tmp, target)
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process may have finished the same category concurrently.
                if not _marker_matches(target, params):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def generate_demo_dataset(
    root: str | Path,
    *,
    categories: Iterable[str] = DEMO_CATEGORIES,
    size: int = 128,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_defect_per_type: int = 6,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write every requested category under ``root`` (skipping complete ones) and return ``root``.

    All categories are checked for conflicts before anything is written, so a
    :class:`FileExistsError` leaves the folder unchanged.
    """
    cats = list(dict.fromkeys(categories))
    for category in cats:
        _check_category(category)
    _check_size(size)
    _check_counts(n_train, n_test_good, n_test_defect_per_type, seed)
    root = Path(root)
    if not overwrite:
        for category in cats:
            target = root / category
            params = _params(category, size, n_train, n_test_good, n_test_defect_per_type, seed)
            exists = target.exists() or target.is_symlink()
            if exists and not _marker_matches(target, params) and not _is_empty_dir(target):
                raise _conflict(target)
    root.mkdir(parents=True, exist_ok=True)
    for category in cats:
        generate_category(
            root,
            category,
            size=size,
            n_train=n_train,
            n_test_good=n_test_good,
            n_test_defect_per_type=n_test_defect_per_type,
            seed=seed,
            overwrite=overwrite,
        )
    return root
