"""segray: distributed semantic segmentation on Ray.

The Python API, for notebooks and scripts::

    import segray

    segray.ingest(segray.IngestConfig(source="raw/shapes", destination="data/shapes"))
    print(segray.plan({"data": "data/shapes", "time_budget": 600}).table())  # data/shapes/plan.json
    trained = segray.train(segray.TrainConfig(data="data/shapes", storage="runs", name="unet", epochs=5))
    searched = segray.tune(segray.TuneConfig(data="data/shapes", storage="searches", name="s1", trials=8))  # searched.best["run_uri"]
    result = segray.predict(segray.PredictConfig(model=trained.run_uri, input="data/shapes", split="val", output="preds"))
    result.per_class          # a pandas DataFrame
    model = segray.load_model(trained.run_uri)
    segray.report(segray.ReportConfig(out="preds", run=trained.run_uri, output="report.html"))
    segray.query("preds", "SELECT image_id, iou FROM per_image WHERE class_name = 'circle' ORDER BY iou LIMIT 5")
    segray.export_model(segray.ExportConfig(run=trained.run_uri, format="onnx", output="exported"))
    served = segray.serve(segray.ServeConfig(run=trained.run_uri, blocking=False))  # served.url, served.shutdown()

The config and result classes are imported on first use and the functions
import their machinery when called, so ``import segray`` stays cheap (no
TensorFlow, no Ray). The submodules (``segray.data``, ``segray.models``,
``segray.metrics``, ``segray.training``, ``segray.tuning``, ``segray.inference``,
``segray.reporting``, ``segray.storage``) hold the machinery.
"""

import importlib as _importlib

__version__ = "0.1.0"

# The API's calls (segray.api.__all__: a new one needs no line here).
from segray.api import *  # noqa: F403
from segray.api import __all__ as _API

_PUBLIC = {
    "IngestConfig": "segray.config",
    "TrainConfig": "segray.config",
    "TuneConfig": "segray.config",
    "PredictConfig": "segray.config",
    "EvaluateConfig": "segray.config",
    "ReportConfig": "segray.config",
    "QueryConfig": "segray.config",
    "ExportConfig": "segray.config",
    "ServeConfig": "segray.config",
    "PlanConfig": "segray.config",
    "ConfigError": "segray.config",
    "Plan": "segray.planning",
    "IngestResult": "segray.data",
    "TrainResult": "segray.training",
    "TuneResult": "segray.tuning",
    "PredictResult": "segray.inference",
    "ReportResult": "segray.reporting",
    "ExportResult": "segray.export",
    "Served": "segray.serving",
}

__all__ = sorted([*_PUBLIC, *_API])


def __getattr__(name: str) -> object:
    # PEP 562: the API's modules load on first use of one of its names.
    if name in _PUBLIC:
        return getattr(_importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'segray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
