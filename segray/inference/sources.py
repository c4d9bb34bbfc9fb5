"""What predict reads: a raw layout or Parquet shards, listed on the driver, read in Ray tasks.

- Raw ``ids`` layout: ``ROOT/images/<id>.<ext>``, with or without
  ``ROOT/masks/<id>.png`` (class ids); pairing by id follows
  ``segray.data.layouts``. When ``masks/`` exists, an image without a mask (or
  a mask without an image) is a rejected input, as in ingest.
- Any raw layout of ingest (``ids``, ``palette``, ``per-class``) when it is
  named: images and truth masks read as ingest reads them, with its
  quarantine rules (``segray.data.layouts``).
- Parquet shards of an ingested split (``DATA/val``), or ``DATA`` with a
  split (``all``: every split): rows ``image_id``, ``image`` and (when
  present) ``mask`` bytes.

Listing reads names only; the pixels are read by ``ReadDecode`` in Ray tasks,
one batch at a time.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from segray import storage
from segray.config import about
from segray.data import IGNORE_INDEX, BadInput, ClassInfo, build_mask, decode_image, id_problem, list_pairs
from segray.inference.geometry import Geometry, fit_image

RAW = "raw"
SHARDS = "shards"


@dataclass(frozen=True)
class Source:
    """A listed input.

    Attributes:
        uri: what the user passed (with the split folder when one was named).
        kind: ``raw`` or ``shards``.
        ids: every image id, sorted.
        has_truth: masks come with the images.
        items: raw: ``{"image_id", "image_uri", "mask_uri"}`` per id, sorted
            (``mask_uri``: the mask files, one a line; per-class layers in priority order).
        shards: the Parquet files (shards only).
        errors: ``(uri, reason)`` of inputs rejected by the listing.
        classes: classes declared beside the data (classes.json or
            dataset.json, or the per-class folders), or None.
        layout: how the raw masks become class ids (``build_mask``'s layout).
        truth_classes: the classes ``build_mask`` reads them with (palette
            colours, per-class folders), or None (ids: the model's ids).
        priority: per-class: the overlap priority the truth is painted with.
    """

    uri: str
    kind: str
    ids: list[str]
    has_truth: bool
    items: list[dict[str, str]]
    shards: list[storage.FileEntry]
    errors: list[tuple[str, str]]
    classes: list[ClassInfo] | None
    fingerprint: str = ""
    layout: str = "ids"
    truth_classes: list[ClassInfo] | None = None
    priority: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", _fingerprint(self))


def _fingerprint(source: "Source") -> str:
    """A hash of what the listing found: every file and its size (shards: every shard and its size).

    Re-ingesting writes new shard names and replacing an image changes its
    size, so a re-run over changed inputs is told apart from a resume.
    """
    digest = hashlib.sha256()
    if source.kind == RAW:
        rows = [f"{i['image_id']}\t{i['image_uri']}\t{i['mask_uri']}\t{i.get('nbytes', 0)}" for i in source.items]
    else:
        rows = [f"{f.uri}\t{f.size}" for f in source.shards]
    for row in sorted(rows):
        digest.update(row.encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def _shard_files(uri: str) -> list[storage.FileEntry]:
    return [f for f in storage.list_files(uri) if f.uri.endswith(".parquet") and not storage.basename(f.uri).startswith((".", "_"))]


ALL_SPLITS = "all"


def list_source(
    src: str,
    split: str | None = None,
    layout: str | None = None,
    classes_file: str | None = None,
    class_order: list[str] | None = None,
    priority: list[str] | None = None,
    images_dir: str = "images",
) -> Source:
    """Lists SRC (names only).

    Args:
        split: of an ingested dataset: a split's name, or ``all``.
        layout: read SRC as a raw folder of this layout (truth masks
            required); None: a raw ``ids`` folder (masks optional), shards or
            an ingested dataset, told apart by what SRC holds.
        classes_file, class_order, priority, images_dir: the layout's options, as ingest's.

    Raises:
        FileNotFoundError: SRC holds neither ``images/`` nor Parquet shards, or
            the split is missing.
        ValueError: ``split`` given for a raw layout, or missing for a dataset.
        ConfigError: the layout's folders or classes do not fit SRC.
    """
    import pyarrow.parquet as pq

    from segray.data import load_dataset_info

    if layout is not None:
        return _raw_source(src, layout, classes_file, class_order, priority, images_dir)
    if storage.exists(storage.join(src, "dataset.json")):
        info = load_dataset_info(src)
        if split is None:
            raise about("input", ValueError(f"input {src} is an ingested dataset; name the split to predict with `split` ({', '.join(info.splits)}, or {ALL_SPLITS})"))
        classes = [c for c in info.classes if c.id != info.ignore_index]
        if split == ALL_SPLITS:
            shards = [f for name in info.splits for f in _shard_files(storage.join(src, name))]
            if not shards:
                raise about("split", FileNotFoundError(f"split {split}: no Parquet shards under any split of {src} ({', '.join(info.splits)})"))
            return _shard_source(src, shards, classes, pq)
        folder = storage.join(src, split)
        shards = _shard_files(folder)
        if not shards:
            raise about("split", FileNotFoundError(f"split {split}: no Parquet shards under {folder} (splits: {', '.join(info.splits)}, or {ALL_SPLITS})"))
        return _shard_source(folder, shards, classes, pq)
    if split is not None:
        folder = storage.join(src, split)
        shards = _shard_files(folder)
        if shards:
            return _shard_source(folder, shards, None, pq)
        raise about("split", FileNotFoundError(f"split {split}: {src} is not an ingested dataset (no dataset.json) and {folder} holds no Parquet shards"))
    if storage.is_dir(storage.join(src, "images")):
        return _raw_source(src)
    shards = _shard_files(src)
    if shards:
        return _shard_source(src, shards, None, pq)
    raise about(
        "input",
        FileNotFoundError(
            f"input {src}: expected a raw layout (images/ with or without masks/; another layout with `layout`), a folder of Parquet shards "
            f"(an ingested split such as DATA/val) or an ingested dataset with `split`; found none of them"
        ),
    )


def _raw_source(
    src: str, layout: str | None = None, classes_file: str | None = None, class_order: list[str] | None = None,
    priority: list[str] | None = None, images_dir: str = "images",
) -> Source:
    if layout in (None, "ids"):
        plan = list_pairs(src, "ids", classes_file, masks_optional=True)
    else:
        if not storage.is_dir(src):
            raise about("input", FileNotFoundError(f"input {src}: no such folder"))
        plan = list_pairs(src, layout, classes_file, None, class_order, priority, images_dir)
    items = [
        {"image_id": p.image_id, "image_uri": p.image_uri, "mask_uri": "\n".join(p.mask_uris), "nbytes": p.nbytes}
        for p in plan.pairs
    ]
    classes = [c for c in plan.classes if c.id != IGNORE_INDEX] if plan.classes else None
    if not items and not plan.errors:
        raise about("input", FileNotFoundError(f"input {src}: {storage.join(src, images_dir if layout == 'per-class' else 'images')} holds no images"))
    truth_classes = plan.classes if plan.layout != "ids" else None
    return Source(
        src, RAW, [i["image_id"] for i in items], plan.has_masks, items, [], list(plan.errors), classes,
        layout=plan.layout, truth_classes=truth_classes, priority=plan.priority,
    )


def _shard_source(folder: str, shards: list[storage.FileEntry], classes: list[ClassInfo] | None, pq) -> Source:
    fs, _ = storage.filesystem(folder)
    ids: list[str] = []
    has_truth = True
    for shard in shards:
        path = storage.filesystem(shard.uri)[1]
        schema = pq.read_schema(path, filesystem=fs)
        for column in ("image_id", "image"):
            if column not in schema.names:
                raise ValueError(f"{shard.uri}: not an image shard (no {column!r} column; columns: {', '.join(schema.names)})")
        has_truth = has_truth and "mask" in schema.names
        ids.extend(pq.read_table(path, filesystem=fs, columns=["image_id"]).column("image_id").to_pylist())
    return Source(folder, SHARDS, sorted(ids), has_truth, [], shards, [], classes)


def dataset_of(source: Source, finished: set[str], batch_size: int):
    """The Ray Dataset of encoded rows: raw, the items not ``finished`` (URIs); shards, every row (bytes)."""
    import ray

    if source.kind == RAW:
        rows = [i for i in source.items if i["image_id"] not in finished]
        # Several batches per read task: fewer, larger tasks for the same streaming.
        per_block = max(batch_size * 4, 16)
        return ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / per_block)))
    from segray.data import read_shards

    columns = ["image_id", "image"] + (["mask"] if source.has_truth else [])
    return read_shards(source.shards, columns, include_path=True)


def model_image(batch: dict[str, Any], i: int) -> np.ndarray:
    """Row ``i``'s image as ``ReadDecode`` left it: uint8, or float32 on the 0..255 scale."""
    image = batch["image"][i]
    return image if image.size or "image_float" not in batch else batch["image_float"][i]


def empty_array(dtype=np.float32, channels: int | None = 3) -> np.ndarray:
    return np.zeros((0, 0) if channels is None else (0, 0, channels), dtype)


def display_uint8(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image as uint8 for overlays (16-bit and float images scaled by their maximum)."""
    if image.dtype == np.uint8:
        return image
    top = float(image.max(initial=0)) or 1.0
    return np.clip(image.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)


class ReadDecode:
    """``map_batches`` body (Ray tasks): encoded rows -> decoded, checked, model-ready rows.

    Output columns: ``image_id``, ``uri`` (what a message names), ``error`` (""
    when fine), ``height`` and ``width`` (the image's own size), ``image``
    (uint8 (H, W, 3), not normalised; in ``fit`` mode at the model's size;
    empty for 16-bit and float files), ``image_float`` (those files, float32
    on the 0..255 scale; else empty), ``truth`` (uint8 (H, W), or empty) and
    ``original`` (uint8 RGB for the overlay ids, else empty).

    The predictor normalises in its graph (``normalize_tf``). Two image
    columns, each of one dtype, because Ray Data casts a column to one dtype
    when it joins blocks: a float image in a uint8 column would silently lose
    its fractions.
    """

    def __init__(
        self, kind: str, geometry: Geometry, num_classes: int, skip: frozenset[str], overlay_ids: frozenset[str],
        max_pixels: int | None = None, layout: str = "ids", truth_classes: list[ClassInfo] | None = None,
    ):
        self.max_pixels = max_pixels
        self.kind = kind
        self.geometry = geometry
        # Truth masks become class ids as ingest makes them: ids checked against the
        # model's classes, palette colours and per-class layers through their classes.
        self.layout = layout
        self.classes = truth_classes if truth_classes is not None else [ClassInfo(k, str(k)) for k in range(num_classes)]
        # Ids already done (Parquet sources on a re-run; a raw listing leaves them out itself).
        self.skip = skip
        self.overlay_ids = overlay_ids

    def _encoded(self, batch: dict[str, np.ndarray], i: int) -> tuple[str, str, str, Any, Any]:
        """(image_id, image uri, mask uri, a reader of the image bytes, a reader of the mask files' ``(uri, bytes)`` or None)."""
        image_id = str(batch["image_id"][i])
        if self.kind == RAW:
            image_uri, mask_uris = str(batch["image_uri"][i]), str(batch["mask_uri"][i])
            uris = mask_uris.split("\n") if mask_uris else []
            read_masks = (lambda: [(u, storage.read_bytes(u)) for u in uris]) if uris else None
            return image_id, image_uri, uris[0] if uris else "", lambda: storage.read_bytes(image_uri), read_masks
        shard = str(batch["path"][i])  # the shard's URI
        where = f"{shard}#{image_id}"
        image_bytes = batch["image"][i]
        mask_bytes = batch["mask"][i] if "mask" in batch else None
        return image_id, where, where, lambda: image_bytes, (lambda: [(where, mask_bytes)]) if mask_bytes is not None else None

    def _row(self, image_id: str, image_uri: str, mask_uri: str, read_image, read_mask) -> dict[str, Any]:
        problem = id_problem(image_id)
        if problem:  # an id from a Parquet dataset; listed folders are checked when they are listed
            return _error_row(image_id, image_uri, f"{image_uri}: {problem}")
        try:
            image = decode_image(read_image(), self.max_pixels)
        except BadInput as e:
            return _error_row(image_id, image_uri, f"{image_uri}: {e}")
        truth = empty_array(np.uint8, None)
        if read_mask is not None:
            try:
                truth = build_mask(self.layout, read_mask(), self.classes, self.max_pixels)
            except BadInput as e:
                return _error_row(image_id, mask_uri, f"mask {mask_uri}: {e}")
            if truth.shape != image.shape[:2]:
                what = mask_uri if mask_uri != image_uri else f"{mask_uri} (mask)"
                return _error_row(
                    image_id, mask_uri,
                    f"mask {what} is {truth.shape[1]}x{truth.shape[0]}, image {image_uri} is {image.shape[1]}x{image.shape[0]}",
                )
        height, width = image.shape[:2]
        original = display_uint8(image) if image_id in self.overlay_ids else empty_array(np.uint8)
        # Fitted in the image's own dtype, as the training pipeline does.
        model_input = image
        if self.geometry.mode == "fit":
            model_input = fit_image(model_input, self.geometry.size, self.geometry.fit)
        is_uint8 = model_input.dtype == np.uint8
        return {
            "image_id": image_id, "uri": image_uri, "error": "", "height": height, "width": width,
            "image": model_input if is_uint8 else empty_array(np.uint8),
            "image_float": empty_array() if is_uint8 else model_input.astype(np.float32, copy=False),
            "truth": truth, "original": original,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = []
        for i in range(len(batch["image_id"])):
            if str(batch["image_id"][i]) in self.skip:
                continue
            image_id, image_uri, mask_uri, read_image, read_mask = self._encoded(batch, i)
            try:
                rows.append(self._row(image_id, image_uri, mask_uri, read_image, read_mask))
            except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the others
                rows.append(_error_row(image_id, image_uri, f"{image_uri}: {type(e).__name__}: {e}"))
        return columns_of(rows, ROW_COLUMNS)


ROW_COLUMNS = ("image_id", "uri", "error", "height", "width", "image", "image_float", "truth", "original")
ARRAY_COLUMNS = frozenset({"image", "image_float", "truth", "original", "pred"})


def _error_row(image_id: str, uri: str, reason: str) -> dict[str, Any]:
    return {
        "image_id": image_id, "uri": uri, "error": reason, "height": 0, "width": 0,
        "image": empty_array(np.uint8), "image_float": empty_array(), "truth": empty_array(np.uint8, None), "original": empty_array(np.uint8),
    }


def columns_of(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """Rows -> a numpy batch; array columns become lists (Ray stores ragged tensors)."""
    out: dict[str, Any] = {}
    for name in names:
        values = [r[name] for r in rows]
        if name in ARRAY_COLUMNS:
            out[name] = values
        elif name in ("height", "width"):
            out[name] = np.asarray(values, np.int64)
        else:
            out[name] = np.asarray(values, dtype=object)
    return out
