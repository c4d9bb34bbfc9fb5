"""The report's charts as inline SVG: a heat map, line charts, histograms.

Hand-written SVG keeps the page self-contained and small (a few kilobytes a
chart whatever the number of images) and lets a test read every drawn value
back from the DOM (``data-value`` on each cell and bar).
"""

from __future__ import annotations

import html
import math

import numpy as np

LOW, HIGH = (247, 251, 255), (8, 48, 107)  # the heat map's 0 and 1 (matplotlib's Blues ends)
SERIES = {"train": "#1f77b4", "val": "#d62728"}


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def heat_colour(value: float) -> str:
    """The fill of a heat-map cell holding ``value`` in [0, 1]; NaN (no truth pixels) is grey."""
    if math.isnan(value):
        return "rgb(220,220,220)"
    v = min(1.0, max(0.0, value))
    r, g, b = (round(lo + (hi - lo) * v) for lo, hi in zip(LOW, HIGH))
    return f"rgb({r},{g},{b})"


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (NaN for a row without pixels)."""
    totals = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, matrix / np.maximum(totals, 1), np.nan)


def heat_map(matrix: np.ndarray, names: list[str]) -> str:
    """The confusion matrix, rows normalised by truth pixels, as an SVG with labelled axes."""
    c = len(names)
    norm = row_normalised(matrix)
    cell = max(6, min(48, 560 // max(c, 1)))
    label = min(180, 8 + 7 * max((len(n) for n in names), default=1))
    left, top = label, label
    width, height = left + c * cell + 10, top + c * cell + 4
    parts = [f'<svg id="confusion" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-size="11">']
    show_text = cell >= 28
    for i, name in enumerate(names):
        y = top + i * cell + cell / 2 + 4
        parts.append(f'<text x="{left - 4}" y="{y:.1f}" text-anchor="end">{_e(name)}</text>')
        x = left + i * cell + cell / 2 + 4
        parts.append(f'<text transform="translate({x:.1f},{top - 4}) rotate(-60)">{_e(name)}</text>')
    for i in range(c):
        for j in range(c):
            v = float(norm[i, j])
            x, y = left + j * cell, top + i * cell
            title = f"truth {names[i]}, predicted {names[j]}: {'-' if math.isnan(v) else f'{v:.4f}'} ({int(matrix[i, j]):,} pixels)"
            parts.append(
                f'<rect class="cell" x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{heat_colour(v)}" '
                f'data-truth="{i}" data-pred="{j}" data-value="{"" if math.isnan(v) else repr(v)}" data-pixels="{int(matrix[i, j])}">'
                f"<title>{_e(title)}</title></rect>"
            )
            if show_text and not math.isnan(v):
                colour = "#fff" if v > 0.5 else "#222"
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="middle" fill="{colour}">{v:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * k / n for k in range(n + 1)]


def line_chart(xs: list[int], series: dict[str, list[float]], title: str, chart_id: str, y_range: tuple[float, float] | None = None) -> str:
    """One metric per epoch, a line per split (train, val)."""
    w, h, left, right, top, bottom = 360, 220, 48, 12, 24, 32
    values = [v for ys in series.values() for v in ys if math.isfinite(v)]
    lo, hi = y_range if y_range else ((min(values), max(values)) if values else (0.0, 1.0))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    x_span = max(x_hi - x_lo, 1)

    def px(x: float) -> float:
        return left + (x - x_lo) / x_span * (w - left - right)

    def py(y: float) -> float:
        return top + (1 - (y - lo) / (hi - lo)) * (h - top - bottom)

    parts = [f'<svg id="{chart_id}" class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="11">',
             f'<text x="{w / 2}" y="14" text-anchor="middle" font-weight="600">{_e(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" fill="none" stroke="#bbb"/>']
    for t in _ticks(lo, hi):
        parts.append(f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
    for x in sorted(set(xs))[:: max(1, len(set(xs)) // 8)]:
        parts.append(f'<text x="{px(x):.1f}" y="{h - bottom + 14}" text-anchor="middle">{x}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 4}" text-anchor="middle">epoch</text>')
    for k, (split, ys) in enumerate(series.items()):
        colour = SERIES.get(split, "#444")
        points = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
        parts.append(f'<polyline class="series" data-split="{_e(split)}" data-values="{_e(",".join(repr(float(y)) for y in ys))}" '
                     f'points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in points]
        parts.append(f'<text x="{w - right - 4}" y="{top + 14 + 14 * k}" text-anchor="end" fill="{colour}">{_e(split)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(counts: np.ndarray, caption: str, detail: str, colour, chart_id: str, class_id: int) -> str:
    """Bars of images per IoU bin over [0, 1], in the class's colour."""
    w, h, left, bottom, top = 260, 140, 8, 18, 32
    bins = len(counts)
    bar = (w - 2 * left) / bins
    peak = max(int(counts.max()), 1) if counts.size else 1
    r, g, b = (int(c) for c in colour)
    parts = [f'<svg id="{chart_id}" class="histogram" data-class-id="{class_id}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="10">',
             f'<text x="{left}" y="12" font-weight="600">{_e(caption)}</text><text x="{left}" y="26" fill="#555">{_e(detail)}</text>',
             f'<rect x="{left}" y="{top}" width="{w - 2 * left}" height="{h - top - bottom}" fill="#fafafa" stroke="#ccc"/>']
    for k, n in enumerate(counts.tolist()):
        bh = (h - top - bottom) * n / peak
        lo_edge, hi_edge = k / bins, (k + 1) / bins
        parts.append(
            f'<rect class="bar" x="{left + k * bar:.1f}" y="{h - bottom - bh:.1f}" width="{max(bar - 1, 1):.1f}" height="{bh:.1f}" '
            f'fill="rgb({r},{g},{b})" stroke="#333" stroke-width="0.5" data-bin="{k}" data-value="{n}">'
            f"<title>IoU {lo_edge:.2f}-{hi_edge:.2f}: {n:,} images</title></rect>"
        )
    parts.append(f'<text x="{left}" y="{h - 4}">0</text><text x="{w - left}" y="{h - 4}" text-anchor="end">IoU 1</text>')
    parts.append(f'<text x="{w - left}" y="{top + 10}" text-anchor="end" fill="#666">max {peak:,}</text></svg>')
    return "".join(parts)
