"""The report of an instance output: AP / PQ per class, and object outlines for the worst images by PQ.

Each strip is ``truth objects | predicted objects``: the image (greyed, so the
colours stand out) with every object's outline in a colour of its own. The
files come from where the output says they are: a predict's source shards
(image and truth instance map) and ``OUT/instances/<id>.png``; an instance
evaluate's ``pred`` folder and, when its truth is an ingested dataset, that
dataset's shards (a raw truth folder gives no truth panel: it is grey).
"""

from __future__ import annotations

import base64
import html
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from segray import storage
from segray.data import BadInput, decode_image, decode_instances, encode_png
from segray.inference import display_uint8
from segray.reporting.query import OutputTables

GAP = 4
PANEL_SIDE = 192  # a panel is shown about this large: small images are zoomed (outlines stay one display pixel wide)
GOLDEN = 0.6180339887498949
INSTANCE_COLUMNS = ("ap", "ap50", "ap75", "ar100", "pq", "sq", "rq", "truth_objects", "predicted_objects")


@dataclass
class Objects:
    """One image's arrays (None where unknown) and the problems met reading them."""

    image: np.ndarray | None
    truth: np.ndarray | None
    pred: np.ndarray | None
    problems: list[str]


def object_colours(count: int) -> np.ndarray:
    """``(count + 1, 3)`` uint8: a distinct bright colour for each id ``1..count`` (golden-ratio hues), id 0 black."""
    import colorsys

    colours = np.zeros((count + 1, 3), np.uint8)
    for k in range(1, count + 1):
        hue = (k * GOLDEN) % 1.0
        colours[k] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 1.0)]
    return colours


def outlines(instance_map: np.ndarray) -> np.ndarray:
    """Bool ``(H, W)``: the pixels of an object whose right, left, upper or lower neighbour is not of that object (the image border counts)."""
    ids = np.pad(instance_map, 1, mode="constant")
    centre = ids[1:-1, 1:-1]
    edge = np.zeros(centre.shape, bool)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        edge |= ids[1 + dy: ids.shape[0] - 1 + dy, 1 + dx: ids.shape[1] - 1 + dx] != centre
    return edge & (centre > 0)


def outline_panel(image: np.ndarray | None, instance_map: np.ndarray | None, zoom: int, shape: tuple[int, int]) -> np.ndarray:
    """``(H * zoom, W * zoom, 3)`` uint8: the greyed image (or dark grey) with each object's outline in its colour; grey when the map is unknown."""
    h, w = shape
    if instance_map is None or instance_map.shape != (h, w):
        return np.full((h * zoom, w * zoom, 3), 160, np.uint8)
    if image is not None and image.shape[:2] == (h, w):
        grey = display_uint8(image).astype(np.float32)
        grey = grey.mean(axis=-1) if grey.ndim == 3 else grey
        base = np.repeat((grey * 0.6)[..., None], 3, axis=-1).astype(np.uint8)
    else:
        base = np.full((h, w, 3), 40, np.uint8)
    big_base = np.repeat(np.repeat(base, zoom, axis=0), zoom, axis=1)
    big_ids = np.repeat(np.repeat(instance_map.astype(np.int64), zoom, axis=0), zoom, axis=1)
    edge = outlines(big_ids)
    colours = object_colours(int(instance_map.max()) if instance_map.size else 0)
    big_base[edge] = colours[big_ids[edge]]
    return big_base


