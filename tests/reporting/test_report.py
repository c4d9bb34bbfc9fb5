"""segray report and segray query on one real predict output: SQL against pandas, the page in a real Chromium, S3, bad input."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import segray
from segray import storage
from segray.cli import main as cli_main
from segray.config import ConfigError, PredictConfig, QueryConfig, ReportConfig
from segray.data.imageio import decode_image, decode_mask
from segray.inference import predict
from segray.reporting import OutputTables, below, confused, worst
from segray.reporting.strips import GAP, colour_table, error_map
from segray.reporting.svg import heat_colour, row_normalised
from segray.training.loop import epoch_metrics
from tests.inference.helpers import CLASS_NAMES, write_raw, write_run
from tests.reporting.browser import Browser, chromium

pytestmark = pytest.mark.usefixtures("ray_cluster")

SIZES = {f"img_{i:03d}": [(32, 32), (24, 40), (40, 24)][i % 3] for i in range(18)}
K = 5


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """One predict with truth (18 images of three sizes, two rejected inputs) and a run's history."""
    root = tmp_path_factory.mktemp("report")
    raw, out = str(root / "raw"), str(root / "out")
    pairs = write_raw(raw, SIZES, seed=3)
    storage.write_text(f"{raw}/images/zz_notes.txt", "not an image")
    storage.write_bytes(f"{raw}/images/zz_nomask.png", storage.read_bytes(f"{raw}/images/img_000.png"))
    run = write_run(str(root / "run"), [32, 32])
    predict(PredictConfig(model=run, input=raw, output=out, batch_size=4, overlays=0))
    rng = np.random.default_rng(0)
    history = []
    for epoch in range(4):
        cm = rng.integers(0, 500, (3, 3)) + np.diag([2000 * (epoch + 1)] * 3)
        history.append({"epoch": epoch, **epoch_metrics("train", 90.0 / (epoch + 1), 100.0, cm, CLASS_NAMES),
                        **epoch_metrics("val", 80.0 / (epoch + 1.5), 100.0, cm.T, CLASS_NAMES)})
    import pyarrow as pa

    storage.write_parquet(pa.Table.from_pylist(history), storage.join(run, "history.parquet"))
    truth = {k: v[1] for k, v in pairs.items()}
    images = {k: v[0] for k, v in pairs.items()}
    preds = {k: decode_mask(storage.read_bytes(f"{out}/masks/{k}.png")) for k in SIZES}
    return SimpleNamespace(root=root, raw=raw, out=out, run=run, truth=truth, images=images, preds=preds,
                           per_image=pd.read_parquet(f"{out}/per_image.parquet"),
                           per_class=pd.read_parquet(f"{out}/per_class.parquet"),
                           confusion=pd.read_parquet(f"{out}/confusion.parquet"),
                           errors=pd.read_parquet(f"{out}/_errors.parquet"),
                           history=pd.DataFrame(history))


def pandas_worst(per_image: pd.DataFrame, class_id: int, k: int) -> pd.DataFrame:
    rows = per_image[(per_image["class_id"] == class_id) & per_image["iou"].notna()]
    return rows.sort_values(["iou", "image_id"], kind="stable").head(k)


# --- query -------------------------------------------------------------------------


