"""Batch inference and evaluation on Ray Data.

``predict`` streams images from storage through decode tasks, an actor pool
that runs the model, and writer tasks, and leaves masks, overlays and the
per-image / per-class / confusion tables in OUT (``Output`` names every path
there); a re-run after a crash does only what is missing. ``evaluate`` makes
the same tables from masks that already exist. Most users call them as
``segray.predict`` and ``segray.evaluate``.
"""

from segray.inference.evaluation import evaluate
from segray.inference.output import Output, PredictResult
from segray.inference.pipeline import predict
from segray.inference.tables import format_per_class, read_confusion

__all__ = ["Output", "PredictResult", "evaluate", "format_per_class", "predict", "read_confusion"]
