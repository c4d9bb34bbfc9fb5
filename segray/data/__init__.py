"""Datasets: raw layouts, ingest, synthetic data, the Ray Data input pipeline."""

from segray.data.imageio import BadInput, decode_image, decode_mask, encode_png
from segray.data.info import IGNORE_INDEX, ClassInfo, DatasetInfo, load_classes, load_dataset_info
from segray.data.ingest import IngestError, IngestResult, choose_val, ingest
from segray.data.layouts import Plan, index_folder, list_pairs, pair_by_id
from segray.data.pipeline import read_split
from segray.data.synthetic import synthesize

__all__ = [
    "IGNORE_INDEX",
    "BadInput",
    "ClassInfo",
    "DatasetInfo",
    "IngestError",
    "IngestResult",
    "Plan",
    "choose_val",
    "decode_image",
    "decode_mask",
    "encode_png",
    "index_folder",
    "ingest",
    "list_pairs",
    "load_classes",
    "load_dataset_info",
    "pair_by_id",
    "read_split",
    "synthesize",
]
