"""``segray report``: one self-contained HTML file about a predict (or evaluate) output.

Everything is inside the file: charts are inline SVG, image strips are PNG
data URIs, the table sort is an inline script, and a Content-Security-Policy
forbids every load that is not inline or ``data:``, so the page works offline
and never calls the network. The page holds aggregates (per class, a
histogram of per-image IoU) and a few strips per class, never the per-image
rows, so its size does not grow with the number of images.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from segray.config import ReportConfig, about
from segray.ownership import write_owned_file
from segray.reporting import svg
from segray.reporting.query import OutputTables, check_output_file, iou_histogram, worst
from segray.reporting.strips import ERROR_COLOURS, colour_table, read_pixels, strip_png

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
ERROR_ROWS = 1000  # quarantined files listed on the page; all of them are in OUT/_errors.parquet
HISTOGRAM_BINS = 20
# Strips on one page at most, all classes together: with many classes each
# shows fewer, so the page stays far below 50 MB (a strip is up to ~100 kB).
MAX_STRIPS = 360
DISPLAY_HEIGHT = 96  # strips of smaller images are shown this high at least (a whole multiple)

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:right;border-bottom:1px solid #eee}
td.name,th.name,td.text{text-align:left}th{cursor:pointer;user-select:none;background:#f6f6f6}
th[data-order=asc]::after{content:" \\25B2"}th[data-order=desc]::after{content:" \\25BC"}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #888;margin-right:6px;vertical-align:middle}
.legend span{margin-right:16px;white-space:nowrap}dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}
dt{font-weight:600}dd{margin:0}.charts{display:flex;flex-wrap:wrap;gap:16px}
.strips{display:flex;flex-wrap:wrap;gap:8px 20px}figure.strip{margin:4px 0}figure.strip img{image-rendering:pixelated;display:block}
figcaption{font-size:12px;color:#444}.note{color:#666;font-size:12px}pre{background:#f6f6f6;padding:8px;overflow:auto}
"""

SCRIPT = """
(function(){
  function key(cell){
    var v = cell.getAttribute('data-value');
    if (v === null) return cell.textContent.trim().toLowerCase();
    return v === '' ? NaN : parseFloat(v);
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function(th, col){
      th.addEventListener('click', function(){
        var asc = th.getAttribute('data-order') !== 'asc';
        Array.prototype.forEach.call(heads, function(h){ h.removeAttribute('data-order'); });
        th.setAttribute('data-order', asc ? 'asc' : 'desc');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function(a, b){
          var x = key(a.cells[col]), y = key(b.cells[col]);
          var xn = typeof x === 'number' && isNaN(x), yn = typeof y === 'number' && isNaN(y);
          if (xn || yn) return xn === yn ? 0 : (xn ? 1 : -1);  // no score: last either way
          var c = x < y ? -1 : (x > y ? 1 : 0);
          return asc ? c : -c;
        });
        rows.forEach(function(r){ body.appendChild(r); });
      });
    });
  });
  document.body.setAttribute('data-ready', '1');
})();
"""


