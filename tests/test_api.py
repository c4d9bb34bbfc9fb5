"""The Python API: the README's notebook example runs as written, and what it returns matches the files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import segray

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first ```python block under the README's "Python API" heading."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example(ray_cluster, tmp_path_factory):
    """Runs the README example in a fresh folder, as a notebook would (no subprocess, no argparse)."""
    workdir = tmp_path_factory.mktemp("notebook")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        namespace: dict = {}
        exec(compile(readme_example(), str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    finally:
        os.chdir(cwd)
    namespace["workdir"] = workdir
    return namespace


@pytest.mark.slow
def test_readme_example_runs_ingest_train_predict(example):
    trained, result = example["trained"], example["result"]
    assert isinstance(trained, segray.TrainResult) and isinstance(result, segray.PredictResult)
    # The returned DataFrames are the files written.
    pd.testing.assert_frame_equal(trained.history, pd.read_parquet(os.path.join(example["workdir"], trained.run_uri, "history.parquet")))
    out = os.path.join(example["workdir"], result.output_uri)
    for name in ("per_class", "per_image", "confusion"):
        pd.testing.assert_frame_equal(getattr(result, name), pd.read_parquet(f"{out}/{name}.parquet"), check_dtype=False)
    assert result.summary == json.loads(Path(out, "summary.json").read_text())
    assert trained.best_epoch == int(trained.history["val_miou"].idxmax())
    assert trained.best["val_miou"] == trained.history["val_miou"].max()
    # per_image rows sum to the confusion matrix, which counts every scored pixel.
    cm = result.confusion[[c for c in result.confusion.columns if c.startswith("pred_")]].to_numpy()
    assert result.per_image.groupby("class_id")["tp"].sum().to_numpy().tolist() == np.diag(cm).tolist()
    assert cm.sum() == result.summary["pixels"] > 0
    # The resolved config is recorded with every output.
    assert result.summary["config"]["split"] == "val"
    # The report and the query of the example.
    page = Path(example["workdir"], "demo", "report.html").read_text()
    assert page.count('<tr data-class-id=') == len(result.per_class)
    circles = result.per_image[result.per_image["class_name"] == "circle"].sort_values(["iou", "image_id"]).head(5)
    assert example["worst_circles"]["image_id"].tolist() == circles["image_id"].tolist()
    dataset = json.loads(Path(example["workdir"], "demo", "data", "dataset.json").read_text())
    assert dataset["config"]["val_fraction"] == 0.25


@pytest.mark.slow
def test_load_model_needs_no_other_import(example):
    model = example["model"]
    assert model.output_shape[-1] == 3
    # In a fresh process that imports nothing of segray but load_model.
    code = (
        "import sys, segray; m = segray.load_model(sys.argv[1]); "
        "print(m.output_shape[-1], 'segray.models' in sys.modules)"
    )
    run_uri = os.path.join(example["workdir"], example["trained"].run_uri)
    done = subprocess.run([sys.executable, "-c", code, run_uri], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["3", "True"]


@pytest.mark.slow
def test_export_of_a_trained_run_carries_its_data_config_and_metrics(example):
    from segray.export.card import config_hash

    exported, trained = example["exported"], example["trained"]
    card = json.loads(Path(example["workdir"], "demo", "exported", "model_card.json").read_text())
    assert card == exported.card and card["format"] == "onnx"
    config = json.loads(Path(example["workdir"], trained.run_uri, "config.json").read_text())
    assert card["training"]["data"] == config["data"] == str(Path(example["workdir"], "demo", "data"))
    assert card["training"]["config_hash"] == config_hash(config)
    assert card["training"]["epoch"] == trained.best_epoch
    # A run that ended: how far it got is on the card, with no warning about it.
    assert card["training"]["finished"] is True and card["training"]["stopped"] in ("epochs", "patience", "time_budget")
    assert card["training"]["epochs_done"] == len(trained.history) and not [w for w in card["warnings"] if "unfinished" in w]
    assert card["validation_metrics"]["val_miou"] == pytest.approx(trained.best["val_miou"])


def test_configs_accept_dicts_and_refuse_unknown_fields(tmp_path):
    with pytest.raises(segray.ConfigError, match="unknown config key.*epoch_count"):
        segray.train({"data": "d", "storage": "s", "name": "n", "epoch_count": 3})
    with pytest.raises(FileNotFoundError, match="not an ingested dataset"):
        segray.train({"data": str(tmp_path), "storage": str(tmp_path), "name": "n"})
    with pytest.raises(TypeError, match="expected a PredictConfig"):
        segray.predict(["model"])


def test_public_surface_is_exactly_the_api_and_documented():
    expected = {
        "ingest", "train", "predict", "evaluate", "report", "query", "load_model",
        "IngestConfig", "TrainConfig", "PredictConfig", "EvaluateConfig", "ReportConfig", "QueryConfig", "ConfigError",
        "IngestResult", "TrainResult", "PredictResult", "ReportResult",
        "ingest", "train", "predict", "evaluate", "load_model", "export_model", "serve",
        "IngestConfig", "TrainConfig", "PredictConfig", "EvaluateConfig", "ExportConfig", "ServeConfig", "ConfigError",
        "IngestResult", "TrainResult", "PredictResult", "ExportResult", "Served",
        "plan", "PlanConfig", "Plan",
        "tune", "TuneConfig", "TuneResult",
    }
    assert set(segray.__all__) == expected
    # Nothing else public is defined in segray/__init__.py (submodules aside).
    submodules = {p.stem for p in Path(segray.__file__).parent.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    public = {n for n in dir(segray) if not n.startswith("_")} - submodules
    assert public == expected, public
    for name in segray.__all__:
        doc = getattr(segray, name).__doc__
        assert doc and doc.strip(), f"segray.{name} has no docstring"
    for cls in (segray.IngestConfig, segray.TrainConfig, segray.PredictConfig, segray.EvaluateConfig, segray.ReportConfig, segray.QueryConfig):
        doc = cls.__doc__
        for field in cls.__dataclass_fields__:
            # Every field is described in Attributes, or is self-explanatory by a
            # type and default shown in the signature; the ones below are documented.
            if field in ("source", "destination", "data", "model", "input", "output", "pred", "truth", "batch_size", "workers"):
                assert field in doc, f"{cls.__name__}.{field} is not documented"


def test_import_segray_is_cheap():
    code = "import sys, segray; print(sorted(m for m in ('ray', 'tensorflow', 'keras') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
