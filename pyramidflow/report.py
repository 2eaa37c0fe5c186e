"""A static HTML report: metrics table, score histogram, grid of overlays.

One self-contained ``report.html`` next to the images it shows (relative links only, the
histogram inline as SVG): it opens from the disk in any browser, without a server.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ReportItem:
    """One image in the report; ``label`` is ``"good"``, a defect type, or ``None`` (unknown)."""

    source: str
    score: float
    overlay: str  # path relative to the report
    is_anomalous: bool | None = None
    label: str | None = None


def _histogram_svg(items: Sequence[ReportItem], threshold: float | None, bins: int = 30) -> str:
    scores = np.array([i.score for i in items], dtype=np.float64)
    if scores.size == 0:
        return "<p>no scores</p>"
    low, high = float(scores.min()), float(scores.max())
    if threshold is not None:
        low, high = min(low, threshold), max(high, threshold)
    if high <= low:
        high = low + 1.0
    edges = np.linspace(low, high, bins + 1)
    groups = {
        "good": [i.score for i in items if i.label == "good"],
        "defective": [i.score for i in items if i.label not in (None, "good")],
        "unlabelled": [i.score for i in items if i.label is None],
    }
    colours = {"good": "#2b8cbe", "defective": "#e34a33", "unlabelled": "#777777"}
    counts = {k: np.histogram(v, edges)[0] for k, v in groups.items() if v}
    peak = max(int(c.max()) for c in counts.values())
    width, height, pad = 640, 220, 30
    bar = (width - 2 * pad) / bins
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
        'role="img" aria-label="histogram of image scores">'
    ]
    for name, count in counts.items():
        for b, c in enumerate(count):
            if c == 0:
                continue
            h = (height - pad) * c / peak
            x = pad + b * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colours[name]}" fill-opacity="0.55"><title>{name}: {c}</title></rect>'
            )
    if threshold is not None:
        x = pad + (threshold - low) / (high - low) * (width - 2 * pad)
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad / 2}" x2="{x:.1f}" y2="{height}" stroke="black" '
            'stroke-dasharray="4 3"><title>threshold</title></line>'
        )
    parts.append(
        f'<text x="{pad}" y="{height + 18}" font-size="12">{low:.4g}</text>'
        f'<text x="{width - pad}" y="{height + 18}" font-size="12" text-anchor="end">'
        f"{high:.4g}</text>"
    )
    legend_x = pad
    for name in counts:
        parts.append(
            f'<rect x="{legend_x}" y="{height + 26}" width="10" height="10" '
            f'fill="{colours[name]}"/><text x="{legend_x + 14}" y="{height + 35}" '
            f'font-size="12">{name}</text>'
        )
        legend_x += 110
    parts.append("</svg>")
    return "".join(parts)


def _metrics_table(metrics: Mapping[str, float]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not math.isnan(v)
    )
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def write_report(
    path: str | os.PathLike[str],
    items: Sequence[ReportItem],
    *,
    title: str = "pyramidflow report",
    threshold: float | None = None,
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """Write the HTML report to ``path`` (atomically) and return it."""
    path = Path(path)
    cards = []
    for item in sorted(items, key=lambda i: -i.score):
        verdict = (
            "" if item.is_anomalous is None else (" anomalous" if item.is_anomalous else " normal")
        )
        label = "" if item.label is None else f" | {html.escape(item.label)}"
        cards.append(
            f'<figure class="{verdict.strip()}"><img src="{html.escape(item.overlay)}" '
            f'alt="{html.escape(item.source)}" loading="lazy"><figcaption>'
            f"{html.escape(Path(item.source).name)}<br>score {item.score:.4g}{verdict}{label}"
            "</figcaption></figure>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; width: 200px; font-size: 12px; }}
figure img {{ width: 200px; image-rendering: pixelated; }}
figure.anomalous figcaption {{ color: #c0392b; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(items)} image(s){"" if threshold is None else f"; threshold {threshold:.4g}"}</p>
{"" if not metrics else "<h2>Metrics</h2>" + _metrics_table(metrics)}
<h2>Image scores</h2>
{_histogram_svg(items, threshold)}
<h2>Anomaly maps (highest score first)</h2>
<div class="grid">{"".join(cards)}</div>
</body></html>
"""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