def test_sql_and_named_queries_equal_pandas(output):
    tables = OutputTables(output.out)
    p = output.per_image
    got = tables.sql("SELECT class_name, avg(iou) AS mean_iou, sum(tp) AS tp FROM per_image WHERE NOT isnan(iou) GROUP BY class_name ORDER BY class_name")
    want = p[p["iou"].notna()].groupby("class_name").agg(mean_iou=("iou", "mean"), tp=("tp", "sum")).reset_index()
    assert got["class_name"].tolist() == want["class_name"].tolist()
    np.testing.assert_allclose(got["mean_iou"], want["mean_iou"], rtol=1e-12)
    assert got["tp"].tolist() == want["tp"].tolist()
    assert tables.sql("SELECT * FROM errors ORDER BY uri")["reason"].tolist() == output.errors.sort_values("uri")["reason"].tolist()
    assert len(output.errors) == 2
    for c, name in enumerate(CLASS_NAMES):
        want = pandas_worst(p, c, K)
        for key in (name, str(c)):
            got = worst(tables, key, K)
            assert got["image_id"].tolist() == want["image_id"].tolist()
            np.testing.assert_array_equal(got["iou"].to_numpy(), want["iou"].to_numpy())
        threshold = float(p[p["class_id"] == c]["iou"].median())
        got = below(tables, name, threshold)
        rows = p[(p["class_id"] == c) & (p["iou"] < threshold)].sort_values(["iou", "image_id"], kind="stable")
        assert got["image_id"].tolist() == rows["image_id"].tolist() and len(rows) > 0


def test_confused_counts_pixels_from_the_masks(output):
    tables = OutputTables(output.out)
    for a, b in ((1, 0), (0, 2), (2, 1)):
        got = confused(tables, CLASS_NAMES[a], CLASS_NAMES[b])
        counts = {k: int(((output.truth[k] == a) & (output.preds[k] == b)).sum()) for k in SIZES}
        support = {k: int((output.truth[k] == a).sum()) for k in SIZES}
        want = sorted(((-n, k) for k, n in counts.items() if n > 0))
        assert got["image_id"].tolist() == [k for _, k in want]
        assert got["pixels"].tolist() == [-n for n, _ in want]
        assert got["truth_pixels"].tolist() == [support[k] for _, k in want]
        assert (got["truth"] == CLASS_NAMES[a]).all() and (got["predicted"] == CLASS_NAMES[b]).all()


def test_query_evaluate_and_predict_agree_on_the_confusion_matrix(output, tmp_path):
    """Three readers of the records' cells (query's image_confusion, evaluate, predict's tables) give the masks' matrix."""
    from segray.config import EvaluateConfig
    from segray.inference import read_confusion
    from segray.metrics import confusion_matrix

    c = len(CLASS_NAMES)
    want = sum(confusion_matrix(output.truth[k], output.preds[k], c) for k in SIZES)
    cells = OutputTables(output.out).sql("SELECT truth_id, pred_id, sum(pixels) AS pixels FROM image_confusion GROUP BY ALL")
    queried = np.zeros((c, c), np.int64)
    queried[cells["truth_id"], cells["pred_id"]] = cells["pixels"]
    ev = str(tmp_path / "ev")
    # No classes given: evaluate infers them from the cells; the model's id it reads from the predict output its masks/ belongs to.
    result = segray.evaluate(EvaluateConfig(pred=f"{output.out}/masks", truth=f"{output.raw}/masks", output=ev))
    np.testing.assert_array_equal(read_confusion(f"{output.out}/confusion.parquet"), want)
    np.testing.assert_array_equal(queried, want)
    np.testing.assert_array_equal(read_confusion(f"{ev}/confusion.parquet"), want)
    assert result.per_class["class_name"].tolist() == [f"class_{k}" for k in range(c)]
    assert result.summary["model_id"] == json.loads(open(f"{output.out}/summary.json").read())["model_id"]
    assert result.output_uri == ev


