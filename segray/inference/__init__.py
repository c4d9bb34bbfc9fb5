"""Batch inference and evaluation on Ray Data.

``predict`` streams images from storage through decode tasks, an actor pool
that runs the model, and writer tasks, and leaves masks, overlays and the
per-image / per-class / confusion tables in OUT (``Output`` names every path
there); a re-run after a crash does only what is missing. ``evaluate`` makes
the same tables from masks that already exist. Most users call them as
``segray.predict`` and ``segray.evaluate``.
"""

from segray.inference.evaluation import evaluate
from segray.inference.geometry import fit_image, tiled_argmax
from segray.inference.instance_tables import INSTANCE_IMAGES_FILE, INSTANCE_IMAGES_SCHEMA, INSTANCES_FILE
from segray.inference.objects import INSTANCE_PER_CLASS_SCHEMA, OBJECTS_SCHEMA, instance_per_class_frame, objects_table
from segray.inference.output import RUN_FILE, TABLES, Output, PredictResult, claim, read_parts, write_results
from segray.inference.pipeline import converted, geometry_of, predict
from segray.inference.predictor import Predictor
from segray.inference.rasters import read_chunk_records
from segray.inference.sources import display_uint8
from segray.inference.tables import (
    OK,
    RECORD_SCHEMA,
    format_per_class,
    latest_records,
    read_confusion,
    record_cells,
    score_tables,
    table_schema,
)

__all__ = [
    "INSTANCES_FILE",
    "INSTANCE_IMAGES_FILE",
    "INSTANCE_IMAGES_SCHEMA",
    "INSTANCE_PER_CLASS_SCHEMA",
    "OBJECTS_SCHEMA",
    "OK",
    "RECORD_SCHEMA",
    "RUN_FILE",
    "TABLES",
    "Output",
    "PredictResult",
    "Predictor",
    "claim",
    "converted",
    "display_uint8",
    "evaluate",
    "fit_image",
    "format_per_class",
    "geometry_of",
    "instance_per_class_frame",
    "latest_records",
    "objects_table",
    "predict",
    "read_confusion",
    "read_chunk_records",
    "read_parts",
    "record_cells",
    "score_tables",
    "table_schema",
    "tiled_argmax",
    "write_results",
]