@dataclass(frozen=True)
class ReportResult:
    """What ``segray.report`` wrote.

    Attributes:
        uri: the HTML file.
        size_bytes: its size.
        strips: image strips on the page (all classes together).
    """

    uri: str
    size_bytes: int
    strips: int


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _data_value(value: Any) -> str:
    """A cell's sort key: the full-precision number, or empty for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value))


def _swatch(colour) -> str:
    r, g, b = (int(c) for c in colour)
    return f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>'


def _summary(tables: OutputTables) -> str:
    s = tables.info.summary
    data = s.get("source") or f"pred {s.get('pred')}, truth {s.get('truth')}"
    rows = [
        ("output", tables.info.uri),
        ("kind", tables.info.kind),
        ("model id", s.get("model_id", "-")),
        ("model", s.get("model", "-")),
        ("data", data),
        ("images", s.get("images")),
        ("images scored", s.get("images_scored")),
        ("errors", s.get("errors")),
        ("mIoU", s.get("miou")),
        ("mean Dice", s.get("mean_dice")),
        ("pixel accuracy", s.get("pixel_accuracy")),
        ("mIoU, mean of images", s.get("miou_mean_of_images")),
        ("valid classes", s.get("valid_classes")),
        ("finished", s.get("finished_at", "-")),
    ]
    items = "".join(f'<dt>{_e(k)}</dt><dd data-key="{_e(k)}">{_e(_num(v))}</dd>' for k, v in rows)
    config = json.dumps(s.get("config", {}), indent=2, default=str)
    return f'<dl id="summary-list">{items}</dl><details><summary>config</summary><pre>{_e(config)}</pre></details>'


def _legend(tables: OutputTables) -> str:
    return '<p class="legend" id="legend">' + "".join(
        f'<span data-class-id="{c.id}">{_swatch(c.color)}{_e(c.name)}</span>' for c in tables.info.classes
    ) + "</p>"


def _per_class(tables: OutputTables, frame: pd.DataFrame) -> str:
    if frame.empty:
        return '<p class="note">No scores: the images came without truth masks.</p>'
    total = float(frame["support"].sum())
    colours = {c.id: c.color for c in tables.info.classes}
    head = "".join(
        f'<th class="{"name" if k == "class" else ""}" data-col="{k}">{_e(k)}</th>'
        for k in ("id", "class", "IoU", "Dice", "precision", "recall", "pixel share", "pixels")
    )
    body = []
    for row in frame.itertuples(index=False):
        share = row.support / total if total else float("nan")
        cells = [f'<td data-value="{int(row.class_id)}">{int(row.class_id)}</td>',
                 f'<td class="name">{_swatch(colours.get(int(row.class_id), (0, 0, 0)))}{_e(row.class_name)}</td>']
        for col in ("iou", "dice", "precision", "recall"):
            v = float(getattr(row, col)) if getattr(row, col) is not None else float("nan")
            cells.append(f'<td data-col="{col}" data-value="{_data_value(v)}">{_num(v)}</td>')
        cells.append(f'<td data-col="pixel_share" data-value="{_data_value(share)}">{_num(share * 100, 2)}%</td>')
        cells.append(f'<td data-col="support" data-value="{int(row.support)}">{int(row.support):,}</td>')
        body.append(f'<tr data-class-id="{int(row.class_id)}">{"".join(cells)}</tr>')
    return (f'<table id="per-class" class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            '<p class="note">Click a column to sort. Scores of the summed confusion matrix; "-": the class is in neither truth nor prediction.</p>')


def _confusion(tables: OutputTables) -> str:
    frame = tables.table("confusion").to_pandas()
    if frame.empty:
        return '<p class="note">No confusion matrix: the images came without truth masks.</p>'
    names = sorted((c for c in frame.columns if c.startswith("pred_")), key=lambda c: int(c[5:]))
    matrix = frame[names].to_numpy(np.int64)
    return svg.heat_map(matrix, tables.class_names) + (
        '<p class="note">Rows: truth; columns: prediction. Each row is divided by its truth pixels, '
        "so the diagonal is the recall of its class.</p>"
    )


def _curves(run: str) -> str:
    from segray.runs import HISTORY_FILE, has_history, read_history

    if not has_history(run):
        raise about("run", FileNotFoundError(f"run {run}: no {HISTORY_FILE} there (expected a training run, STORAGE/RUN)"))
    history = read_history(run)
    epochs = (history["epoch"] + 1).tolist()
    charts = []
    for metric, title in (("loss", "loss"), ("miou", "mIoU")):
        series = {split: history[f"{split}_{metric}"].astype(float).tolist() for split in ("train", "val") if f"{split}_{metric}" in history}
        charts.append(svg.line_chart(epochs, series, title, chart_id=f"curve-{metric}", y_range=(0.0, 1.0) if metric == "miou" else None))
    return f'<p>run {_e(run)}, {len(history)} epoch(s)</p><div class="charts">{"".join(charts)}</div>'


def _distribution(tables: OutputTables, frame: pd.DataFrame) -> str:
    if frame.empty:
        return '<p class="note">No per-image scores.</p>'
    hist = iou_histogram(tables, HISTOGRAM_BINS)
    stats = tables.sql(
        "SELECT class_id, count(*) AS images, avg(iou) AS mean, median(iou) AS median FROM per_image "
        "WHERE NOT isnan(iou) GROUP BY class_id"
    ).set_index("class_id")
    charts = []
    for c in tables.info.classes:
        counts = np.zeros(HISTOGRAM_BINS, np.int64)
        rows = hist[hist["class_id"] == c.id]
        counts[rows["bin"].to_numpy(int)] = rows["images"].to_numpy(np.int64)
        n = int(stats.loc[c.id, "images"]) if c.id in stats.index else 0
        caption = f"{c.name}: {n:,} images"
        detail = f"mean {stats.loc[c.id, 'mean']:.3f}, median {stats.loc[c.id, 'median']:.3f}" if n else "no scored image"
        charts.append(svg.histogram(counts, caption, detail, c.color, chart_id=f"hist-{c.id}", class_id=c.id))
    return f'<div class="charts">{"".join(charts)}</div><p class="note">Per-image IoU of each class over the images where it is in truth or prediction, in {HISTOGRAM_BINS} bins from 0 to 1.</p>'


def _worst(tables: OutputTables, k: int) -> tuple[str, int]:
    if k == 0:
        return '<p class="note">Not asked for (--worst 0).</p>', 0
    classes = tables.info.classes
    shown = min(k, max(1, MAX_STRIPS // max(len(classes), 1)))
    per_class = {c.id: worst(tables, c.id, shown) for c in classes}
    ids = sorted({i for f in per_class.values() for i in f["image_id"]})
    if not ids:
        return '<p class="note">No scored images.</p>', 0
    pixels = read_pixels(tables.info, ids)
    lut = colour_table([c.color for c in tables.info.classes])
    with_image = tables.info.kind == "predict"
    panels = "image | truth | prediction | error map" if with_image else "truth | prediction | error map"
    key = " ".join(f'<span>{_swatch(colour)}{_e(name)}</span>' for name, colour in ERROR_COLOURS.items())
    fewer = f" With {len(classes)} classes, {shown} per class (at most {MAX_STRIPS} strips a page)." if shown < k else ""
    parts, strips = [f'<p class="note">Each strip: {panels}. Error map: <span class="legend">{key}</span>.{fewer}</p>'], 0
    for c in tables.info.classes:
        frame = per_class[c.id]
        figures = []
        for row in frame.itertuples(index=False):
            p = pixels[row.image_id]
            png = strip_png(p, c.id, lut, with_image)
            height, width = _png_size(png)
            zoom = max(1, DISPLAY_HEIGHT // max(height, 1))  # small images shown larger, pixels kept sharp
            data = base64.b64encode(png).decode("ascii")
            problems = f'<br><span class="note">{_e("; ".join(p.problems))}</span>' if p.problems else ""
            figures.append(
                f'<figure class="strip" data-image-id="{_e(row.image_id)}" data-iou="{_data_value(row.iou)}" data-dice="{_data_value(row.dice)}">'
                f'<img alt="{_e(row.image_id)}: {panels}" width="{width * zoom}" height="{height * zoom}" src="data:image/png;base64,{data}">'
                f'<figcaption>{_e(row.image_id)}: IoU {_num(float(row.iou))}, Dice {_num(float(row.dice))}, '
                f'tp {int(row.tp):,}, fp {int(row.fp):,}, fn {int(row.fn):,}{problems}</figcaption></figure>'
            )
            strips += 1
        body = f'<div class="strips">{"".join(figures)}</div>' if figures else '<p class="note">The class is in no image.</p>'
        parts.append(f'<section class="worst" data-class-id="{c.id}"><h3>{_swatch(c.color)}{_e(c.name)}: {len(figures)} worst</h3>{body}</section>')
    return "".join(parts), strips


def _png_size(png: bytes) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR."""
    return int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big")


