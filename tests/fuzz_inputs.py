"""A seeded fuzz campaign for the image readers and the model loader.

Valid seed files (PNG 8/16 bit gray and colour, JPEG, BMP, TIFF: strips, zlib, tiled LZW,
float, multi-page; a small model in safetensors) are mutated: bit flips, truncation,
spliced byte ranges, and header fields set to extreme values (PNG IHDR, BMP and JPEG
sizes and depths, TIFF tags such as sizes, bit depth, strip and tile offsets; the
safetensors header length, dtypes, shapes, data offsets and the config metadata). Each
case must end in a result or one :class:`PyramidFlowError` line that names the file:
anything else (another exception, a message over several lines or without the file) is
counted as ``bad`` and listed.

Used by ``tests/test_fuzz.py`` (a short run in CI, in a subprocess whose time and peak
memory are bounded) and ``bench/fuzz_campaign.py`` (the long run). Run directly:
``python tests/fuzz_inputs.py --seed 0 --cases 200`` prints the counts as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

EXTREME_U32 = (0, 1, 2, 255, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
EXTREME_U16 = (0, 1, 2, 3, 8, 255, 0x7FFF, 0xFFFF)
#: TIFF tags worth breaking: sizes, depth, compression, layout, strip and tile data.
TIFF_TAGS = (256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 322, 323, 324, 325, 339)
SAFETENSORS_DTYPES = ("F16", "BF16", "F32", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "X9", "")
CONFIG_EXTREMES: dict[str, list[Any]] = {
    "levels": [0, 1, 17, 2**31, -3, "4", None],
    "channels": [0, 2**31, 2**62, 3.5],
    "stacks": [0, 10**6],
    "kernel_size": [0, 2, 10**5],
    "image_size": [[0, 0], [2**30, 2**30], [-8, 8], [8], "big"],
    "in_channels": [0, 2, 2**20],
    "mean": [[], [float("nan")] * 3, "x"],
    "std": [[0, 0, 0], [-1.0, 1.0, 1.0]],
    "geometry": ["sideways", 3],
    "scoring": ["none"],
    "max_pixels": [0, -1, 2**70],
}


# -- seed files -------------------------------------------------------------------------------


def seed_images() -> dict[str, bytes]:
    """Small valid files of every supported format, by name (the suffix picks the reader)."""
    import imagecodecs
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (24, 20), dtype=np.uint8)
    rgb = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (24, 20), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (24, 20, 3), dtype=np.uint16)

    def pillow(array: np.ndarray, fmt: str, **options: Any) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **options)
        return buffer.getvalue()

    def tiff(array: np.ndarray, **options: Any) -> bytes:
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, array, **options)
        return buffer.getvalue()

    pages = io.BytesIO()
    with tifffile.TiffWriter(pages) as writer:
        writer.write(gray)
        writer.write(gray16)
    return {
        "gray.png": pillow(gray, "PNG"),
        "rgb.png": pillow(rgb, "PNG"),
        "gray16.png": pillow(gray16, "PNG"),
        "rgb16.png": imagecodecs.png_encode(rgb16),
        "rgb.jpg": pillow(rgb, "JPEG", quality=90),
        "gray.jpg": pillow(gray, "JPEG", quality=90),
        "rgb.bmp": pillow(rgb, "BMP"),
        "gray.tif": tiff(gray),
        "zlib16.tif": tiff(gray16, compression="zlib"),
        "tiled_lzw.tif": tiff(rgb16, compression="lzw", tile=(16, 16)),
        "float.tif": tiff(rng.random((24, 20), dtype=np.float32)),
        "pages.tif": pages.getvalue(),
    }


def seed_model(folder: Path) -> bytes:
    """A small, complete model file (weights, template, config, threshold)."""
    import torch

    from pyramidflow import Config, PyramidFlow
    from pyramidflow.io.checkpoint import save_checkpoint
    from pyramidflow.model.flow import level_sizes

    config = Config(image_size=16, levels=2, stacks=1, channels=4, kernel_size=3)
    torch.manual_seed(0)
    model = PyramidFlow(config)
    template = [torch.zeros(4, h, w) for h, w in level_sizes(config.image_size, config.levels)]
    path = save_checkpoint(folder / "seed.safetensors", model, template, info={"threshold": 1.0})
    return path.read_bytes()


# -- mutations --------------------------------------------------------------------------------


def flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        position = int(rng.integers(0, len(out)))
        out[position] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def splice(data: bytes, rng: np.random.Generator) -> bytes:
    """A random byte range deleted or repeated."""
    start = int(rng.integers(0, len(data)))
    stop = min(len(data), start + int(rng.integers(1, 64)))
    if rng.random() < 0.5:
        return data[:start] + data[stop:]
    return data[:stop] + data[start:stop] + data[stop:]


def _png_field(data: bytes, rng: np.random.Generator) -> bytes:
    """IHDR width, height, bit depth, colour type or interlace set to an extreme value,
    with a correct CRC (so the decoder gets past the checksum)."""
    out = bytearray(data)
    field = int(rng.integers(0, 5))
    if field < 2:
        struct.pack_into(">I", out, 16 + 4 * field, int(rng.choice(EXTREME_U32)))
    else:
        out[24 + field - 2] = int(rng.choice((0, 1, 2, 3, 4, 6, 7, 8, 16, 255)))
    struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])))
    return bytes(out)


def _bmp_field(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    offset, kind = [(10, "<I"), (18, "<i"), (22, "<i"), (28, "<H"), (30, "<I"), (34, "<I")][
        int(rng.integers(0, 6))
    ]
    values = EXTREME_U16 if kind == "<H" else EXTREME_U32
    value = int(rng.choice(values))
    if kind == "<i":
        value = int(np.array(value, dtype=np.uint32).view(np.int32))
    struct.pack_into(kind, out, offset, value)
    return bytes(out)


def _jpeg_field(data: bytes, rng: np.random.Generator) -> bytes:
    """The frame header's precision, height, width or component count."""
    out = bytearray(data)
    start = data.find(b"\xff\xc0")
    if start < 0:
        return flip_bits(data, rng)
    field = int(rng.integers(0, 4))
    if field == 0:
        out[start + 4] = int(rng.choice((0, 1, 8, 12, 16, 255)))
    elif field == 3:
        out[start + 9] = int(rng.choice((0, 1, 2, 4, 255)))
    else:
        struct.pack_into(">H", out, start + 3 + 2 * field, int(rng.choice(EXTREME_U16)))
    return bytes(out)


