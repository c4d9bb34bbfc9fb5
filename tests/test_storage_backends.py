"""Every store goes through segray/storage.py alone: gs:// and az:// end to end, claims, credentials.

Google Cloud Storage is gcp-storage-emulator's server and Azure Blob is
Azurite, both on 127.0.0.1 and talked to by the real gcsfs and adlfs clients
(``tests/conftest.py``). Ingest, train and predict run with every path on
the store; their tables equal those of the same model predicting the same
data from a local folder.
"""

from __future__ import annotations

import ast
import json
import os
import re
from types import SimpleNamespace

import pandas as pd
import pytest

from segray import storage
from segray.cli import main as cli_main
from segray.config import IngestConfig, PredictConfig, TrainConfig
from segray.data import ingest, synthesize
from segray.inference import predict
from segray.training import train
from tests.conftest import AZURITE_KEY
from tests.test_safety import _claims, race

SEGRAY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "segray")
STORES = ["gs", "az"]
TABLES = ("per_image.parquet", "per_class.parquet", "confusion.parquet")

# A storage scheme written out, anywhere in a module (code, strings, comments).
_SPELLED = re.compile(r"\b(s3|s3a|gs|gcs|az|abfss?|wasbs?|adl)://", re.IGNORECASE)
# Names that only a backend's code needs.
_BACKEND_NAMES = {"is_s3", "S3_SCHEME", "S3FileSystem", "GcsFileSystem", "AzureFileSystem", "LocalFileSystem",
                  "GCSFileSystem", "AzureBlobFileSystem", "s3fs", "gcsfs", "adlfs", "boto3"}


