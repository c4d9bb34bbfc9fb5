"""Datasets: raw layouts, ingest, synthetic data, the Ray Data input pipeline."""

from segray.data.imageio import BadInput, decode_image, decode_mask, encode_png
from segray.data.info import IGNORE_INDEX, ClassInfo, DatasetInfo, load_classes, load_dataset_info
from segray.data.ingest import IngestError, IngestResult, ingest, split_of
from segray.data.pipeline import read_split
from segray.data.synthetic import synthesize

__all__ = [
    "IGNORE_INDEX",
    "BadInput",
    "ClassInfo",
    "DatasetInfo",
    "IngestError",
    "IngestResult",
    "decode_image",
    "decode_mask",
    "encode_png",
    "ingest",
    "load_classes",
    "load_dataset_info",
    "read_split",
    "split_of",
    "synthesize",
]