def strip(objects: Objects) -> np.ndarray:
    """``truth objects | predicted objects``, ``GAP`` white pixels apart."""
    maps = [a for a in (objects.pred, objects.truth) if a is not None]
    h, w = maps[0].shape if maps else (64, 64)
    zoom = max(1, PANEL_SIDE // max(h, w))
    if max(h, w) > 2 * PANEL_SIDE:  # large images: outlines of the full-size map, shown scaled by the browser
        zoom = 1
    panels = [outline_panel(objects.image, objects.truth, zoom, (h, w)), outline_panel(objects.image, objects.pred, zoom, (h, w))]
    gap = np.full((h * zoom, GAP, 3), 255, np.uint8)
    return np.concatenate([panels[0], gap, panels[1]], axis=1)


def _read_map(uri: str, what: str, problems: list[str]) -> np.ndarray | None:
    try:
        return decode_instances(storage.read_bytes(uri))
    except (OSError, BadInput) as e:
        problems.append(f"{what} {uri}: {e}")
        return None


def _shard_objects(shards: list[str], ids: set[str]) -> dict[str, tuple[bytes | None, bytes | None]]:
    """image id -> (image bytes, truth instance-map bytes) from ``shards``, each read once with a filter."""
    import pyarrow.parquet as pq

    found: dict[str, tuple[bytes | None, bytes | None]] = {}
    for shard in shards:
        fs, path = storage.filesystem(shard)
        names = pq.read_schema(path, filesystem=fs).names
        columns = ["image_id", "image"] + (["instances"] if "instances" in names else [])
        for row in pq.read_table(path, filesystem=fs, columns=columns, filters=[("image_id", "in", sorted(ids))]).to_pylist():
            found[row["image_id"]] = (row["image"], row.get("instances"))
    return found


def _source_shards(tables: OutputTables, ids: set[str]) -> list[str]:
    """The shards the images came from: a predict's records (``shard#id``), or an evaluate's ingested truth split."""
    info = tables.info
    if info.kind == "predict":
        import pyarrow as pa
        import pyarrow.compute as pc

        from segray.inference import OK, latest_records, read_parts

        records = latest_records(read_parts(info.output, ["image_id", "uri", "status", "run"]))
        records = records.filter(pc.and_(pc.equal(records["status"], OK), pc.is_in(records["image_id"], pa.array(sorted(ids), pa.string()))))
        return sorted({u.rsplit("#", 1)[0] for u in records["uri"].to_pylist() if "#" in u})
    identity = _run_identity(tables)
    split = identity.get("split")
    if not split:
        return []
    folder = storage.join(info.summary["truth"], split)
    return [f.uri for f in storage.list_files(folder) if f.uri.endswith(".parquet") and not storage.basename(f.uri).startswith((".", "_"))]


def _run_identity(tables: OutputTables) -> dict:
    import json

    try:
        value = json.loads(storage.read_text(tables.info.output.run_file))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_objects(tables: OutputTables, ids: list[str]) -> dict[str, Objects]:
    """Image, truth and predicted instance maps of each id."""
    info = tables.info
    wanted = set(ids)
    shard_bytes = _shard_objects(_source_shards(tables, wanted), wanted)
    pred_root = storage.join(info.uri, "instances") if info.kind == "predict" else info.summary["pred"]

    def load(image_id: str) -> Objects:
        problems: list[str] = []
        pred = _read_map(storage.join(pred_root, f"{image_id}.png"), "prediction", problems)
        image = truth = None
        if image_id in shard_bytes:
            image_bytes, truth_bytes = shard_bytes[image_id]
            try:
                image = decode_image(image_bytes) if image_bytes is not None else None
                truth = decode_instances(truth_bytes) if truth_bytes is not None else None
            except BadInput as e:
                problems.append(f"{image_id}: {e}")
        else:
            problems.append("no image or truth objects are known for this output (truth read from a raw folder)")
        return Objects(image, truth, pred, problems)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(ids, pool.map(load, ids)))


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if not float(value).is_integer() or digits == 4 else f"{int(value):,}"
    return f"{value:,}"


def _data_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value))


