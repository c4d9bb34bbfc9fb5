"""The size of ``segray report`` on 100,000 images, and how long Chromium takes to render it.

    python benchmarks/report_scale.py [--n 100000] [--classes 5] [--size 64] [--worst 12]

Builds a predict output the way predict leaves it, without running a model:
N synthetic truth/prediction pairs (discs per class; the prediction moves and
resizes them and flips a varying share of pixels, so per-image IoU spreads
from 0 to 1) become predict's per-image records (``_parts/``), and segray's
own code makes the tables, ``summary.json`` and ``_errors.parquet`` from them.
Only the images the report shows (the worst per class, found with the same
query the report uses) are written as files. Then it times ``segray.report``,
prints the HTML's size (target < 50 MB) and the time a headless Chromium
takes from navigation to the painted page (target < 5 s), and checks that the
page asked for nothing outside itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from segray import storage  # noqa: E402
from segray.config import ReportConfig  # noqa: E402
from segray.data import default_color, encode_png  # noqa: E402
from segray.inference import RECORD_SCHEMA, Output, claim, latest_records, score_tables, write_results  # noqa: E402
from segray.metrics import CELL_BASE, encode_cells  # noqa: E402

CHUNK = 1000


def pairs(chunk: int, size: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth, pred) uint8 (CHUNK, size, size) of one chunk, the same for the same chunk index."""
    rng = np.random.default_rng(chunk)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((CHUNK, size, size), np.uint8)
    pred = np.zeros((CHUNK, size, size), np.uint8)
    for k in range(1, classes):
        present = rng.random(CHUNK) < 0.7
        cy, cx = rng.uniform(0, size, (2, CHUNK))
        r = rng.uniform(size / 10, size / 4, CHUNK)
        # How far off the model is, per image: from nearly right to wholly wrong.
        miss = rng.beta(1.2, 2.5, CHUNK)
        py, px = cy + rng.normal(0, 1, CHUNK) * miss * size / 3, cx + rng.normal(0, 1, CHUNK) * miss * size / 3
        pr = r * (1 + rng.normal(0, 0.3, CHUNK) * miss)
        disc = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) <= (r**2)[:, None, None]
        truth[disc & present[:, None, None]] = k
        disc = ((yy - py[:, None, None]) ** 2 + (xx - px[:, None, None]) ** 2) <= (pr**2)[:, None, None]
        pred[disc & (present | (rng.random(CHUNK) < 0.1))[:, None, None]] = k
    noise = rng.random((CHUNK, size, size)) < rng.beta(1, 12, CHUNK)[:, None, None]
    pred[noise] = rng.integers(0, classes, int(noise.sum()))
    truth[rng.random((CHUNK, size, size)) < 0.01] = 255
    return truth, pred


def records(chunk: int, truth: np.ndarray, pred: np.ndarray, src: str) -> pa.Table:
    """Predict's records of one chunk: sparse per-image confusion matrices."""
    counted = truth != 255
    owner = np.broadcast_to(np.arange(CHUNK)[:, None, None], truth.shape)[counted]
    cells = encode_cells(truth[counted], pred[counted]).astype(np.int64)
    keys, counts = np.unique(owner.astype(np.int64) * CELL_BASE * CELL_BASE + cells, return_counts=True)
    img, cell = keys // (CELL_BASE * CELL_BASE), keys % (CELL_BASE * CELL_BASE)
    starts = np.searchsorted(img, np.arange(CHUNK + 1))
    ids = [f"img_{chunk * CHUNK + i:06d}" for i in range(CHUNK)]
    size = truth.shape[1]
    return pa.table(
        {
            "image_id": ids,
            "uri": [f"{src}/images/{i}.png" for i in ids],
            "status": ["ok"] * CHUNK,
            "reason": [""] * CHUNK,
            "height": np.full(CHUNK, size, np.int32),
            "width": np.full(CHUNK, size, np.int32),
            "has_truth": np.ones(CHUNK, bool),
            "cm_cells": pa.ListArray.from_arrays(pa.array(starts.astype(np.int32)), pa.array(cell.astype(np.int32))),
            "cm_counts": pa.ListArray.from_arrays(pa.array(starts.astype(np.int32)), pa.array(counts.astype(np.int64))),
            "run": np.zeros(CHUNK, np.int64),
        },
        schema=RECORD_SCHEMA,
    )


