"""Never destroy, expose or mix: overlap and ownership rules, unsafe ids, atomic claims, credentials in URIs.

Each test here failed on the code before these rules: ingest --overwrite
deleted a source inside its destination, demo deleted any --dir, ids such as
``../../x`` wrote outside OUT, and concurrent claims of one OUT or run name
both won.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segray import storage
from segray.cli import main as cli_main
from segray.config import IngestConfig, PredictConfig
from segray.data import IngestError, ingest, list_pairs, synthesize
from segray.data.imageio import encode_png
from segray.data.ingest import SHARD_SCHEMA
from segray.inference import predict
from segray.inference.output import Output, claim
from segray.ownership import MARKER, claim_folder
from segray.runs import write_config
from tests.inference.helpers import random_pair, write_run


def tree(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def raw(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthesize(str(root / "data" / "raw"), n=8, size=(16, 16), seed=0, show_progress=False)
    return root


def test_ingest_refuses_a_source_inside_the_destination_and_the_reverse(raw, tmp_path):
    data = raw / "data"
    before = tree(data)
    for src, dst in ((data / "raw", data), (data, data / "raw" / "out")):
        with pytest.raises(ValueError, match="overlap"):
            ingest(IngestConfig(source=str(src), destination=str(dst), overwrite=True))
        assert tree(data) == before, "nothing may be read, written or deleted"
    assert cli_main(["ingest", str(data / "raw"), str(data), "--overwrite"]) == 2
    assert tree(data) == before


def test_overwrite_deletes_only_what_segray_wrote(raw, tmp_path, capsys):
    src, dst = str(raw / "data" / "raw"), tmp_path / "ds"
    # A folder segray did not make: refused even with overwrite, nothing deleted.
    (dst / "notes").mkdir(parents=True)
    (dst / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="did not write"):
        ingest(IngestConfig(source=src, destination=str(dst), overwrite=True))
    assert (dst / "notes" / "mine.txt").read_text() == "keep me"
    # A dataset segray made is replaced, its listed files only.
    other = tmp_path / "ds2"
    ingest(IngestConfig(source=src, destination=str(other)))
    marker = json.loads((other / MARKER).read_text())
    assert marker["kind"] == "dataset" and "dataset.json" in marker["files"] and marker["complete"]
    first = set(tree(other))
    ingest(IngestConfig(source=src, destination=str(other), overwrite=True))
    assert {f for f in tree(other) if "part-" not in f} == {f for f in first if "part-" not in f}
    # A file added by hand to a segray dataset stops the overwrite, naming it.
    (other / "train" / "extra.bin").write_bytes(b"x")
    assert cli_main(["ingest", src, str(other), "--overwrite"]) == 2
    assert "extra.bin" in capsys.readouterr().err
    assert (other / "train" / "extra.bin").exists() and (other / "dataset.json").exists()


def test_demo_refuses_a_folder_it_did_not_create(tmp_path, capsys):
    target = tmp_path / "important"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    assert cli_main(["demo", "--dir", str(target)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (target / "thesis.tex").read_text() == "years of work"


UNSAFE_IDS = ["../../escape", "/abs/escape", "a/../../b", "s3://other-bucket/x"]


@pytest.mark.parametrize("image_id", UNSAFE_IDS)
def test_unsafe_ids_are_named_and_never_become_paths_outside_out(tmp_path, image_id):
    from segray.data.layouts import id_problem

    assert repr(image_id) in id_problem(image_id)
    if "://" not in image_id:  # a scheme under a local OUT would stay a file name there; the id check refuses it first
        with pytest.raises(ValueError, match="outside the output folder"):
            Output(str(tmp_path / "out")).mask(image_id)


def test_keys_that_climb_out_are_quarantined_at_listing(s3):
    bucket = s3.bucket()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    name = bucket[len("s3://"):]
    image, mask = random_pair(np.random.default_rng(0), 8, 8)
    for key in ("raw/images/ok.png", "raw/images/a/../../evil.png"):
        client.put_object(Bucket=name, Key=key, Body=encode_png(image))
    for key in ("raw/masks/ok.png", "raw/masks/a/../../evil.png"):
        client.put_object(Bucket=name, Key=key, Body=encode_png(mask))
    plan = list_pairs(f"{bucket}/raw", "ids")
    assert [p.image_id for p in plan.pairs] == ["ok"]
    reasons = [r for _, r in plan.errors]
    assert len(reasons) == 2 and all("'a/../../evil'" in r and "outside the output folder" in r for r in reasons), reasons


def test_predict_quarantines_unsafe_ids_from_a_parquet_dataset(ray_cluster, tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for image_id in ["good", *UNSAFE_IDS]:
        image, mask = random_pair(rng, 16, 16)
        rows.append({
            "image_id": image_id, "image": encode_png(image), "mask": encode_png(mask), "height": 16, "width": 16,
            "source_image": "x", "source_mask": "x",
        })
    shards = tmp_path / "data" / "val"
    shards.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), shards / "part-0.parquet")
    run = write_run(str(tmp_path / "run"), [16, 16])
    out = tmp_path / "sandbox" / "out"
    result = predict(PredictConfig(model=run, input=str(shards), output=str(out), overlays=5))
    assert result.summary["images"] == 1
    reasons = " ".join(r for _, r in result.errors)
    for image_id in UNSAFE_IDS:
        assert repr(image_id) in reasons, (image_id, reasons)
    written = {os.path.relpath(os.path.join(r, f), tmp_path) for r, _, fs in os.walk(tmp_path) for f in fs}
    outside = [w for w in written if not w.startswith(("sandbox/out/", "data/", "run/"))]
    assert outside == [] and not os.path.exists("/abs/escape.png")


def race(claim_once: Callable[[int], None], threads: int = 8) -> int:
    """Runs ``claim_once(i)`` in ``threads`` threads released together; returns how many won."""
    barrier = threading.Barrier(threads)
    wins = []

    def go(i: int) -> None:
        barrier.wait()
        try:
            claim_once(i)
            wins.append(i)
        except FileExistsError:
            pass

    workers = [threading.Thread(target=go, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(wins)


def _claims(kind: str, folder: str) -> Callable[[int], None]:
    if kind == "predict":
        return lambda i: claim(Output(folder), {"model_id": f"model-{i}", "source": "s"})
    if kind == "ingest":
        return lambda i: claim_folder(folder, "dataset", "destination", patterns=[])

    def train_claim(i: int) -> None:
        if not write_config(folder, {"name": "r", "seed": i}, {}, exclusive=True):
            raise FileExistsError(folder)

    return train_claim


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("kind", ["predict", "ingest", "train"])
def test_concurrent_claims_have_one_winner(tmp_path, s3, where, kind):
    root = str(tmp_path) if where == "local" else f"{s3.bucket()}/claims"
    trials = 40 if where == "local" else 12
    double = [t for t in range(trials) if race(_claims(kind, storage.join(root, f"{kind}-{t}"))) != 1]
    assert double == [], f"{len(double)} of {trials} trials had no single winner"


def test_credentials_in_a_uri_are_refused_and_never_echoed(tmp_path, capsys):
    secret = "wJalrXUtnFEMI/K7MDENG"  # AWS secrets hold '/'s
    for argv in (
        ["ingest", f"s3://AKIAEXAMPLE:{secret}@bucket/raw", str(tmp_path / "ds")],
        ["predict", "--model", str(tmp_path), "--input", f"s3://AKIAEXAMPLE:{secret}@bucket/x", "--output", str(tmp_path / "o")],
    ):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "credentials do not belong in a URI" in err and secret not in err and "AKIAEXAMPLE" not in err, err
    with pytest.raises(ValueError, match=r"s3://\*\*\*@bucket") as raised:
        storage.filesystem(f"s3://key:{secret}@bucket/x")
    assert secret not in str(raised.value)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b"])
def test_run_names_stay_inside_storage(name):
    from segray.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="expected a plain run name"):
        TrainConfig(data="d", storage="s", name=name)


def test_an_ingest_that_stopped_half_way_can_be_replaced(raw, tmp_path):
    src, dst = str(raw / "data" / "raw"), tmp_path / "ds"
    ingest(IngestConfig(source=src, destination=str(dst)))
    # As a run killed before it listed its files leaves the folder: its claim, some shards, no dataset.json.
    marker = json.loads((dst / MARKER).read_text())
    run_id = next(f for f in marker["files"] if f.startswith("train/part-")).split("-")[-1].split(".")[0]
    (dst / "dataset.json").unlink()
    (dst / MARKER).write_text(json.dumps({
        "format": marker["format"], "kind": "dataset", "files": [], "complete": False,
        "patterns": [rf"(train|val)/part-\d+-{run_id}\.parquet", r"_errors\.parquet", r"dataset\.json"],
    }))
    # A kill during a shard's write leaves the temporary file it was renamed from: ours, deleted too.
    (dst / "train" / f"part-00009-{run_id}.parquet.tmp-{'0f' * 16}").write_bytes(b"PAR1")
    # A temporary-looking file whose name is not one of ours stays foreign.
    stranger = dst / "train" / f"notes.txt.tmp-{'ab' * 16}"
    stranger.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="notes.txt.tmp-"):
        ingest(IngestConfig(source=src, destination=str(dst), overwrite=True))
    stranger.unlink()
    result = ingest(IngestConfig(source=src, destination=str(dst), overwrite=True))
    assert result.info.splits["train"] + result.info.splits["val"] == 8
    assert not [f for f in tree(dst) if run_id in f], "the stopped run's shards and their temporary files are replaced"


def test_transient_storage_errors_are_retried_and_deterministic_ones_are_not(monkeypatch):
    from segray import storage

    monkeypatch.setattr(storage, "BACKOFF_S", 0.001)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
        return "ok"

    assert storage.retrying("reading s3://b/k", flaky) == "ok" and len(calls) == 3

    def failing(error: Exception):
        """A storage call that raises ``error`` every time; its tries are counted in ``calls``."""
        calls.clear()

        def call():
            calls.append(1)
            raise error

        return call

    # Deterministic errors: raised at the first try, whatever their text says.
    with pytest.raises(FileNotFoundError):
        storage.retrying("reading s3://b/k", failing(FileNotFoundError("s3://b/k: no such key (HTTP status 500 in the text must not matter)")))
    assert len(calls) == 1
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        storage.retrying("reading s3://b/k", failing(OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")))
    assert len(calls) == 1
    # A transient one that never heals: every try, then an error that says so.
    down = OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect to server")
    with pytest.raises(OSError, match="failed 4 times on transient storage errors \\(connection\\)"):
        storage.retrying("writing s3://b/k", failing(down), attempts=4)
    assert len(calls) == 4