def instance_table(tables: OutputTables, per_class: pd.DataFrame) -> str:
    """The AP / PQ per class table (``id="instance-per-class"``) and the headline means."""
    s = tables.info.summary
    if per_class.empty or "ap" not in per_class.columns:
        return '<p class="note">No instance scores: the images came without truth objects.</p>'
    rows = per_class[per_class["class_id"] > 0]
    head = "".join(f'<th data-col="{c}">{_e(c)}</th>' for c in ("id",)) + '<th class="name" data-col="class">class</th>' + "".join(
        f'<th data-col="{c}">{_e(c)}</th>' for c in INSTANCE_COLUMNS)
    body = []
    for row in rows.itertuples(index=False):
        cells = [f'<td data-value="{int(row.class_id)}">{int(row.class_id)}</td>', f'<td class="name">{_e(row.class_name)}</td>']
        for c in INSTANCE_COLUMNS:
            v = getattr(row, c)
            v = float(v) if v is not None else float("nan")
            shown = _num(v) if c not in ("truth_objects", "predicted_objects") or math.isnan(v) else f"{int(v):,}"
            cells.append(f'<td data-col="{c}" data-value="{_data_value(v)}">{shown}</td>')
        body.append(f'<tr data-class-id="{int(row.class_id)}">{"".join(cells)}</tr>')
    means = " ".join(
        f'<span data-key="{k}" data-value="{_data_value(s.get(k))}">{_e(label)} {_e(_num(s.get(k)))}</span>'
        for k, label in (("ap", "mask AP"), ("ap50", "AP50"), ("ap75", "AP75"), ("ar100", "AR@100"), ("pq", "PQ"), ("sq", "SQ"), ("rq", "RQ"))
    )
    return (f'<p class="legend" id="instance-means">{means} ({_e(s.get("objects", 0))} predicted objects, {_e(s.get("truth_objects", 0))} in truth)</p>'
            f'<table id="instance-per-class" class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            '<p class="note">COCO mask AP (mean over IoU 0.50:0.95), AP50, AP75 and AR@100; panoptic quality PQ = SQ x RQ at IoU 0.5. '
            '"-": the class has no truth objects (AP) or no objects at all (PQ).</p>')


def worst_objects(tables: OutputTables, k: int, display_height: int) -> tuple[str, int]:
    """Outline strips of the ``k`` images of lowest PQ (``instance_images``) and how many there are."""
    if k == 0:
        return '<p class="note">Not asked for (--worst 0).</p>', 0
    try:
        tables.table("instance_images")
    except FileNotFoundError as e:  # an output written before predict kept per-image PQ
        return f'<p class="note">No per-image PQ: {_e(e)}; run predict again into a new folder to get it.</p>', 0
    frame = tables.sql(f"SELECT * FROM instance_images WHERE NOT isnan(pq) ORDER BY pq ASC, image_id ASC LIMIT {int(k)}")
    if frame.empty:
        return '<p class="note">No scored images.</p>', 0
    objects = read_objects(tables, frame["image_id"].tolist())
    figures = []
    for row in frame.itertuples(index=False):
        o = objects[row.image_id]
        png = encode_png(strip(o))
        height, width = int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big")
        zoom = max(1, display_height // max(height, 1))
        problems = f'<br><span class="note">{_e("; ".join(o.problems))}</span>' if o.problems else ""
        data = base64.b64encode(png).decode("ascii")
        figures.append(
            f'<figure class="strip objects" data-image-id="{_e(row.image_id)}" data-pq="{_data_value(row.pq)}" '
            f'data-truth-objects="{int(row.truth_objects)}" data-predicted-objects="{int(row.predicted_objects)}">'
            f'<img alt="{_e(row.image_id)}: truth objects | predicted objects" width="{width * zoom}" height="{height * zoom}" src="data:image/png;base64,{data}">'
            f'<figcaption>{_e(row.image_id)}: PQ {_num(float(row.pq))}, SQ {_num(float(row.sq))}, RQ {_num(float(row.rq))}; '
            f'{int(row.truth_objects)} true, {int(row.predicted_objects)} predicted: tp {int(row.tp)}, fp {int(row.fp)}, fn {int(row.fn)}{problems}</figcaption></figure>'
        )
    note = ('<p class="note">Each strip: truth objects | predicted objects, every object outlined in a colour of its own '
            "(the colours of the two panels are not paired). PQ of the image over all classes at IoU 0.5.</p>")
    return note + f'<div class="strips" id="worst-objects">{"".join(figures)}</div>', len(figures)
