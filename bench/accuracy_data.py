"""The accuracy validation suite's data: procedural categories with natural variation.

Not the demo data (``pyramidflow.synthetic``): these categories are built to be hard in
the ways real inspection images are hard, with the good images varying a lot among
themselves:

- ``fractal``: a stochastic texture, fractal (1/f) noise with a random spectral slope,
  contrast, brightness and colour cast per image (like stone, concrete, vegetation);
- ``pebbles``: cells of random size and shade with dark gaps (a Voronoi pattern with
  per-cell shading noise), no two images alike;
- ``fibres``: an oriented texture whose orientation drifts smoothly across the image
  (paper, brushed metal, wood), random mean orientation per image;
- ``part``: a registered object (a plate with holes and a slot) under nuisances: an
  illumination gradient, a shift of up to 2 px, sensor noise.

Defects, each with an exact mask: ``spot`` (a soft blob brighter or darker than its
surround), ``scratch`` (a thin curved line), ``patch`` (a square of the texture from
another image, i.e. structurally wrong but with plausible statistics), ``specks`` (a
cluster of small dots). Written in the MVTec AD layout (``train/good``, ``test/<kind>``,
``ground_truth/<kind>/<stem>_mask.png``) as 8-bit RGB PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

CATEGORIES = ("fractal", "pebbles", "fibres", "part")
DEFECTS = ("spot", "scratch", "patch", "specks")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size, dtype=np.float64) / size
    return np.meshgrid(axis, axis, indexing="ij")


def _fractal_field(rng: np.random.Generator, size: int, slope: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with a 1/f^slope amplitude spectrum."""
    freq = np.fft.fftfreq(size)
    radius = np.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / radius**slope
    spectrum[0, 0] = 0.0
    field = np.fft.ifft2(spectrum).real
    return (field - field.mean()) / (field.std() + 1e-12)


