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



def test_tracking_without_the_mlflow_package_is_refused_before_the_job_claims_anything():
    """In a process where mlflow cannot be imported, a tracked config is refused, naming what to install or unset."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\n"
        "sys.modules['mlflow'] = None  # as if not installed: `import mlflow` raises ImportError\n"
        "from segray.config import ConfigError, TrainConfig\n"
        "try:\n"
        "    TrainConfig(data='/d', storage='/s', name='n')\n"
        "    print('ACCEPTED')\n"
        "except ConfigError as e:\n"
        "    print('REFUSED', e.field, e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "REFUSED mlflow" in out.stdout and "pip install 'segray[mlflow]'" in out.stdout, out.stdout + out.stderr[-2000:]
    env.pop("MLFLOW_TRACKING_URI")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "ACCEPTED" in out.stdout, out.stdout + out.stderr[-2000:]
