"""Batch inference and evaluation on Ray Data.

    >>> from segray.inference import PredictConfig, predict, format_per_class
    >>> result = predict(PredictConfig(model="runs/unet", input="data/val", output="preds"))
    >>> print(format_per_class(result.per_class))

``predict`` streams images from storage through decode tasks, an actor pool
that runs the model, and writer tasks, and leaves masks, overlays and the
per-image / per-class / confusion tables in OUT; a re-run after a crash does
only what is missing. ``evaluate`` makes the same tables from masks that
already exist.
"""

from segray.inference.config import PredictConfig, PredictResult
from segray.inference.evaluation import evaluate
from segray.inference.pipeline import predict
from segray.inference.tables import format_per_class, read_confusion

__all__ = ["PredictConfig", "PredictResult", "evaluate", "format_per_class", "predict", "read_confusion"]