def _colourize(gray: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Gray (H, W) in about [0, 1] -> RGB with a random colour cast per image."""
    cast = 1.0 + spread * rng.normal(size=3)
    return np.clip(gray[..., None] * cast[None, None, :], 0.0, 1.0)


def render_fractal(rng: np.random.Generator, size: int) -> np.ndarray:
    slope = rng.uniform(1.2, 1.9)
    field = _fractal_field(rng, size, slope)
    gray = rng.uniform(0.4, 0.6) + rng.uniform(0.10, 0.18) * field
    return _colourize(gray, rng, 0.06)


def render_pebbles(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = int(rng.integers(40, 70))
    centres = rng.uniform(0, size, size=(cells, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    distance = np.full((size, size), np.inf)
    second = np.full((size, size), np.inf)
    label = np.zeros((size, size), np.int64)
    for index, (cy, cx) in enumerate(centres):
        # periodic distance, so the pattern has no border effects
        dy = np.minimum(np.abs(yy - cy), size - np.abs(yy - cy))
        dx = np.minimum(np.abs(xx - cx), size - np.abs(xx - cx))
        d = np.hypot(dy, dx)
        closer = d < distance
        second = np.where(closer, distance, np.minimum(second, d))
        label = np.where(closer, index, label)
        distance = np.where(closer, d, distance)
    shade = rng.uniform(0.35, 0.75, size=cells)[label]
    gap = np.clip((second - distance) / 3.0, 0.0, 1.0)  # dark mortar between cells
    texture = 0.05 * _fractal_field(rng, size, 1.0)
    gray = (shade + texture) * (0.45 + 0.55 * gap)
    return _colourize(gray, rng, 0.05)


def render_fibres(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(0, np.pi)
    drift = 0.6 * ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 6)
    drift /= np.abs(drift).max() + 1e-12
    angle = base + 0.5 * drift
    noise = rng.normal(size=(size, size))
    # anisotropic smoothing: a set of oriented line filters, picked per pixel by angle
    out = np.zeros((size, size))
    steps = 8
    length = 9
    for k in range(steps):
        theta = np.pi * k / steps
        kernel = np.zeros((length, length))
        centre = length // 2
        for t in np.linspace(-centre, centre, 4 * length):
            kernel[
                int(round(centre + t * np.sin(theta))), int(round(centre + t * np.cos(theta)))
            ] = 1
        kernel /= kernel.sum()
        filtered = ndimage.convolve(noise, kernel, mode="wrap")
        weight = np.cos(angle - theta) ** 16
        out += weight * filtered
    out = (out - out.mean()) / (out.std() + 1e-12)
    gray = rng.uniform(0.45, 0.6) + rng.uniform(0.08, 0.14) * out
    return _colourize(gray, rng, 0.05)


def render_part(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    shift = rng.uniform(-2, 2, size=2) / size
    y, x = yy - 0.5 - shift[0], xx - 0.5 - shift[1]
    plate = (np.abs(y) < 0.36) & (np.abs(x) < 0.36)
    holes = np.zeros_like(plate)
    for cy, cx in ((-0.2, -0.2), (-0.2, 0.2), (0.2, -0.2), (0.2, 0.2)):
        holes |= (y - cy) ** 2 + (x - cx) ** 2 < 0.06**2
    slot = (np.abs(y) < 0.03) & (np.abs(x) < 0.18)
    gray = np.where(plate & ~holes & ~slot, 0.7, 0.2)
    gray = ndimage.gaussian_filter(gray, 0.8)
    light = 1.0 + rng.uniform(-0.25, 0.25) * (y * np.cos(rng.uniform(0, 2 * np.pi)) + x)
    gray = gray * light + 0.02 * rng.normal(size=(size, size))
    return _colourize(gray, rng, 0.02)


RENDERERS = {
    "fractal": render_fractal,
    "pebbles": render_pebbles,
    "fibres": render_fibres,
    "part": render_part,
}


def _defect_centre(rng: np.random.Generator, size: int, category: str) -> tuple[float, float]:
    margin = 0.3 if category == "part" else 0.15  # on the plate for the object
    return tuple(rng.uniform(margin, 1 - margin, size=2) * size)


def add_defect(
    image: np.ndarray, category: str, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A defective copy of ``image`` (float RGB in [0, 1]) and its bool mask."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = _defect_centre(rng, size, category)
    out = image.copy()
    if kind == "spot":
        radius = rng.uniform(0.03, 0.07) * size
        weight = np.clip(1.5 - np.hypot(yy - cy, xx - cx) / radius, 0.0, 1.0)
        change = rng.choice([-1, 1]) * rng.uniform(0.15, 0.25)
        out = out + (change * weight)[..., None]
        mask = weight > 0.25
    elif kind == "scratch":
        length = rng.uniform(0.2, 0.4) * size
        angle = rng.uniform(0, np.pi)
        bend = rng.uniform(-0.3, 0.3)
        t = np.linspace(-0.5, 0.5, 200)
        py = cy + length * t * np.sin(angle) + bend * length * (t**2 - 0.25) * np.cos(angle)
        px = cx + length * t * np.cos(angle) - bend * length * (t**2 - 0.25) * np.sin(angle)
        distance = np.full((size, size), np.inf)
        for qy, qx in zip(py, px, strict=True):
            distance = np.minimum(distance, np.hypot(yy - qy, xx - qx))
        weight = np.clip(1.6 - distance, 0.0, 1.0)
        out = out + (rng.choice([-1, 1]) * 0.3 * weight)[..., None]
        mask = distance <= 1.2
    elif kind == "patch":
        side = int(rng.uniform(0.12, 0.2) * size)
        donor = RENDERERS[category](rng, size)
        if category == "part":  # a part needs a foreign structure: take a texture
            donor = render_fractal(rng, size)
        y0 = int(np.clip(cy - side / 2, 0, size - side))
        x0 = int(np.clip(cx - side / 2, 0, size - side))
        sy, sx = rng.integers(0, size - side, size=2)
        out[y0 : y0 + side, x0 : x0 + side] = donor[sy : sy + side, sx : sx + side]
        mask = np.zeros((size, size), bool)
        mask[y0 : y0 + side, x0 : x0 + side] = True
    elif kind == "specks":
        mask = np.zeros((size, size), bool)
        change = np.zeros((size, size))
        sign = rng.choice([-1, 1])
        for _ in range(int(rng.integers(4, 9))):
            qy, qx = cy + rng.normal(0, 0.03 * size), cx + rng.normal(0, 0.03 * size)
            radius = rng.uniform(1.0, 2.2)
            weight = np.clip(1.0 + radius - np.hypot(yy - qy, xx - qx), 0.0, 1.0)
            change = np.maximum(change, weight)
            mask |= np.hypot(yy - qy, xx - qx) <= radius
        out = out + (sign * 0.35 * change)[..., None]
    else:
        raise ValueError(f"unknown defect kind {kind!r}; known: {', '.join(DEFECTS)}")
    return np.clip(out, 0.0, 1.0), mask


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels.dtype == bool:
        Image.fromarray(pixels.astype(np.uint8) * 255).save(path)
    else:
        Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(path)


def write_category(
    root: Path,
    category: str,
    *,
    size: int = 256,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_defect_per_kind: int = 5,
    seed: int = 0,
) -> Path:
    """Write one category (MVTec AD layout) under ``root/category``; returns its folder.
    An existing complete folder with the same parameters is reused."""
    folder = root / category
    stamp = folder / "parameters.txt"
    params = f"{size} {n_train} {n_test_good} {n_test_defect_per_kind} {seed}\n"
    if stamp.is_file() and stamp.read_text() == params:
        return folder
    render = RENDERERS[category]
    base = [seed, CATEGORIES.index(category)]
    for i in range(n_train):
        image = render(np.random.default_rng([*base, 0, i]), size)
        _save(folder / "train" / "good" / f"{i:03d}.png", image)
    for i in range(n_test_good):
        image = render(np.random.default_rng([*base, 1, i]), size)
        _save(folder / "test" / "good" / f"{i:03d}.png", image)
    for k, kind in enumerate(DEFECTS):
        for i in range(n_test_defect_per_kind):
            rng = np.random.default_rng([*base, 2 + k, i])
            image, mask = add_defect(render(rng, size), category, kind, rng)
            _save(folder / "test" / kind / f"{i:03d}.png", image)
            _save(folder / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    stamp.write_text(params)
    return folder