def _tiff_field(data: bytes, rng: np.random.Generator) -> bytes:
    """One tag of the first IFD (little-endian classic TIFF) set to an extreme value."""
    out = bytearray(data)
    if data[:4] != b"II*\x00":
        return flip_bits(data, rng)
    ifd = struct.unpack_from("<I", data, 4)[0]
    if ifd + 2 > len(data):
        return flip_bits(data, rng)
    count = struct.unpack_from("<H", data, ifd)[0]
    entries = [ifd + 2 + 12 * i for i in range(count) if ifd + 14 + 12 * i <= len(data)]
    wanted = [e for e in entries if struct.unpack_from("<H", data, e)[0] in TIFF_TAGS]
    if not wanted:
        return flip_bits(data, rng)
    entry = int(rng.choice(wanted))
    kind = struct.unpack_from("<H", data, entry + 2)[0]
    if rng.random() < 0.2:  # the value count instead of the value
        struct.pack_into("<I", out, entry + 4, int(rng.choice(EXTREME_U32)))
    elif kind == 3:  # SHORT
        struct.pack_into("<H", out, entry + 8, int(rng.choice(EXTREME_U16)))
    else:
        struct.pack_into("<I", out, entry + 8, int(rng.choice(EXTREME_U32)))
    return bytes(out)


_FIELDS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    ".png": _png_field,
    ".bmp": _bmp_field,
    ".jpg": _jpeg_field,
    ".tif": _tiff_field,
}


