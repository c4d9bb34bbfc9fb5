"""The tracking fields: a URI never carries credentials, registry references are checked, params are flat text."""

from __future__ import annotations

import pytest

from segray.config import ConfigError, ExportConfig, PredictConfig, ServeConfig, TrainConfig
from segray.tracking import tracking_uri
from segray.tracking.client import flat_params


def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(ConfigError) as e:
        TrainConfig(data="/d", storage="/s", name="n", mlflow="https://alice:s3cret@mlflow.example.com")
    assert e.value.field == "mlflow" and "s3cret" not in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)
    assert TrainConfig(data="/d", storage="/s", name="n", mlflow="http://127.0.0.1:5000").mlflow == "http://127.0.0.1:5000"


def test_the_tracking_uri_comes_from_the_field_else_mlflows_variable(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert tracking_uri(None) == "sqlite:///x.db" and tracking_uri("http://h:1") == "http://h:1"


def test_registered_model_references_are_taken_where_a_run_is_and_checked():
    for reference in ("models:/shapes/3", "models:/shapes@champion"):
        assert PredictConfig(model=reference, input="/i", output="/o").model == reference
        assert ExportConfig(run=reference, output="/o").run == reference
        assert ServeConfig(run=reference).run == reference
    with pytest.raises(ConfigError, match="expected models:/NAME/VERSION or models:/NAME@ALIAS") as e:
        PredictConfig(model="models:/shapes/latest/x", input="/i", output="/o")
    assert e.value.field == "model"
    with pytest.raises(ConfigError, match="wraps the ONNX export") as e:
        ExportConfig(run="/r", output="/o", format="keras", register="shapes")
    assert e.value.field == "register"


def test_params_are_flat_text():
    assert flat_params({"model_options": {"depth": 2, "width": [8, 16]}, "lr": 0.01, "name": "n", "size": None}) == {
        "model_options.depth": "2", "model_options.width": "[8, 16]", "lr": "0.01", "name": "n", "size": "null"}
    assert len(flat_params({"long": "x" * 10_000})["long"]) == 6000