def picture(truth: np.ndarray, colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    base = colours[np.where(truth == 255, 0, truth)].astype(np.float32) * 0.6 + 60
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def build(root: str, n: int, classes: int, size: int, worst: int, errors: int) -> str:
    from segray.reporting import OutputTables
    from segray.reporting import worst as worst_images

    src, out = os.path.join(root, "raw"), os.path.join(root, "out")
    names = ["background"] + [f"class_{k}" for k in range(1, classes)]
    output = Output(out)
    claim(output, {"format": "segray-predict/1", "model_id": "benchmark", "source": src, "classes": names})
    colours = [default_color(k) for k in range(classes)]
    storage.write_text(output.classes, json.dumps([{"id": k, "name": c, "color": colours[k]} for k, c in enumerate(names)]))
    chunks = (n + CHUNK - 1) // CHUNK
    parts = []
    for chunk in range(chunks):
        table = records(chunk, *pairs(chunk, size, classes), src)
        storage.write_parquet(table, storage.join(output.parts, f"{chunk:05d}.parquet"))
        parts.append(table)
    merged = latest_records(pa.concat_tables(parts)).slice(0, n).sort_by("image_id")
    scores, frames = score_tables(merged, names)
    rejected = [(f"{src}/images/bad_{i:05d}.png", f"{src}/images/bad_{i:05d}.png: truncated PNG") for i in range(errors)]
    summary = {"images": n, **scores, "errors": errors, "model_id": "benchmark", "model": "(none: synthetic predictions)",
               "source": src, "source_kind": "raw", "has_truth": True, "config": {"benchmark": "report_scale"}}
    write_results(output, frames, classes, summary, rejected)
    # The files of the images the report shows, found with the query it uses.
    tables = OutputTables(out)
    shown = sorted({i for k in range(classes) for i in worst_images(tables, k, worst)["image_id"]})
    lut = np.asarray(colours, np.uint8)
    by_chunk: dict[int, list[int]] = {}
    for image_id in shown:
        index = int(image_id[4:])
        by_chunk.setdefault(index // CHUNK, []).append(index % CHUNK)
    rng = np.random.default_rng(0)
    for chunk, rows in by_chunk.items():
        truth, pred = pairs(chunk, size, classes)
        for row in rows:
            image_id = f"img_{chunk * CHUNK + row:06d}"
            storage.write_bytes(f"{src}/images/{image_id}.png", encode_png(picture(truth[row], lut, rng)))
            storage.write_bytes(f"{src}/masks/{image_id}.png", encode_png(truth[row]))
            storage.write_bytes(output.mask(image_id), encode_png(pred[row]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--worst", type=int, default=12)
    parser.add_argument("--errors", type=int, default=2000)
    args = parser.parse_args()

    import segray
    from tests.reporting.browser import Browser, chromium

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        out = build(root, args.n, args.classes, args.size, args.worst, args.errors)
        built = time.perf_counter() - t0
        rows = segray.query(out, "SELECT count(*) AS n FROM per_image")["n"][0]
        print(f"synthetic predict output: {args.n:,} images x {args.classes} classes = {rows:,} per-image rows in {built:.1f} s")

        path = os.path.join(root, "report.html")
        t0 = time.perf_counter()
        result = segray.report(ReportConfig(out=out, output=path, worst=args.worst))
        report_s = time.perf_counter() - t0
        mb = result.size_bytes / 2**20
        print(f"report: {mb:.2f} MB, {result.strips} strips, written in {report_s:.1f} s (target < 50 MB)")

        exe = chromium()
        if exe is None:
            sys.exit("chromium is not installed: apt-get install -y chromium")
        browser = Browser()
        try:
            browser.open("about:blank")
            renders = []
            for _ in range(3):
                load = browser.open(path)
                renders.append(load.seconds)
            outside = load.outside() + load.violations
            rows_drawn = browser.evaluate("document.querySelectorAll('#per-class tbody tr').length")
        finally:
            browser.close()
        render_s = float(np.median(renders))
        print(f"render in headless Chromium (navigation to painted page, median of 3): {render_s:.2f} s (target < 5 s); "
              f"{rows_drawn} class rows drawn; requests outside the page: {len(outside)}")
        t0 = time.perf_counter()
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "file://" + path],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)
        cold_s = time.perf_counter() - t0
        print(f"chromium --dump-dom from a cold start: {cold_s:.2f} s")
        print(
            f"RESULT images={args.n} per_image_rows={rows} report_mb={mb:.2f} render_s={render_s:.2f} cold_dump_dom_s={cold_s:.2f} "
            f"report_build_s={report_s:.1f} outside_requests={len(outside)} size_ok={mb < 50} render_ok={render_s < 5}"
        )


if __name__ == "__main__":
    main()