def _safetensors_parts(data: bytes) -> tuple[dict[str, Any], bytes]:
    length = struct.unpack_from("<Q", data, 0)[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _safetensors_join(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _safetensors_field(data: bytes, rng: np.random.Generator) -> bytes:
    """The header length, a tensor's dtype, shape or offsets, or a config field."""
    header, body = _safetensors_parts(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = names[int(rng.integers(0, len(names)))]
    field = int(rng.integers(0, 5))
    if field == 0:
        value = int(rng.choice((0, 1, 7, 2**20, 2**40, 2**63, len(data), len(data) - 9)))
        return struct.pack("<Q", value) + data[8:]
    if field == 1:
        header[name]["dtype"] = str(rng.choice(SAFETENSORS_DTYPES))
    elif field == 2:
        choices: list[list[int]] = [[0], [2**40], [-1], [1, 1, 1, 1, 1], [], [2**31, 2**31]]
        header[name]["shape"] = choices[int(rng.integers(0, len(choices)))]
    elif field == 3:
        start, stop = header[name]["data_offsets"]
        choices = [[0, 2**63], [stop, start], [0, len(body) + 8], [2**40, 2**40 + 4], [0, 0]]
        header[name]["data_offsets"] = choices[int(rng.integers(0, len(choices)))]
    else:
        metadata = header.setdefault("__metadata__", {})
        config = json.loads(metadata.get("config", "{}"))
        key = sorted(CONFIG_EXTREMES)[int(rng.integers(0, len(CONFIG_EXTREMES)))]
        options = CONFIG_EXTREMES[key]
        config[key] = options[int(rng.integers(0, len(options)))]
        metadata["config"] = json.dumps(config)
        if rng.random() < 0.2:
            metadata[str(rng.choice(("format_version", "info", "format")))] = "{not json"
    return _safetensors_join(header, body)


def mutate(name: str, data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """(mutation kind, mutated bytes) of one seed file."""
    kind = str(rng.choice(("flip", "truncate", "splice", "field", "field")))
    if kind == "flip":
        return kind, flip_bits(data, rng)
    if kind == "truncate":
        return kind, truncate(data, rng)
    if kind == "splice":
        return kind, splice(data, rng)
    if name.endswith(".safetensors"):
        return kind, _safetensors_field(data, rng)
    return kind, _FIELDS[Path(name).suffix](data, rng)


# -- running ----------------------------------------------------------------------------------


def classify(call: Callable[[Path], object], path: Path) -> tuple[str, str]:
    """("result" | "refused" | "bad", message) of one call on one file."""
    from pyramidflow.errors import PyramidFlowError

    try:
        call(path)
    except PyramidFlowError as exc:
        message = str(exc)
        if "\n" in message or str(path) not in message:
            return "bad", f"message not one line naming the file: {message!r}"
        return "refused", message
    except Exception as exc:  # anything else is a bug the campaign is there to find
        return "bad", f"{type(exc).__name__}: {str(exc)[:200]}"
    return "result", ""


def campaign(seed: int, cases: int, max_pixels: int = 2**22) -> dict[str, Any]:
    """Run ``cases`` mutated files (images and model files in turn) and count outcomes."""
    from pyramidflow import Config
    from pyramidflow.io.checkpoint import load_checkpoint
    from pyramidflow.io.images import read_array
    from pyramidflow.preprocess import prepare

    config = Config(image_size=16, levels=2, stacks=1, channels=4, kernel_size=3)

    def read_and_prepare(path: Path) -> object:
        array = read_array(path, max_pixels)
        return prepare(array, config.replace(in_channels=3), str(path))

    rng = np.random.default_rng(seed)
    counts: Counter[str] = Counter()
    bad: list[dict[str, Any]] = []
    slowest = (0.0, "")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seeds = {**seed_images(), "model.safetensors": seed_model(folder)}
        names = sorted(seeds)
        for case in range(cases):
            name = names[case % len(names)]
            kind, data = mutate(name, seeds[name], rng)
            path = folder / f"case{case:05d}_{name}"
            path.write_bytes(data)
            call = load_checkpoint if name.endswith(".safetensors") else read_and_prepare
            start = time.perf_counter()
            outcome, message = classify(call, path)
            slowest = max(slowest, (time.perf_counter() - start, f"case {case} {name} {kind}"))
            target = "model" if name.endswith(".safetensors") else "image"
            counts[f"{target} {outcome}"] += 1
            if outcome == "bad":
                bad.append({"case": case, "seed_file": name, "mutation": kind, "error": message})
            path.unlink()
    return {
        "seed": seed,
        "cases": cases,
        "max_pixels": max_pixels,
        "counts": dict(sorted(counts.items())),
        "slowest_case_s": round(slowest[0], 3),
        "slowest_case": slowest[1],
        "bad": bad,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM of its address space). Not
    ``ru_maxrss``: Linux carries the maximum of the address space a process replaced by
    ``exec`` into it, and a child that Python's subprocess starts with vfork replaces its
    parent's, so its ``ru_maxrss`` can be the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="seeded fuzz campaign of readers and loader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--max-pixels", type=int, default=2**22)
    args = parser.parse_args(argv)
    json.dump(campaign(args.seed, args.cases, args.max_pixels), sys.stdout)
    print()


if __name__ == "__main__":
    main()