def test_query_cli_prints_and_writes_every_format(output, tmp_path, capsys):
    sql = "SELECT image_id, class_name, iou, support FROM per_image WHERE class_id = 1 ORDER BY image_id"
    want = output.per_image[output.per_image["class_id"] == 1].sort_values("image_id")[["image_id", "class_name", "iou", "support"]].reset_index(drop=True)
    assert cli_main(["query", output.out, sql, "--format", "csv"]) == 0
    got = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert cli_main(["query", output.out, sql, "--format", "json"]) == 0
    got = pd.DataFrame(json.loads(capsys.readouterr().out))
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert cli_main(["query", output.out, sql]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image_id", "class_name", "iou", "support"] and len(lines) == 1 + len(want)
    assert lines[1].split()[0] == want["image_id"][0]
    for ext, read in ((".parquet", pd.read_parquet), (".csv", pd.read_csv), (".json", pd.read_json)):
        path = str(tmp_path / f"result{ext}")
        assert cli_main(["query", output.out, "--worst", "circle", "--k", "3", "--output", path]) == 0
        assert "wrote 3 row(s)" in capsys.readouterr().out
        assert read(path)["image_id"].tolist() == pandas_worst(output.per_image, 1, 3)["image_id"].tolist()
    frame = segray.query(output.out, "SELECT count(*) AS n FROM per_image")
    assert int(frame["n"][0]) == len(SIZES) * len(CLASS_NAMES)


def test_bad_input_gets_one_line_naming_the_problem(output, tmp_path, capsys):
    broken = str(tmp_path / "broken")
    shutil.copytree(output.out, broken)
    os.remove(os.path.join(broken, "per_image.parquet"))
    cases = [
        (["query", output.out, "SELECT * FROM per_imag"], "SQL error: Catalog Error: Table with name per_imag does not exist"),
        (["query", output.out, "SELEC 1"], 'SQL error: Parser Error: syntax error at or near "SELEC"'),
        (["query", output.out, "SELECT * FROM read_csv('/etc/passwd')"], "Permission Error"),
        (["query", broken, "SELECT * FROM per_image"], f"table per_image: {broken}/per_image.parquet is missing"),
        (["query", str(output.root), "SELECT 1"], f"OUT {output.root} is not a predict or evaluate output: it holds no _run.json"),
        (["query", str(tmp_path / "nothing"), "SELECT 1"], "no such output folder"),
        (["query", output.out, "--worst", "hexagon"], "class 'hexagon' is not a class of"),
        (["query", output.out, "SELECT 1", "--worst", "circle"], "expected exactly one of SQL, --worst, --below or --confused"),
        (["report", str(output.root), "--output", str(tmp_path / "r.html")], "is not a predict or evaluate output"),
        (["report", broken, "--output", str(tmp_path / "r.html")], f"{broken}/per_image.parquet is missing"),
        (["report", output.out, "--run", output.raw, "--output", str(tmp_path / "r.html")], f"--run {output.raw}: no history.parquet there"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not os.path.exists(tmp_path / "r.html")
    # The tables a query does not name are not needed: per_class still answers.
    assert OutputTables(broken).sql("SELECT count(*) AS n FROM per_class")["n"][0] == 3


def test_sql_reaches_no_file_from_a_folder_with_a_dot_tmp(output, tmp_path, monkeypatch, capsys):
    """DuckDB allows its temporary folder (``.tmp`` of the working directory) and ``:memory:.wal`` even without external access."""
    work = tmp_path / "work"
    (work / ".tmp").mkdir(parents=True)
    (work / ".tmp" / "planted.csv").write_text("secret\n42\n")
    monkeypatch.chdir(work)
    tables = OutputTables(output.out)
    statements = [
        "COPY per_class TO '.tmp/x.csv'",
        "COPY per_class TO ':memory:.wal' (FORMAT csv)",
        "ATTACH '.tmp/evil.db' AS evil",
        "SELECT * FROM read_csv('.tmp/planted.csv')",
        f"SELECT * FROM read_csv('{work}/.tmp/planted.csv')",
        "SELECT * FROM read_text('/etc/passwd')",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET allowed_directories = ['/']",
        "SET allowed_paths = ['.tmp/x.csv']",
        "SET temp_directory = '.tmp'",
        "SET lock_configuration = false",
    ]
    for sql in statements:
        with pytest.raises(ValueError, match=r"SQL error: .*(Permission Error|locked|disabled)") as refused:
            tables.sql(sql)
        assert "\n" not in str(refused.value), sql
    assert cli_main(["query", output.out, "COPY per_class TO '.tmp/cli.csv'"]) == 2
    assert "Permission Error" in capsys.readouterr().err
    assert sorted(os.listdir(work)) == [".tmp"] and os.listdir(work / ".tmp") == ["planted.csv"]
    settings = dict(tables.sql(
        "SELECT name, value FROM duckdb_settings() WHERE name IN "
        "('allowed_directories', 'allowed_paths', 'temp_directory', 'lock_configuration', 'enable_external_access')"
    ).itertuples(index=False))
    assert settings == {"allowed_directories": "[]", "allowed_paths": "[]", "temp_directory": "", "lock_configuration": "true",
                        "enable_external_access": "false"}
    # The views still answer, the ones named first in this connection too.
    assert tables.sql("SELECT count(*) AS n FROM per_image")["n"][0] == len(SIZES) * len(CLASS_NAMES)
    assert tables.sql("SELECT count(*) AS n FROM image_confusion")["n"][0] > 0


def test_report_and_query_write_a_new_file_or_replace_only_their_own(output, tmp_path, capsys):
    """An unrelated file is never replaced; one segray wrote only with --overwrite; nothing goes inside an output."""
    sql = "SELECT class_name, iou FROM per_class ORDER BY class_id"

    def argv(path: str, *extra: str) -> list[str]:
        if path.endswith(".html"):
            return ["report", output.out, "--worst", "0", "--output", path, *extra]
        return ["query", output.out, sql, "--output", path, *extra]

    for ext in (".html", ".csv", ".json", ".parquet"):
        theirs = tmp_path / f"theirs{ext}"
        theirs.write_bytes(b"a file segray did not write")
        for extra in ((), ("--overwrite",)):
            assert cli_main(argv(str(theirs), *extra)) == 2, (ext, extra)
            err = capsys.readouterr().err
            assert f"--output {theirs} exists and segray did not write it" in err and err.count("\n") == 1, err
        assert theirs.read_bytes() == b"a file segray did not write"

        ours = str(tmp_path / f"ours{ext}")
        assert cli_main(argv(ours)) == 0
        first = open(ours, "rb").read()
        assert os.path.exists(tmp_path / f".ours{ext}.segray.json")
        assert cli_main(argv(ours)) == 2
        assert f"--output {ours} exists (a {'report' if ext == '.html' else 'query result'} segray wrote)" in capsys.readouterr().err
        assert "set --overwrite to replace it" in (cli_main(argv(ours)), capsys.readouterr().err)[1]
        assert cli_main(argv(ours, "--overwrite")) == 0
        capsys.readouterr()
        if ext != ".html":  # the page says when it was made; a query result is the same bytes again
            assert open(ours, "rb").read() == first
        # Changed by hand after segray wrote it: it is the user's file now.
        with open(ours, "ab") as f:
            f.write(b"\n")
        assert cli_main(argv(ours, "--overwrite")) == 2
        assert "or the file changed since" in capsys.readouterr().err

    masks = sorted(os.listdir(os.path.join(output.out, "masks")))
    top = sorted(os.listdir(output.out))
    for path in (f"{output.out}/masks/x.html", f"{output.out}/report.html", f"{output.out}/masks/x.csv", f"{output.out}/new/x.parquet"):
        for extra in ((), ("--overwrite",)):
            assert cli_main(argv(path, *extra)) == 2, path
            err = capsys.readouterr().err
            assert f"--output {path} lies inside the predict or evaluate output {output.out} (it holds _run.json)" in err, err
    assert sorted(os.listdir(os.path.join(output.out, "masks"))) == masks and sorted(os.listdir(output.out)) == top
    with pytest.raises(FileExistsError, match="exists and segray did not write it"):
        segray.query(QueryConfig(out=output.out, sql=sql, output=str(tmp_path / "theirs.csv")))


def test_configs_refuse_bad_values():
    with pytest.raises(ConfigError, match="exactly one"):
        QueryConfig(out="x", sql="SELECT 1", worst="circle")
    with pytest.raises(ConfigError, match="IOU must be in"):
        QueryConfig(out="x", below=("circle", 1.5))
    with pytest.raises(ConfigError, match=r"\.parquet, \.csv or \.json"):
        QueryConfig(out="x", sql="SELECT 1", output="result.xlsx")
    with pytest.raises(ConfigError, match=r"\.html"):
        ReportConfig(out="x", output="report.pdf")
    assert QueryConfig.from_dict({"out": "x", "below": ["circle", 0.5]}).below == ("circle", 0.5)


# --- the report in a real browser -------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if chromium() is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def report(output, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("html") / "report.html")
    result = segray.report(ReportConfig(out=output.out, run=output.run, output=path, worst=K))
    return SimpleNamespace(path=path, result=result, html=open(path, encoding="utf-8").read())


def test_report_page_loads_without_the_network(browser, report):
    load = browser.open(report.path)
    assert load.outside() == [] and load.violations == [], (load.outside(), load.violations)
    assert load.console_errors == []
    assert browser.evaluate("document.body.getAttribute('data-ready')") == "1"  # the page's script ran
    assert browser.evaluate(
        "Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') || e.getAttribute('href'))"
        ".filter(u => !u.startsWith('data:') && !u.startsWith('#'))"
    ) == []
    assert report.result.size_bytes == os.path.getsize(report.path) and report.result.strips == K * len(CLASS_NAMES)


def test_network_guard_sees_a_page_that_calls_out(browser, report, tmp_path):
    """The check above can fail: a page with a remote image is caught, with and without the policy."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/probe.png"
    try:
        calling = report.html.replace("</body>", f'<img src="{url}"></body>')
        (tmp_path / "with_policy.html").write_text(calling, encoding="utf-8")
        load = browser.open(str(tmp_path / "with_policy.html"))
        assert any(url in v for v in load.violations) and hits == []
        (tmp_path / "without_policy.html").write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", calling), encoding="utf-8")
        load = browser.open(str(tmp_path / "without_policy.html"))
        assert url in load.outside() and hits == ["/probe.png"]
    finally:
        server.shutdown()


def test_per_class_table_has_the_outputs_numbers_and_sorts(browser, report, output):
    browser.open(report.path)
    rows = browser.evaluate(
        "Array.from(document.querySelectorAll('#per-class tbody tr')).map(r => Array.from(r.cells).map(c => [c.getAttribute('data-value'), c.textContent.trim()]))"
    )
    pc = output.per_class
    assert len(rows) == len(CLASS_NAMES) == len(pc)
    share = pc["support"] / pc["support"].sum()
    for row, want, s in zip(rows, pc.itertuples(index=False), share):
        assert row[1][1] == want.class_name
        for cell, value in zip(row[2:6], (want.iou, want.dice, want.precision, want.recall)):
            assert float(cell[0]) == pytest.approx(value, abs=1e-12) and cell[1] == f"{value:.4f}"
        assert float(row[6][0]) == pytest.approx(s, abs=1e-12) and int(row[7][0]) == want.support
    browser.evaluate("document.querySelector('#per-class th[data-col=IoU]').click()")
    ascending = browser.evaluate("Array.from(document.querySelectorAll('#per-class tbody tr')).map(r => r.cells[1].textContent.trim())")
    assert ascending == pc.sort_values("iou")["class_name"].tolist()
    browser.evaluate("document.querySelector('#per-class th[data-col=IoU]').click()")
    descending = browser.evaluate("Array.from(document.querySelectorAll('#per-class tbody tr')).map(r => r.cells[1].textContent.trim())")
    assert descending == ascending[::-1]
    legend = browser.evaluate("Array.from(document.querySelectorAll('#legend .swatch')).map(s => getComputedStyle(s).backgroundColor)")
    classes = json.loads(open(f"{output.out}/classes.json").read())
    assert legend == [f"rgb({c['color'][0]}, {c['color'][1]}, {c['color'][2]})" for c in classes]


def test_heat_map_is_the_normalised_confusion_matrix_and_is_drawn(browser, report, output):
    browser.open(report.path)
    cells = browser.evaluate(
        "Array.from(document.querySelectorAll('#confusion rect.cell')).map(r => [+r.dataset.truth, +r.dataset.pred, r.dataset.value, r.getAttribute('fill')])"
    )
    matrix = output.confusion[[f"pred_{k}" for k in range(3)]].to_numpy()
    norm = row_normalised(matrix)
    assert len(cells) == 9
    for i, j, value, fill in cells:
        assert float(value) == pytest.approx(matrix[i, j] / matrix[i].sum(), abs=1e-12) and fill == heat_colour(norm[i, j])
    pixels = browser.screenshot("#confusion")
    assert pixels.shape[0] > 60 and pixels.std() > 20
    # Every cell's own colour is on screen.
    painted = {tuple(p) for p in pixels.reshape(-1, 3).tolist()}
    for _, _, _, fill in cells:
        rgb = tuple(int(v) for v in re.findall(r"\d+", fill))
        assert any(max(abs(a - b) for a, b in zip(rgb, p)) <= 2 for p in painted), fill


def test_worst_strips_show_the_right_images_and_pixels(browser, report, output):
    browser.open(report.path)
    sections = browser.evaluate(
        "Array.from(document.querySelectorAll('section.worst')).map(s => [+s.dataset.classId,"
        " Array.from(s.querySelectorAll('figure.strip')).map(f => [f.dataset.imageId, f.dataset.iou, f.querySelector('img').src])])"
    )
    lut = colour_table([tuple(c["color"]) for c in json.loads(open(f"{output.out}/classes.json").read())])
    assert [s[0] for s in sections] == [0, 1, 2]
    for class_id, figures in sections:
        want = pandas_worst(output.per_image, class_id, K)
        assert [f[0] for f in figures] == want["image_id"].tolist()
        np.testing.assert_allclose([float(f[1]) for f in figures], want["iou"], rtol=0, atol=1e-12)
        for image_id, _, src in figures[:2]:
            strip = decode_image(base64.b64decode(src.split(",", 1)[1]))
            truth, pred, image = output.truth[image_id], output.preds[image_id], output.images[image_id]
            h, w = truth.shape
            panels = [strip[:, k * (w + GAP): k * (w + GAP) + w] for k in range(4)]
            assert strip.shape == (h, 4 * w + 3 * GAP, 3)
            np.testing.assert_array_equal(panels[0], image)
            np.testing.assert_array_equal(panels[1], lut[truth])
            np.testing.assert_array_equal(panels[2], lut[pred])
            np.testing.assert_array_equal(panels[3], error_map(truth, pred, class_id))
    pixels = browser.screenshot("section.worst[data-class-id='1'] figure.strip img")
    assert pixels.shape[0] >= 96 and pixels.std() > 20


def test_curves_histograms_and_quarantine_come_from_the_data(browser, report, output):
    browser.open(report.path)
    series = browser.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('#curve-miou polyline')).map(p => [p.dataset.split, p.dataset.values]))")
    for split in ("train", "val"):
        np.testing.assert_allclose([float(v) for v in series[split].split(",")], output.history[f"{split}_miou"], rtol=1e-12)
    bars = browser.evaluate("Array.from(document.querySelectorAll('svg.histogram')).map(s => Array.from(s.querySelectorAll('rect.bar')).map(b => +b.dataset.value))")
    p = output.per_image
    for class_id, counts in enumerate(bars):
        iou = p[(p["class_id"] == class_id) & p["iou"].notna()]["iou"].to_numpy()
        assert counts == np.bincount(np.minimum((iou * 20).astype(int), 19), minlength=20).tolist()
    assert browser.screenshot("#hist-1").std() > 10
    listed = browser.evaluate("Array.from(document.querySelectorAll('#errors tbody tr')).map(r => r.cells[0].textContent)")
    assert sorted(listed) == sorted(output.errors["uri"]) and len(listed) == 2


def test_report_and_query_on_s3(output, s3, tmp_path):
    bucket = s3.bucket()
    remote = f"{bucket}/preds"
    for f in storage.list_files(output.out):
        storage.write_bytes(storage.join(remote, os.path.relpath(f.uri, output.out)), storage.read_bytes(f.uri))
    got = segray.query(QueryConfig(out=remote, worst="rectangle", k=K))
    assert got["image_id"].tolist() == pandas_worst(output.per_image, 2, K)["image_id"].tolist()
    result = segray.report({"out": remote, "output": f"{bucket}/report.html", "worst": 2})
    page = storage.read_text(result.uri)
    assert result.strips == 2 * len(CLASS_NAMES) and page.count('<figure class="strip"') == 6
    local = str(tmp_path / "local.html")
    segray.report(ReportConfig(out=output.out, output=local, worst=2))
    table = r'<table id="per-class".*?</table>'
    assert re.search(table, page).group(0) == re.search(table, open(local, encoding="utf-8").read()).group(0)


def strips_of(page: str) -> list[tuple[str, np.ndarray]]:
    """(image id, decoded strip) of every strip on a page, in order."""
    found = re.findall(r'<figure class="strip" data-image-id="([^"]+)".*?src="data:image/png;base64,([^"]+)"', page)
    return [(i, decode_image(base64.b64decode(d))) for i, d in found]


def test_evaluate_outputs_and_shard_sources_get_their_strips(output, tmp_path):
    from segray.config import EvaluateConfig, IngestConfig

    lut = colour_table([tuple(c["color"]) for c in json.loads(open(f"{output.out}/classes.json").read())])
    ev = str(tmp_path / "ev")
    segray.evaluate(EvaluateConfig(pred=f"{output.out}/masks", truth=f"{output.raw}/masks", output=ev, classes=f"{output.out}/classes.json"))
    page = storage.read_text(segray.report(ReportConfig(out=ev, output=str(tmp_path / "ev.html"), worst=2)).uri)
    image_id, strip = strips_of(page)[0]
    truth, pred = output.truth[image_id], output.preds[image_id]
    w = truth.shape[1]
    assert strip.shape == (truth.shape[0], 3 * w + 2 * GAP, 3)  # no image beside an evaluate output
    np.testing.assert_array_equal(strip[:, :w], lut[truth])
    np.testing.assert_array_equal(strip[:, w + GAP: 2 * w + GAP], lut[pred])
    with pytest.raises(ValueError, match="image_confusion: .* is an evaluate output"):
        segray.query(QueryConfig(out=ev, confused=("circle", "background")))

    data = str(tmp_path / "ds")
    segray.ingest(IngestConfig(source=output.raw, destination=data, val_fraction=0.5, num_classes=3))
    preds = str(tmp_path / "shard_preds")
    segray.predict(PredictConfig(model=output.run, input=data, split="val", output=preds, overlays=0))
    page = storage.read_text(segray.report(ReportConfig(out=preds, output=str(tmp_path / "shards.html"), worst=2)).uri)
    shown = strips_of(page)
    assert len(shown) == 6
    for image_id, strip in shown[:2]:
        image = output.images[image_id]
        np.testing.assert_array_equal(strip[:, : image.shape[1]], image)  # read back from the Parquet shard
        np.testing.assert_array_equal(strip[:, image.shape[1] + GAP: 2 * image.shape[1] + GAP], lut[output.truth[image_id]])
