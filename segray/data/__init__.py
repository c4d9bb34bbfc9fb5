"""Datasets: raw layouts, ingest, synthetic data, the Ray Data input pipeline."""

from segray.data.imageio import BadInput, TooLarge, WrongChannels, decode_image, decode_mask, encode_png
from segray.data.info import IGNORE_INDEX, ClassInfo, DatasetInfo, default_color, load_classes, load_dataset_info, parse_classes
from segray.data.ingest import IngestError, IngestResult, choose_val, chunk_items, ingest, plan_chunks
from segray.data.instance_ingest import ingest_instances
from segray.data.instance_pipeline import INSTANCE_AUGMENT, DecodeInstances, decode_instances, read_instances
from segray.data.instance_transforms import fit_instances, renumber, sample_instances
from segray.data.instance_layouts import (
    COCO_FILE,
    INSTANCE_LAYOUTS,
    INSTANCES_DIR,
    MAX_OBJECTS,
    ObjectLabels,
    labels_from_coco,
    labels_from_ids,
    labels_from_masks,
    list_instances,
)
from segray.data.layouts import Plan, build_mask, id_problem, index_folder, list_pairs, pair_by_id
from segray.data.pipeline import DecodeBatch, PipelineConfig, image_dtype, read_split, reset_draws, rows_per_batch, split_uri
from segray.data.quarantine import errors_uri, write_errors
from segray.data.rasters import ZARR_SUFFIXES, Raster, is_raster_name, open_raster, raster_id, write_synthetic_raster, zarr_store
from segray.data.shards import read_shards
from segray.data.synthetic import synthesize
from segray.data.synthetic_instances import synthesize_instances
from segray.data.transforms import FitMode, augment, fit, normalize_tf

__all__ = [
    "IGNORE_INDEX",
    "INSTANCE_LAYOUTS",
    "ObjectLabels",
    "ingest_instances",
    "DecodeInstances",
    "decode_instances",
    "read_instances",
    "INSTANCE_AUGMENT",
    "fit_instances",
    "renumber",
    "sample_instances",
    "list_instances",
    "COCO_FILE",
    "INSTANCES_DIR",
    "MAX_OBJECTS",
    "labels_from_coco",
    "labels_from_ids",
    "labels_from_masks",
    "BadInput",
    "ClassInfo",
    "DatasetInfo",
    "DecodeBatch",
    "FitMode",
    "IngestError",
    "IngestResult",
    "PipelineConfig",
    "Plan",
    "TooLarge",
    "Raster",
    "WrongChannels",
    "ZARR_SUFFIXES",
    "augment",
    "build_mask",
    "choose_val",
    "chunk_items",
    "decode_image",
    "decode_mask",
    "default_color",
    "encode_png",
    "errors_uri",
    "fit",
    "id_problem",
    "image_dtype",
    "index_folder",
    "is_raster_name",
    "ingest",
    "list_pairs",
    "load_classes",
    "load_dataset_info",
    "normalize_tf",
    "open_raster",
    "pair_by_id",
    "parse_classes",
    "plan_chunks",
    "raster_id",
    "read_shards",
    "read_split",
    "reset_draws",
    "rows_per_batch",
    "split_uri",
    "synthesize",
    "synthesize_instances",
    "write_errors",
    "write_synthetic_raster",
    "zarr_store",
]
