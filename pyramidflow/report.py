"""A static HTML report: metrics table, score histogram, grid of overlays.

One self-contained ``report.html`` next to the images it shows: relative links only, the
histogram inline as SVG, no scripts, no fonts or styles from elsewhere. It opens from the
disk in any browser, without a server.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .io.atomic import atomic_write_text

COLOURS = {"good": "#2b8cbe", "defective": "#e34a33", "unlabelled": "#777777"}


@dataclass
class ReportItem:
    """One image in the report; ``label`` is ``"good"``, a defect type, or ``None`` (unknown).

    ``overlay`` and the values of ``links`` (e.g. ``{"map": "x_map.tiff"}``) are paths
    relative to the report's folder; ``caption`` (default: the source's file name) names
    the image under it, e.g. ``crack/000.png``."""

    source: str
    score: float
    overlay: str
    is_anomalous: bool | None = None
    label: str | None = None
    links: dict[str, str] = field(default_factory=dict)
    caption: str | None = None  # shown under the image; default: the source's file name


def _href(relative: str) -> str:
    """A relative file path as an attribute-safe URL (``#``, ``?``, ``%`` and spaces in
    names would otherwise change what the browser opens)."""
    return html.escape(quote(Path(relative).as_posix(), safe="/"), quote=True)


def _group(item: ReportItem) -> str:
    if item.label is None:
        return "unlabelled"
    return "good" if item.label == "good" else "defective"


def _histogram_svg(items: Sequence[ReportItem], threshold: float | None, bins: int = 30) -> str:
    finite = [i for i in items if math.isfinite(i.score)]
    if not finite:
        return "<p>no finite scores</p>"
    scores = np.array([i.score for i in finite], dtype=np.float64)
    low, high = float(scores.min()), float(scores.max())
    show_threshold = threshold is not None and math.isfinite(threshold)
    if show_threshold:
        low, high = min(low, threshold), max(high, threshold)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    counts = {}
    for name in COLOURS:
        values = [i.score for i in finite if _group(i) == name]
        if values:
            counts[name] = np.histogram(values, edges)[0]
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
                f'fill="{COLOURS[name]}" fill-opacity="0.55"><title>{name}: {c} image(s), '
                f"scores {edges[b]:.4g} to {edges[b + 1]:.4g}</title></rect>"
            )
    parts.append(f'<line x1="{pad}" y1="{height}" x2="{width - pad}" y2="{height}" stroke="#444"/>')
    if show_threshold:
        x = pad + (threshold - low) / (high - low) * (width - 2 * pad)
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad / 2}" x2="{x:.1f}" y2="{height}" stroke="black" '
            f'stroke-dasharray="4 3"><title>threshold {threshold:.4g}</title></line>'
            f'<text x="{x + 4:.1f}" y="{pad / 2 + 10}" font-size="12">threshold</text>'
        )
    parts.append(
        f'<text x="{pad}" y="{height + 18}" font-size="12">{low:.4g}</text>'
        f'<text x="{width - pad}" y="{height + 18}" font-size="12" text-anchor="end">'
        f"{high:.4g}</text>"
        f'<text x="{width / 2}" y="{height + 18}" font-size="12" text-anchor="middle">'
        "image score</text>"
    )
    legend_x = pad
    for name in counts:
        parts.append(
            f'<rect x="{legend_x}" y="{height + 26}" width="10" height="10" '
            f'fill="{COLOURS[name]}"/><text x="{legend_x + 14}" y="{height + 35}" '
            f'font-size="12">{name}</text>'
        )
        legend_x += 110
    parts.append("</svg>")
    return "".join(parts)


def label_metrics(items: Sequence[ReportItem], threshold: float | None) -> dict[str, float]:
    """Image-level numbers from known labels: image AUROC when both good and defective
    images are present, and the share of each flagged at ``threshold``."""
    from .metrics import image_auroc

    labelled = [i for i in items if i.label is not None and math.isfinite(i.score)]
    if not labelled:
        return {}
    scores = np.array([i.score for i in labelled], dtype=np.float64)
    defective = np.array([i.label != "good" for i in labelled])
    metrics: dict[str, float] = {
        "good images": int((~defective).sum()),
        "defective images": int(defective.sum()),
    }
    if defective.any() and not defective.all():
        metrics["image AUROC"] = float(image_auroc(scores, defective))
    if threshold is not None:
        flagged = scores >= threshold
        if (~defective).any():
            metrics["good flagged (false alarms)"] = float(flagged[~defective].mean())
        if defective.any():
            metrics["defective flagged (found)"] = float(flagged[defective].mean())
    return metrics


def _metrics_table(metrics: Mapping[str, float]) -> str:
    def shown(value: float) -> str:
        return str(value) if isinstance(value, int) else f"{value:.4f}"

    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{shown(v)}</td></tr>"
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and math.isfinite(v)
    )
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def _card(item: ReportItem) -> str:
    if item.is_anomalous is None:
        verdict, css = "", ""
    else:
        verdict, css = (" anomalous", "anomalous") if item.is_anomalous else (" good", "good")
    label = "" if item.label is None else f" | {html.escape(item.label)}"
    score = f"{item.score:.4g}" if math.isfinite(item.score) else "n/a"
    links = " ".join(
        f'<a href="{_href(target)}">{html.escape(kind)}</a>' for kind, target in item.links.items()
    )
    return (
        f'<figure class="{css}"><a href="{_href(item.overlay)}"><img '
        f'src="{_href(item.overlay)}" alt="{html.escape(item.source)}" '
        f'title="{html.escape(item.source)}" loading="lazy"></a><figcaption>'
        f"{html.escape(item.caption or Path(item.source).name)}<br>score {score}{verdict}{label}"
        f"{'<br>' + links if links else ''}</figcaption></figure>"
    )


def write_report(
    path: str | os.PathLike[str],
    items: Sequence[ReportItem],
    *,
    title: str = "pyramidflow report",
    threshold: float | None = None,
    metrics: Mapping[str, float] | None = None,
    max_images: int = 500,
    threshold_origin: str | None = None,
    warnings: Sequence[str] = (),
) -> Path:
    """Write the HTML report to ``path`` (atomically) and return it.

    The grid shows the ``max_images`` highest-scoring images (all of them are in the
    histogram); links are relative to ``path``'s folder. ``threshold_origin`` (e.g. "0.99
    quantile of the scores of 3 held-out good images") is shown beside the threshold,
    ``warnings`` as lines of their own above the metrics."""
    path = Path(path)
    ranked = sorted(items, key=lambda i: -i.score if math.isfinite(i.score) else -math.inf)
    shown = ranked[:max_images]
    cards = "".join(_card(item) for item in shown)
    more = (
        f"<p>showing the {len(shown)} highest scores of {len(items)}</p>"
        if len(shown) < len(items)
        else ""
    )
    flagged = sum(1 for i in items if i.is_anomalous)
    summary = f"{len(items)} image(s)"
    if threshold is not None:
        origin = f" ({html.escape(threshold_origin)})" if threshold_origin else ""
        summary += f"; threshold {threshold:.4g}{origin}; {flagged} flagged anomalous"
    notes = "".join(f'<p class="warning">warning: {html.escape(w)}</p>' for w in warnings)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; width: 200px; font-size: 12px; overflow-wrap: anywhere; }}
figure img {{ width: 200px; image-rendering: pixelated; }}
figure.anomalous figcaption {{ color: #c0392b; font-weight: bold; }}
.warning {{ color: #a04000; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{summary}</p>
{notes}
{"" if not metrics else "<h2>Metrics</h2>" + _metrics_table(metrics)}
<h2>Image scores</h2>
{_histogram_svg(items, threshold)}
<h2>Anomaly maps (highest score first)</h2>
{more}<div class="grid">{cards}</div>
</body></html>
"""
    return atomic_write_text(path, page)