def _errors(tables: OutputTables) -> str:
    errors = tables.table("errors")
    if errors.num_rows == 0:
        return '<p class="note" id="no-errors">No input was set aside.</p>'
    shown = errors.slice(0, ERROR_ROWS).to_pylist()
    rows = "".join(f'<tr><td class="text">{_e(r["uri"])}</td><td class="text">{_e(r["reason"])}</td></tr>' for r in shown)
    more = f'<p class="note">{errors.num_rows - ERROR_ROWS:,} more in {_e(tables.layout.errors)}</p>' if errors.num_rows > ERROR_ROWS else ""
    return (f'<table id="errors" class="sortable"><thead><tr><th class="name">file</th><th class="name">reason</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>{more}")


def render(tables: OutputTables, run: str | None = None, k: int = 12) -> tuple[str, int]:
    """The report's HTML and the number of image strips in it."""
    per_class = tables.table("per_class").to_pandas()
    rasters = tables.info.summary.get("source_kind") == "rasters"
    if rasters:  # no image strips of rasters: an overview from the mask's pyramid, and the worst chunks
        from segray.reporting.rasters import raster_section

        worst_html, strips = raster_section(tables.info.summary, tables.info.uri, [c.color for c in tables.info.classes]), 0
    else:
        worst_html, strips = _worst(tables, k) if not per_class.empty else ('<p class="note">No scored images.</p>', 0)
    sections = [
        ("summary", "Summary", _summary(tables)),
        ("classes", "Classes", _legend(tables) + _per_class(tables, per_class)),
    ]
    if tables.info.summary.get("task") == "instance":
        from segray.reporting.outlines import instance_table, worst_objects

        objects_html, object_strips = worst_objects(tables, k, DISPLAY_HEIGHT) if not per_class.empty else ('<p class="note">No scored images.</p>', 0)
        strips += object_strips
        sections += [
            ("instances", "Objects: mask AP and panoptic quality per class", instance_table(tables, per_class)),
            ("worst-objects-section", f"Worst images by PQ (up to {k}): object outlines", objects_html),
        ]
    sections.append(("confusion-matrix", "Confusion matrix", _confusion(tables)))
    if run:
        sections.append(("training", "Training curves", _curves(run)))
    sections += [
        ("distribution", "Per-image IoU", _distribution(tables, per_class)),
        ("rasters", "Rasters: overview and worst chunks", worst_html) if rasters else ("worst-images", f"Worst images per class (up to {k})", worst_html),
        ("quarantine", f"Quarantined files ({tables.table('errors').num_rows:,})", _errors(tables)),
    ]
    title = f"segray report: {tables.info.uri}"
    made = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    body = "".join(f'<section id="{sid}"><h2>{_e(name)}</h2>{content}</section>' for sid, name, content in sections)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width"><title>{_e(title)}</title><style>{STYLE}</style></head>'
        f'<body><h1>{_e(title)}</h1><p class="note">made {made} by segray report</p>{body}<script>{SCRIPT}</script></body></html>\n'
    )
    return page, strips


def write_report(cfg: ReportConfig) -> ReportResult:
    """Writes the report of ``cfg.out`` to ``cfg.output``.

    Raises:
        FileNotFoundError: OUT, one of its tables, or the run's history is missing (named).
        FileExistsError: OUTPUT exists and segray did not write it, or
            ``overwrite`` is off (``segray.ownership.check_new_file``).
        ValueError: OUT is not a finished predict or evaluate output, or
            OUTPUT lies inside an output folder.
    """
    check_output_file(cfg.output, cfg.overwrite, "report")  # before the work, and again just before writing
    try:
        tables = OutputTables(cfg.out)
    except (FileNotFoundError, ValueError) as e:
        raise about("out", type(e)(f"out {e}")) from None
    page, strips = render(tables, cfg.run, cfg.worst)
    data = page.encode("utf-8")
    check_output_file(cfg.output, cfg.overwrite, "report")
    write_owned_file(cfg.output, data, "report")
    return ReportResult(cfg.output, len(data), strips)
