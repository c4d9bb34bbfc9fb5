"""Raw instance-segmentation layouts: listing, pairing, and building one image's instance-id map.

- ``coco``: ``SRC/annotations.json`` (COCO instances: polygons or RLE, with
  categories); each image at its ``file_name`` relative to ``SRC``. Decoded
  with pycocotools.
- ``instance-ids``: ``SRC/images/<id>.<ext>`` with ``SRC/instances/<id>.png|tif``
  (an 8- or 16-bit label image: 0 background, every other value one object),
  optional ``SRC/classes.json`` and ``SRC/instance_classes/<id>.json``
  (``{"<object value>": <class id>}``); without them every object is class 1.
- ``per-instance``: ``SRC/<id>/images/<id>.png`` with ``SRC/<id>/masks/*.png``,
  one binary mask per object (the 2018 Data Science Bowl layout).

Every layout gives the same thing per image (``ObjectLabels``): a uint16
instance map with objects numbered 1..K and the class of each object.

What is set aside, and why (each one a row of ``_errors.parquet``):

- an object without a pixel in the image (empty, or lying wholly outside it):
  the object is dropped, the image kept (no pixel is mislabelled by that);
- an object of a category the source does not declare, or of the background
  category: the whole image (its pixels would otherwise train as background);
- ``per-instance`` masks that overlap: the whole image (the layout's rule, the
  Data Science Bowl's too, is one object per pixel);
- more objects than ``max_instances``: the whole image.

COCO allows overlapping objects, an instance map does not: where objects
overlap the smaller one is kept on top (a large polygon often encloses a
smaller object in front of it). The pixels so taken are counted per image
and in ``dataset.json`` (``objects.overlap_pixels``); an object left without
a pixel is dropped with its reason. Crowd annotations (``iscrowd`` 1) mark
groups, not objects: they are left out and counted (``objects.crowd_skipped``).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segray import storage
from segray.config import ConfigError
from segray.data.imageio import BadInput, decode_raw, is_image_name
from segray.data.info import IGNORE_INDEX, ClassInfo, default_color, load_classes
from segray.data.layouts import LOSSY, PairSpec, id_problem, index_folder, pair_folders

INSTANCE_LAYOUTS = ("coco", "instance-ids", "per-instance")
COCO_FILE = "annotations.json"
INSTANCES_DIR = "instances"
INSTANCE_CLASSES_DIR = "instance_classes"
# Category names COCO exporters (labelme's among them) give the background.
BACKGROUND_NAMES = ("_background_", "__background__", "background")
# Instance maps are 16-bit PNGs: at most this many objects per image.
MAX_OBJECTS = 65535


def default_instance_classes(name: str = "object") -> list[ClassInfo]:
    return [ClassInfo(0, "background", tuple(default_color(0))), ClassInfo(1, name, tuple(default_color(1)))]


@dataclass
class InstancePlan:
    """What instance ingest will read: the pairs, the inputs already rejected, the classes.

    ``pairs[i].mask_uris``: ``instance-ids``: the label image (and the
    object-class file when there is one); ``per-instance``: the masks;
    ``coco``: the annotation file. ``annotations``: ``coco`` only, image id
    -> ``{"height", "width", "objects": [annotation, ...]}`` with each
    annotation's class id in ``class``.
    """

    layout: str
    pairs: list[PairSpec]
    errors: list[tuple[str, str]]
    classes: list[ClassInfo]
    annotations: dict[str, dict[str, Any]] | None = None
    category_ids: dict[str, int] | None = None  # coco: class name -> its category id in the source


@dataclass
class ObjectLabels:
    """One image's objects.

    Attributes:
        ids: (H, W) uint16, 0 background, objects 1..K.
        classes: (K,) int32, the class id (>= 1) of object k at ``classes[k - 1]``.
        dropped: ``(uri, reason)`` of objects left out (the image is kept).
        overlap_pixels: pixels two or more objects claimed (``coco``).
        crowd: crowd annotations left out (``coco``).
    """

    ids: np.ndarray
    classes: np.ndarray
    dropped: list[tuple[str, str]] = field(default_factory=list)
    overlap_pixels: int = 0
    crowd: int = 0

    @property
    def count(self) -> int:
        return int(len(self.classes))

    def class_map(self) -> np.ndarray:
        """(H, W) uint8 class ids (the semantic mask of the same pixels)."""
        lookup = np.concatenate([[0], self.classes]).astype(np.uint8)
        return lookup[self.ids]


def _classes_json(src: str, classes_file: str | None) -> list[ClassInfo] | None:
    path = classes_file or storage.join(src, "classes.json")
    if classes_file or storage.exists(path):
        classes = load_classes(path)
        if sum(1 for c in classes if c.id != IGNORE_INDEX) < 2:
            raise ConfigError(f"{path}: an instance dataset needs background (id 0) and at least one object class")
        return classes
    return None


def plan_instance_ids(src: str, classes_file: str | None = None) -> InstancePlan:
    """Plans ``SRC/images`` + ``SRC/instances`` (+ ``SRC/instance_classes/<id>.json``)."""
    if not storage.is_dir(storage.join(src, INSTANCES_DIR)):
        raise ConfigError(f"layout instance-ids: {storage.join(src, INSTANCES_DIR)} is no folder; expected images/ and instances/ (label images)", field="layout")
    errors: list[tuple[str, str]] = []
    images = index_folder(storage.join(src, "images"), "images", errors)
    labels = index_folder(storage.join(src, INSTANCES_DIR), INSTANCES_DIR, errors, lossless=True)
    root = storage.join(src, INSTANCE_CLASSES_DIR)
    class_files: dict[str, str] = {}
    for entry in storage.iter_files(root):
        rel = entry.uri[len(root):].lstrip("/").replace("\\", "/")
        if rel.endswith(".json"):
            class_files[rel[: -len(".json")]] = entry.uri
    paired = pair_folders(images, labels, errors)
    pairs = []
    for p in paired:
        extra = class_files.get(p.image_id)
        pairs.append(PairSpec(p.image_id, p.image_uri, p.mask_uris + ((extra,) if extra else ()), p.nbytes))
    classes = _classes_json(src, classes_file) or default_instance_classes()
    return InstancePlan("instance-ids", pairs, errors, classes)


def plan_per_instance(src: str, classes_file: str | None = None) -> InstancePlan:
    """Plans ``SRC/<id>/images/<id>.png`` + ``SRC/<id>/masks/*.png``; every object is class 1."""
    errors: list[tuple[str, str]] = []
    images: dict[str, list[storage.FileEntry]] = {}
    masks: dict[str, list[storage.FileEntry]] = {}
    root = src.rstrip("/")
    for entry in storage.iter_files(src, skipped=errors):
        rel = entry.uri[len(root):].lstrip("/").replace("\\", "/")
        parts = rel.split("/")
        name = parts[-1]
        if name.startswith(".") or rel in ("classes.json",):
            continue
        if len(parts) != 3 or parts[1] not in ("images", "masks"):
            errors.append((entry.uri, f"{entry.uri}: not in the per-instance layout (expected <id>/images/<id>.png or <id>/masks/<name>.png)"))
            continue
        if not is_image_name(name):
            errors.append((entry.uri, f"{entry.uri}: not an image (in {parts[0]}/{parts[1]}/)"))
            continue
        if parts[1] == "masks" and posixpath.splitext(name)[1].lower() in LOSSY:
            errors.append((entry.uri, f"{entry.uri}: a mask must be lossless (PNG, TIFF or BMP): JPEG compression changes the mask along every edge"))
            continue
        (images if parts[1] == "images" else masks).setdefault(parts[0], []).append(entry)
    pairs = []
    for image_id in sorted(set(images) | set(masks)):
        found, object_masks = images.get(image_id, []), sorted(masks.get(image_id, []), key=lambda e: e.uri)
        problem = id_problem(image_id)
        first = (found or object_masks)[0].uri
        if problem:
            errors.append((first, f"{first}: {problem}"))
        elif len(found) != 1:
            what = "no image" if not found else f"{len(found)} images ({', '.join(storage.basename(e.uri) for e in found)})"
            errors.append((first, f"{storage.join(src, image_id)}: {what} in images/; expected exactly one"))
        elif not object_masks:
            errors.append((found[0].uri, f"{found[0].uri}: no masks in {storage.join(src, image_id, 'masks')}/ (one binary mask per object)"))
        else:
            pairs.append(PairSpec(image_id, found[0].uri, tuple(e.uri for e in object_masks), found[0].size + sum(e.size for e in object_masks)))
    classes = _classes_json(src, classes_file) or default_instance_classes()
    if sum(1 for c in classes if c.id not in (0, IGNORE_INDEX)) != 1:
        raise ConfigError(f"layout per-instance: its masks carry no class, so classes.json must declare one object class; got {[c.name for c in classes]}", field="layout")
    return InstancePlan("per-instance", pairs, errors, classes)


def _is_background(name: str) -> bool:
    return str(name).strip().lower() in BACKGROUND_NAMES


def plan_coco(src: str) -> InstancePlan:
    """Plans a COCO instances file ``SRC/annotations.json``: its categories are the classes (in category id order)."""
    uri = storage.join(src, COCO_FILE)
    if not storage.exists(uri):
        raise ConfigError(f"layout coco: {uri} is missing (COCO instances: images, annotations, categories)", field="layout")
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{uri}: not valid JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise ConfigError(f"{uri}: expected a list under {key!r} (a COCO instances file)")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    classes = [ClassInfo(0, "background", tuple(default_color(0)))]
    to_class: dict[int, int] = {}
    background_ids = set()
    for c in categories:
        if _is_background(c.get("name", "")):
            background_ids.add(c["id"])
            continue
        k = len(classes)
        classes.append(ClassInfo(k, str(c["name"]), tuple(default_color(k))))
        to_class[c["id"]] = k
    if len(classes) < 2:
        raise ConfigError(f"{uri}: no object category (categories: {[c.get('name') for c in categories]})")
    if len(classes) > IGNORE_INDEX:
        raise ConfigError(f"{uri}: {len(classes) - 1} categories; at most {IGNORE_INDEX - 1}")
    errors: list[tuple[str, str]] = []
    sizes = {}
    root = src.rstrip("/")
    for entry in storage.iter_files(src, skipped=errors):
        sizes[entry.uri[len(root):].lstrip("/").replace("\\", "/")] = entry
    by_number: dict[Any, str] = {}
    annotations: dict[str, dict[str, Any]] = {}
    pairs = []
    seen: dict[str, str] = {}
    for image in data["images"]:
        name = str(image.get("file_name", "")).replace("\\", "/")
        image_id = posixpath.splitext(name)[0]
        where = f"{uri}#image={image.get('id')}"
        problem = id_problem(image_id)
        entry = sizes.get(name)
        if problem:
            errors.append((where, f"{where}: file_name {name!r}: {problem}"))
        elif entry is None:
            errors.append((storage.join(src, name), f"{storage.join(src, name)}: image of {where} not found"))
        elif image_id in seen:
            errors.append((entry.uri, f"{entry.uri}: id {image_id!r} is named by two images of {uri} ({seen[image_id]} and {image.get('id')}); the second is set aside"))
        else:
            seen[image_id] = str(image.get("id"))
            by_number[image.get("id")] = image_id
            annotations[image_id] = {"height": int(image.get("height", 0)), "width": int(image.get("width", 0)), "objects": []}
            pairs.append(PairSpec(image_id, entry.uri, (uri,), entry.size))
    refused: dict[str, str] = {}
    for ann in data["annotations"]:
        where = f"{uri}#annotation={ann.get('id')}"
        image_id = by_number.get(ann.get("image_id"))
        if image_id is None:
            errors.append((where, f"{where}: image_id {ann.get('image_id')!r} is not an image of {uri} (or that image was set aside)"))
            continue
        category = ann.get("category_id")
        if category in background_ids:
            refused.setdefault(image_id, f"{where}: an object of the background category {category!r}")
        elif category not in to_class:
            refused.setdefault(image_id, f"{where}: category_id {category!r} is not among the categories of {uri}")
        annotations[image_id]["objects"].append({"id": ann.get("id"), "class": to_class.get(category, 0), "segmentation": ann.get("segmentation"),
                                                 "iscrowd": int(ann.get("iscrowd", 0) or 0)})
    kept = []
    for p in pairs:
        if p.image_id in refused:
            errors.append((p.image_uri, f"{p.image_uri}: {refused[p.image_id]}; the image is set aside (its pixels would train as background)"))
            annotations.pop(p.image_id)
        else:
            kept.append(p)
    category_ids = {classes[k].name: cid for cid, k in to_class.items()}
    return InstancePlan("coco", kept, errors, classes, annotations, category_ids)


def list_instances(src: str, layout: str, classes_file: str | None = None) -> InstancePlan:
    """Lists ``src`` in an instance layout (listings and the COCO file only, no pixels)."""
    if layout == "coco":
        return plan_coco(src)
    if layout == "instance-ids":
        return plan_instance_ids(src, classes_file)
    if layout == "per-instance":
        return plan_per_instance(src, classes_file)
    raise ConfigError(f"layout {layout!r} is no instance layout; expected one of {', '.join(INSTANCE_LAYOUTS)}", field="layout")


# --- one image's objects (in the Ray tasks) --------------------------------------------


def _renumber(ids: np.ndarray, classes_of: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Objects renumbered 1..K in order of their value; ``classes_of``: value -> class id."""
    values = np.unique(ids)
    values = values[values != 0]
    lookup = np.zeros(int(values.max()) + 1 if values.size else 1, np.uint16)
    lookup[values] = np.arange(1, values.size + 1, dtype=np.uint16)
    return lookup[ids], np.asarray([classes_of[int(v)] for v in values], np.int32)


def _check_count(count: int, max_instances: int) -> None:
    if count > max_instances:
        raise BadInput(f"{count} objects, more than max_instances {max_instances} (raise --max-instances to keep such images)")


def labels_from_ids(blobs: list[tuple[str, bytes]], classes: list[ClassInfo], max_pixels: int | None, max_instances: int) -> ObjectLabels:
    """``instance-ids``: the label image (and its object-class file, when given) -> objects."""
    uri, data = blobs[0]
    raw = decode_raw(data, max_pixels)
    if raw.ndim == 3:
        if not all(np.array_equal(raw[..., 0], raw[..., c]) for c in range(1, min(3, raw.shape[2]))):
            raise BadInput(f"label image {uri} has {raw.shape[2]} differing channels; expected one channel of object ids")
        raw = raw[..., 0]
    if not np.issubdtype(raw.dtype, np.integer) or raw.min(initial=0) < 0:
        raise BadInput(f"label image {uri} holds {raw.dtype} values; expected 8- or 16-bit object ids (0 background)")
    values = [int(v) for v in np.unique(raw) if v != 0]
    _check_count(len(values), max_instances)
    foreground = [c.id for c in classes if c.id not in (0, IGNORE_INDEX)]
    declared: dict[int, int] = {}
    if len(blobs) > 1:
        class_uri, text = blobs[1]
        try:
            entries = json.loads(text.decode("utf-8"))
            declared = {int(k): v for k, v in entries.items()}
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise BadInput(f"{class_uri}: expected a JSON object of object id -> class id ({type(e).__name__}: {e})") from None
        bad = {k: v for k, v in declared.items() if k in values and (not isinstance(v, int) or isinstance(v, bool) or v not in foreground)}
        if bad:
            shown = ", ".join(f"object {k}: {v!r}" for k, v in sorted(bad.items())[:5])
            raise BadInput(f"{class_uri}: unknown class id(s) ({shown}); the object classes are {foreground}")
    classes_of = {}
    for v in values:
        if v in declared:
            classes_of[v] = declared[v]
        elif len(foreground) == 1:
            classes_of[v] = foreground[0]
        else:
            where = blobs[1][0] if len(blobs) > 1 else f"{INSTANCE_CLASSES_DIR}/ (no file for this image)"
            raise BadInput(f"object {v} of {uri} has no class in {where}, and the classes declare {len(foreground)} object classes")
    ids, object_classes = _renumber(raw, classes_of)
    return ObjectLabels(ids, object_classes)


def _binary(uri: str, data: bytes, max_pixels: int | None) -> np.ndarray:
    raw = decode_raw(data, max_pixels)
    return (raw if raw.ndim == 2 else raw[..., :3].max(axis=2)) > (127 if raw.dtype == np.uint8 else np.iinfo(raw.dtype).max // 2 if np.issubdtype(raw.dtype, np.integer) else 0.5)


def labels_from_masks(blobs: list[tuple[str, bytes]], max_pixels: int | None, max_instances: int, class_id: int = 1) -> ObjectLabels:
    """``per-instance``: one binary mask per object (any channel above half is set) -> objects, in file name order.

    Raises:
        BadInput: masks of different sizes, or overlapping masks (the layout allows one object per pixel).
    """
    ids = None
    dropped = []
    kept: list[str] = []
    count = 0
    for uri, data in blobs:
        on = _binary(uri, data, max_pixels)
        if ids is None:
            ids = np.zeros(on.shape, np.uint16)
        elif on.shape != ids.shape:
            raise BadInput(f"mask {uri} is {on.shape[1]}x{on.shape[0]}, other masks are {ids.shape[1]}x{ids.shape[0]}")
        if not on.any():
            dropped.append((uri, f"{uri}: empty mask (no pixel set): the object is left out"))
            continue
        clash = on & (ids > 0)
        if clash.any():
            other = kept[int(np.bincount(ids[clash]).argmax()) - 1]
            raise BadInput(f"mask {uri} overlaps an earlier mask in {int(clash.sum())} pixels ({storage.basename(other)} the most); "
                           "the per-instance layout allows one object per pixel")
        kept.append(uri)
        count += 1
        _check_count(count, max_instances)
        ids[on] = count
    assert ids is not None
    return ObjectLabels(ids, np.full(count, class_id, np.int32), dropped)


def labels_from_coco(image: dict[str, Any], height: int, width: int, source: str, max_instances: int) -> ObjectLabels:
    """``coco``: an image's annotations (polygons or RLE) -> objects; smaller objects stay on top where they overlap.

    Raises:
        BadInput: the image's size differs from the annotation file's, or an undecodable segmentation.
    """
    from pycocotools import mask as coco_mask

    if (image["height"], image["width"]) != (height, width) and image["height"] and image["width"]:
        raise BadInput(f"{source} gives this image as {image['width']}x{image['height']}, the file is {width}x{height}")
    objects, dropped, crowd = [], [], 0
    for ann in image["objects"]:
        where = f"{source}#annotation={ann['id']}"
        if ann["iscrowd"]:
            crowd += 1
            continue
        seg = ann["segmentation"]
        try:
            if isinstance(seg, list):
                polygons = [p for p in seg if len(p) >= 6]
                if not polygons:
                    dropped.append((where, f"{where}: no polygon of 3 or more points: the object is left out"))
                    continue
                rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
            elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
                rle = coco_mask.frPyObjects(seg, height, width)
            elif isinstance(seg, dict):
                rle = {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
                if list(rle["size"]) != [height, width]:
                    raise BadInput(f"{where}: RLE of size {rle['size']}, the image is {height}x{width}")
            else:
                raise BadInput(f"{where}: segmentation is a {type(seg).__name__}; expected polygons or RLE")
            on = coco_mask.decode(rle).astype(bool)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - pycocotools raises several kinds for a malformed segmentation
            raise BadInput(f"{where}: undecodable segmentation ({type(e).__name__}: {e})") from None
        if not on.any():
            outside = isinstance(seg, list) and all(
                max(p[0::2]) < 0 or min(p[0::2]) >= width or max(p[1::2]) < 0 or min(p[1::2]) >= height for p in seg if len(p) >= 2)
            why = f"lies outside the {width}x{height} image" if outside else "covers no pixel"
            dropped.append((where, f"{where}: the object {why}: it is left out"))
            continue
        objects.append((int(on.sum()), ann, on))
    _check_count(len(objects), max_instances)
    ids = np.zeros((height, width), np.uint16)
    claimed = np.zeros((height, width), np.uint16)
    # Largest first, so that a smaller object painted later stays on top.
    order = sorted(range(len(objects)), key=lambda i: -objects[i][0])
    for value, i in enumerate(order, start=1):
        on = objects[i][2]
        claimed += on
        ids[on] = value
    classes_of = {v: objects[i][1]["class"] for v, i in enumerate(order, start=1)}
    overlap = int((claimed > 1).sum())
    present = set(int(v) for v in np.unique(ids)) - {0}
    for value, i in enumerate(order, start=1):
        if value not in present:
            where = f"{source}#annotation={objects[i][1]['id']}"
            dropped.append((where, f"{where}: every pixel of the object lies under smaller objects: it is left out"))
    ids, object_classes = _renumber(ids, classes_of)
    return ObjectLabels(ids, object_classes, dropped, overlap, crowd)