def scheme_branches(source: str) -> list[str]:
    """What in ``source`` spells a storage scheme or compares schemes: ``[line: what]``."""
    found = [f"{source.count(chr(10), 0, m.start()) + 1}: spells {m.group(0)}" for m in _SPELLED.finditer(source)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
            node.value == "://" or node.value.lower() in {"s3", "gs", "az", "s3:", "gs:", "az:"}
        ):
            found.append(f"{node.lineno}: compares with {node.value!r}")
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name in _BACKEND_NAMES:
            found.append(f"{node.lineno}: uses {name}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [f"{node.lineno}: imports {m}" for m in modules if m.split(".")[0] in _BACKEND_NAMES | {"botocore", "azure", "google"}]
    return found


def test_no_module_but_storage_knows_a_scheme():
    offenders = {}
    for folder, _, files in os.walk(SEGRAY):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or os.path.relpath(path, SEGRAY) == "storage.py":
                continue
            with open(path, encoding="utf-8") as f:
                hits = scheme_branches(f.read())
            if hits:
                offenders[os.path.relpath(path, SEGRAY)] = hits
    assert offenders == {}, f"only segray/storage.py may know a store's scheme: {offenders}"


def test_the_scheme_check_finds_a_branch():
    branch = 'import posixpath\nif uri.startswith("s3://") or "://" in uri:\n    pass  # gs:// too\nfs = pafs.LocalFileSystem()\n'
    assert sorted(scheme_branches(branch)) == ["2: compares with '://'", "2: spells s3://", "3: spells gs://", "4: uses LocalFileSystem"]
    with open(os.path.join(SEGRAY, "storage.py"), encoding="utf-8") as f:
        assert scheme_branches(f.read()), "storage.py holds the backends, so the check must find them there"


def test_every_backend_is_one_entry_of_the_table():
    assert sorted(storage.BACKENDS) == ["az://", "gs://", "s3://"]
    for scheme, backend in storage.BACKENDS.items():
        assert backend.form.startswith(scheme) and storage.join(backend.form, "a", "b") == backend.form + "/a/b"
        assert storage.parent(storage.join(backend.form, "x")) == backend.form and not storage.is_local(backend.form)
    with pytest.raises(ValueError, match=r"unsupported scheme 'ftp'; expected a local path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix"):
        storage.filesystem("ftp://host/x")


@pytest.fixture(scope="module")
def stores(gcs, azure):
    return {"gs": gcs, "az": azure}


@pytest.mark.parametrize("where", STORES)
@pytest.mark.parametrize("kind", ["predict", "ingest", "train"])
def test_concurrent_claims_have_one_winner(stores, where, kind):
    root = f"{stores[where].bucket()}/claims"
    trials = 6  # the GCS emulator answers one request at a time: 6 races of 8 threads take seconds
    double = [t for t in range(trials) if race(_claims(kind, storage.join(root, f"{kind}-{t}"))) != 1]
    assert double == [], f"{len(double)} of {trials} trials had no single winner"


@pytest.mark.parametrize("where", STORES)
def test_credentials_in_a_uri_are_refused_and_never_echoed(where, tmp_path, capsys):
    secret = "c2VjcmV0/a2V5+Zm9y=="
    uri = f"{where}://someone:{secret}@bucket/raw"
    assert cli_main(["ingest", uri, str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    variables = "GOOGLE_APPLICATION_CREDENTIALS" if where == "gs" else "AZURE_STORAGE_CONNECTION_STRING"
    assert "credentials do not belong in a URI" in err and variables in err and secret not in err and "someone" not in err, err
    with pytest.raises(ValueError, match=rf"{where}://\*\*\*@bucket") as raised:
        storage.filesystem(uri)
    assert secret not in str(raised.value)
    assert not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def cluster(stores):
    """One Ray for the module, started after the stores' variables are set (its workers inherit them)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory, cluster):
    """A tiny synthetic raw dataset and its local ingest: the reference."""
    root = tmp_path_factory.mktemp("local")
    raw = str(root / "raw")
    synthesize(raw, n=24, size=(32, 32), num_classes=3, seed=0, show_progress=False)
    result = ingest(IngestConfig(source=raw, destination=str(root / "ds"), val_fraction=0.25))
    return SimpleNamespace(root=root, raw=raw, ds=result.dst, info=result.info)


def upload(folder: str, uri: str) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(uri, os.path.relpath(path, folder)), f.read())


def dataset_record(info, *roots: str) -> dict:
    """``dataset.json`` with the given roots replaced by ROOT and no run id or timing, so two stores' datasets compare."""
    text = json.dumps(json.loads(info.to_json()), sort_keys=True)
    for k, root in enumerate(roots):
        text = text.replace(root.rstrip("/"), f"ROOT{k}")
    record = json.loads(text)
    for key in ("seconds", "run_id"):
        record["extra"].pop(key)
    return record


def table(uri: str) -> pd.DataFrame:
    frame = storage.read_parquet(uri).to_pandas()
    return frame.drop(columns=[c for c in frame.columns if c in ("uri", "source", "pred_uri", "truth_uri")])


@pytest.mark.slow
@pytest.mark.parametrize("where", STORES)
def test_ingest_train_predict_on_the_store_equal_a_local_run(where, stores, local, tmp_path, capfd):
    bucket = stores[where].bucket()
    raw, data, runs, out = f"{bucket}/raw", f"{bucket}/datasets/shapes", f"{bucket}/runs", f"{bucket}/preds"
    upload(local.raw, raw)

    ingested = ingest(IngestConfig(source=raw, destination=data, val_fraction=0.25))
    assert dataset_record(ingested.info, raw, data) == dataset_record(local.info, local.raw, local.ds)
    assert {k.split("/")[-1] for k in stores[where].keys(data)} >= {"dataset.json", "_segray.json"}

    result = train(TrainConfig(
        data=data, storage=runs, name="tiny", model="unet", epochs=1, batch_size=8, workers=1, model_options={"depth": 2, "width": 8},
    ))
    assert result.run_uri == f"{runs}/tiny" and list(result.history["epoch"]) == [0]
    assert storage.exists(storage.join(result.run_uri, "model", "model.keras"))

    # The model trained on the store predicts the store's data into the store,
    # and (the reference) the same data from the local folder into a local one.
    on_store = predict(PredictConfig(model=result.run_uri, input=data, split="val", output=out, batch_size=4, overlays=1))
    reference = predict(PredictConfig(model=result.run_uri, input=local.ds, split="val", output=str(tmp_path / "ref"), batch_size=4, overlays=1))
    assert on_store.summary["images"] == reference.summary["images"] == local.info.splits["val"] > 0
    for name in TABLES:
        pd.testing.assert_frame_equal(table(storage.join(out, name)), table(storage.join(reference.output_uri, name)))
    masks = [k for k in stores[where].keys(out) if "/masks/" in k]
    assert len(masks) == on_store.summary["images"] and not [k for k in stores[where].keys(bucket) if ".tmp-" in k]

    # No credential in what was printed or written.
    printed = "".join(capfd.readouterr())
    written = [storage.read_text(storage.join(bucket, k)) for k in stores[where].keys(bucket) if k.endswith((".json", ".yaml", ".txt"))]
    for text in [printed, *written]:
        assert AZURITE_KEY not in text and "AccountKey" not in text


@pytest.mark.slow
@pytest.mark.parametrize("where", STORES)
def test_ray_data_reads_and_writes_through_the_storage_filesystem(where, stores, cluster):
    import pyarrow as pa
    import ray

    folder = f"{stores[where].bucket()}/table"
    fs, path = storage.filesystem(folder)
    ray.data.from_arrow(pa.table({"image_id": [f"i{k}" for k in range(20)], "n": list(range(20))})).repartition(2).write_parquet(path, filesystem=fs)
    assert len([k for k in stores[where].keys(folder) if k.endswith(".parquet")]) == 2
    rows = ray.data.read_parquet(path, filesystem=fs).take_all()
    assert sorted(r["n"] for r in rows) == list(range(20))
