"""segray report on an instance predict (and evaluate) output: the AP / PQ table and the object outlines of the worst images by PQ."""

from __future__ import annotations

import base64
import os
import re
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest

import segray
from segray.config import ReportConfig
from segray.data import decode_image
from segray.reporting.outlines import GAP, PANEL_SIDE, object_colours, outlines
from tests.instance_run import instance_run, split_rows
from tests.reporting.browser import Browser, chromium

pytestmark = pytest.mark.usefixtures("ray_cluster")
K = 2


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    return instance_run(tmp_path_factory.mktemp("instreport"))


@pytest.fixture(scope="module")
def report(predicted, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("html") / "report.html")
    result = segray.report(ReportConfig(out=predicted.out, output=path, worst=K))
    return SimpleNamespace(path=path, result=result, html=open(path, encoding="utf-8").read())


def _figures(page: str) -> list[tuple[str, np.ndarray]]:
    """(image id, decoded strip) of each outline figure, in page order."""
    found = re.findall(r'<figure class="strip objects" data-image-id="([^"]+)".*?src="data:image/png;base64,([^"]+)"', page)
    return [(i, cv2.cvtColor(cv2.imdecode(np.frombuffer(base64.b64decode(d), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)) for i, d in found]


def test_ap_pq_table_equals_per_class(report, predicted):
    per_class = pd.read_parquet(os.path.join(predicted.out, "per_class.parquet")).set_index("class_id")
    table = report.html.split('id="instance-per-class"')[1].split("</table>")[0]
    rows = re.findall(r'<tr data-class-id="(\d+)">(.*?)</tr>', table)
    assert [int(r[0]) for r in rows] == [1, 2]
    for class_id, cells in rows:
        values = dict(re.findall(r'data-col="(\w+)" data-value="([^"]*)"', cells))
        for column in ("ap", "ap50", "ap75", "pq", "sq", "rq"):
            want = per_class.loc[int(class_id), column]
            assert (values[column] == "" and np.isnan(want)) or np.isclose(float(values[column]), want, rtol=0, atol=0), (class_id, column)


def test_worst_images_by_pq_with_an_outline_colour_per_object(report, predicted):
    quality = pd.read_parquet(os.path.join(predicted.out, "instance_images.parquet"))
    want = quality[quality.pq.notna()].sort_values(["pq", "image_id"]).head(K)
    figures = _figures(report.html)
    assert [i for i, _ in figures] == want.image_id.tolist() and len(figures) == K
    assert report.result.strips >= K
    truth = {k: v for k, v in split_rows(predicted.data, "val").items()}
    for image_id, strip in figures:
        pred = cv2.imread(os.path.join(predicted.out, "instances", f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        h, w = pred.shape
        zoom = max(1, PANEL_SIDE // max(h, w))
        assert strip.shape == (h * zoom, 2 * w * zoom + GAP, 3)
        for panel, ids in ((strip[:, : w * zoom], truth[image_id][1]), (strip[:, w * zoom + GAP:], pred)):
            big = np.repeat(np.repeat(ids.astype(np.int64), zoom, axis=0), zoom, axis=1)
            edge = outlines(big)
            colours = object_colours(int(ids.max()))
            # Every outline pixel has its own object's colour, and each object present has an outline.
            np.testing.assert_array_equal(panel[edge], colours[big[edge]])
            assert set(np.unique(big[edge])) == set(np.unique(ids)) - {0}
            # Inside the objects and outside them: the greyed image (R = G = B), not an outline colour.
            inside = ~edge
            assert (panel[inside][:, 0] == panel[inside][:, 1]).all()
        image = decode_image(open(os.path.join(predicted.raw, "images", f"{image_id}.png"), "rb").read())
        assert image.shape[:2] == (h, w)


def test_report_of_an_instance_evaluate_output(predicted, tmp_path):
    from segray.api import evaluate

    out = str(tmp_path / "ev")
    evaluate({"pred": os.path.join(predicted.out, "instances"), "truth": predicted.data, "output": out})
    path = str(tmp_path / "ev.html")
    segray.report(ReportConfig(out=out, output=path, worst=K))
    page = open(path, encoding="utf-8").read()
    assert 'id="instance-per-class"' in page
    figures = _figures(page)
    assert len(figures) == K
    # Truth from the ingested dataset: both panels have outlines, so neither is the grey of an unknown map.
    for _, strip in figures:
        half = strip.shape[1] // 2
        assert strip[:, :half].std() > 10 and strip[:, half:].std() > 10


def test_page_shows_the_outlines_offline_in_chromium(report):
    if chromium() is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
    browser = Browser()
    try:
        load = browser.open(report.path)
        assert load.outside() == [] and load.violations == [], (load.outside(), load.violations)
        assert browser.evaluate("document.querySelectorAll('#worst-objects figure').length") == K
        pixels = browser.screenshot("#worst-objects figure img")
        assert pixels.shape[0] >= 96 and pixels.std() > 20
        # The AP/PQ table sorts by PQ on a click, as the other tables do.
        browser.evaluate("document.querySelector('#instance-per-class th[data-col=pq]').click()")
        order = browser.evaluate("Array.from(document.querySelectorAll('#instance-per-class tbody tr td[data-col=pq]')).map(c => c.dataset.value)")
        values = [float(v) for v in order if v]
        assert values == sorted(values)
    finally:
        browser.close()
