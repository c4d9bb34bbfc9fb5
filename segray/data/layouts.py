"""Raw layouts that users bring: listing, pairing by id, and building class-id masks.

- ``ids``: ``ROOT/images/<id>.<ext>`` with ``ROOT/masks/<id>.png`` holding class ids.
- ``palette``: the same folders, RGB masks mapped to ids through classes.json colours.
- ``per-class``: ``ROOT/<images_dir>/<id>.<ext>`` and one folder of binary masks per
  class, ``ROOT/<class>/<id>.png``; overlaps are settled by a priority order.
- ``voc``: PASCAL VOC, ``ROOT/JPEGImages/<id>.jpg`` with colour-mapped
  ``ROOT/SegmentationClass/<id>.png`` (``SegmentationClassPNG/`` in labelme's
  export); images without a mask (VOC's detection-only images) are left out.

``ids`` and ``voc`` masks may be colour-mapped PNGs: their indices are the
class ids. Without classes.json, class names come from ``ROOT/class_names.txt``
(one a line, id 0 first) and colours from the first mask's palette.

Planning runs on the driver and reads only listings; the pixel checks run in
Ray tasks (``build_mask``) so that they scale with the cluster.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from segray import storage
from segray.config import ConfigError
from segray.data.imageio import BadInput, decode_mask, decode_raw, is_image_name, png_palette
from segray.data.info import IGNORE_INDEX, ClassInfo, default_color, load_classes, parse_classes

LAYOUTS = ("ids", "palette", "per-class", "voc")

CLASS_NAMES_FILE = "class_names.txt"
VOC_IMAGES = "JPEGImages"
VOC_MASKS = ("SegmentationClassPNG", "SegmentationClass")  # labelme's export keeps .npy in SegmentationClass/


@dataclass(frozen=True)
class PairSpec:
    """One image and the mask file(s) that belong to it."""

    image_id: str
    image_uri: str
    mask_uris: tuple[str, ...]
    nbytes: int


@dataclass
class Plan:
    """What ingest will read: the pairs, the inputs already rejected, the classes."""

    layout: str
    pairs: Sequence[PairSpec]
    errors: list[tuple[str, str]]
    classes: list[ClassInfo] | None  # None: infer 0..max from the masks
    priority: list[str] | None = None
    has_masks: bool = True
    colors: list[tuple[int, int, int]] | None = None  # the masks' palette: colours of inferred classes
    images_without_mask: int = 0  # ``voc``: images left out, not errors


def _relative_id(uri: str, root: str) -> tuple[str, str]:
    """(id, extension) of a file under ``root``: its relative path without extension."""
    rel = uri[len(root):].lstrip("/").lstrip(os.sep)
    stem, ext = posixpath.splitext(rel.replace(os.sep, "/"))
    return stem, ext.lower()


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot name output files safely, or None.

    Ids become paths under an output folder (``masks/<id>.png``), so an id
    must be a relative path that stays inside it: no '..', no absolute path,
    no URI scheme, no backslash or control character, no empty part.
    """
    if not isinstance(image_id, str) or not image_id:
        return f"image id {image_id!r} is empty"
    if image_id.startswith("/") or re.match(r"^[A-Za-z]:", image_id):
        return f"image id {image_id!r} is an absolute path"
    if storage.has_scheme(image_id):
        return f"image id {image_id!r} holds a URI scheme"
    if "\\" in image_id or any(ord(ch) < 32 for ch in image_id):
        return f"image id {image_id!r} holds a backslash or a control character"
    parts = image_id.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return f"image id {image_id!r} has an empty, '.' or '..' part: it would name a file outside the output folder"
    return None


LOSSY = (".jpg", ".jpeg")


_SIZE_BITS = 44  # a file's size (< 16 TiB) and its (prefix, suffix) number share one int


class FolderIndex(Mapping[str, storage.FileEntry]):
    """id -> file of one listed folder, held compactly.

    A file is its id (the dict's key), a number for its (prefix, suffix)
    strings, which all files of a folder share, and its size, packed in one
    int: about 130 bytes a file, where a dict of ``FileEntry`` objects took
    about 500. URIs are built when asked for.
    """

    def __init__(self) -> None:
        self._packed: dict[str, int] = {}
        self._parts: list[tuple[str, str]] = []
        self._part_number: dict[tuple[str, str], int] = {}

    def add(self, image_id: str, uri: str, size: int) -> None:
        at = uri.rfind(image_id)
        part = (uri[:at], uri[at + len(image_id):])
        number = self._part_number.get(part)
        if number is None:
            number = self._part_number[part] = len(self._parts)
            self._parts.append(part)
        self._packed[image_id] = (number << _SIZE_BITS) | size

    def pop(self, image_id: str) -> storage.FileEntry:
        entry = self[image_id]
        del self._packed[image_id]
        return entry

    def size(self, image_id: str) -> int:
        return self._packed[image_id] & ((1 << _SIZE_BITS) - 1)

    def __getitem__(self, image_id: str) -> storage.FileEntry:
        packed = self._packed[image_id]
        prefix, suffix = self._parts[packed >> _SIZE_BITS]
        return storage.FileEntry(prefix + image_id + suffix, packed & ((1 << _SIZE_BITS) - 1))

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._packed

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


def index_folder(root: str, kind: str, errors: list[tuple[str, str]], lossless: bool = False) -> FolderIndex:
    """Maps id -> file for the image files under ``root``; others become ``(uri, reason)`` errors.

    The id of a file is its path under ``root`` without the extension. Set
    aside, each with its reason: non-image files, ids that could not name an
    output file safely (``id_problem``), every copy of an id that several
    files share (``a.png`` and ``a.jpg``: which one is meant cannot be told),
    and with ``lossless`` (masks) JPEG files. The listing is read as it
    comes, so memory holds the index, never the whole listing as objects.
    """
    index = FolderIndex()
    copies: dict[str, list[storage.FileEntry]] = {}  # only ids that several files share
    for entry in storage.iter_files(root, skipped=errors):
        name = posixpath.basename(entry.uri)
        if name.startswith("."):
            continue
        image_id, ext = _relative_id(entry.uri, root)
        if not is_image_name(name):
            errors.append((entry.uri, f"{entry.uri}: not an image (extension {ext or 'none'!r} in {kind}/)"))
            continue
        if lossless and ext in LOSSY:
            errors.append((entry.uri, f"{entry.uri}: a {kind} file must be lossless (PNG, TIFF or BMP): JPEG compression changes class ids along every edge"))
            continue
        problem = id_problem(image_id)
        if problem:
            errors.append((entry.uri, f"{entry.uri}: {problem}"))
            continue
        if image_id in copies:
            copies[image_id].append(entry)
        elif image_id in index:
            copies[image_id] = [index.pop(image_id), entry]
        else:
            index.add(image_id, entry.uri, entry.size)
    for image_id, entries in sorted(copies.items()):
        entries.sort(key=lambda e: e.uri)
        names = ", ".join(posixpath.basename(e.uri) for e in entries)
        for e in entries:
            errors.append((e.uri, f"{e.uri}: id {image_id!r} is shared by {len(entries)} files in {kind}/ ({names}); every copy is set aside"))
    return index


class PairList(Sequence[PairSpec]):
    """The pairs of an image folder and (optionally) a mask folder, by id, built when read.

    Holds the two indexes and the sorted paired ids, not a ``PairSpec`` per
    pair: a million pairs take tens of megabytes less than a list would.
    """

    def __init__(self, images: FolderIndex, masks: FolderIndex | None, ids: list[str]):
        self._images, self._masks, self._ids = images, masks, ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        image_id = self._ids[i]
        image = self._images[image_id]
        if self._masks is None:
            return PairSpec(image_id, image.uri, (), image.size)
        mask = self._masks[image_id]
        return PairSpec(image_id, image.uri, (mask.uri,), image.size + mask.size)

    def __iter__(self) -> Iterator[PairSpec]:
        return (self[k] for k in range(len(self._ids)))


def pair_folders(images: FolderIndex, masks: FolderIndex | None, errors: list, images_need_masks: bool = True) -> PairList:
    """Pairs each image with the mask of the same id (``masks`` None: images alone); the unpaired become errors.

    Args:
        images_need_masks: False: an image without a mask is left out, not an error.
    """
    if masks is None:
        return PairList(images, None, sorted(images))
    ids = []
    for image_id in sorted(images):
        if image_id in masks:
            ids.append(image_id)
        elif images_need_masks:
            uri = images[image_id].uri
            errors.append((uri, f"{uri}: image has no mask (id {image_id!r})"))
    for image_id in sorted(k for k in masks if k not in images):
        uri = masks[image_id].uri
        errors.append((uri, f"{uri}: mask has no image (id {image_id!r})"))
    return PairList(images, masks, ids)


def pair_by_id(images: Mapping[str, storage.FileEntry], masks: dict[str, list[storage.FileEntry]], errors: list) -> list[PairSpec]:
    """Pairs each image with its mask file(s) by id; an image or mask without its partner becomes an error."""
    pairs = []
    for image_id in sorted(images):
        image = images[image_id]
        mask_files = masks.get(image_id)
        if not mask_files:
            errors.append((image.uri, f"{image.uri}: image has no mask (id {image_id!r})"))
            continue
        nbytes = image.size + sum(m.size for m in mask_files)
        pairs.append(PairSpec(image_id, image.uri, tuple(m.uri for m in mask_files), nbytes))
    for image_id, mask_files in sorted(masks.items()):
        if image_id not in images:
            for m in mask_files:
                errors.append((m.uri, f"{m.uri}: mask has no image (id {image_id!r})"))
    return pairs


def _classes_file(src: str, classes_file: str | None) -> str | None:
    if classes_file:
        return classes_file
    default = storage.join(src, "classes.json")
    return default if storage.exists(default) else None


def _mask_palette(masks: FolderIndex) -> list[tuple[int, int, int]] | None:
    """The palette of the first mask, when masks are colour-mapped PNGs (one small read on the driver)."""
    if not masks:
        return None
    first = masks[min(masks)]
    if not first.uri.lower().endswith(".png"):
        return None
    try:
        return png_palette(storage.read_bytes(first.uri))
    except OSError:  # unreadable here: its task sets it aside with the reason; the classes get default colours
        return None


def _declared_classes(src: str, classes_file: str | None, num_classes: int | None, palette: list | None) -> list[ClassInfo] | None:
    """The classes of an ``ids`` or ``voc`` source: classes.json, else class_names.txt, else ``num_classes``, else None (inferred).

    Colours come from classes.json, else from the masks' palette, else the default table.
    """
    path = _classes_file(src, classes_file)
    if path:
        return load_classes(path)

    def color(k: int) -> tuple[int, int, int]:
        return tuple(palette[k]) if palette and k < len(palette) else tuple(default_color(k))  # type: ignore[return-value]

    names_uri = storage.join(src, CLASS_NAMES_FILE)
    if storage.exists(names_uri):
        names = [line.strip() for line in storage.read_text(names_uri).splitlines() if line.strip()]
        if len(names) > IGNORE_INDEX:
            raise ConfigError(f"{names_uri}: {len(names)} class names; at most {IGNORE_INDEX} (ids 0..254, 255 is ignore)")
        if num_classes and num_classes != len(names):
            raise ConfigError(f"num_classes is {num_classes} but {names_uri} names {len(names)} classes", field="num_classes")
        return parse_classes([{"id": k, "name": name, "color": list(color(k))} for k, name in enumerate(names)], names_uri)
    if num_classes:
        return [ClassInfo(k, "background" if k == 0 else f"class_{k}", color(k)) for k in range(num_classes)]
    return None


def plan_ids(src: str, classes_file: str | None = None, num_classes: int | None = None, masks_optional: bool = False) -> Plan:
    """Plans the ``ids`` layout; with ``masks_optional`` and no ``masks/`` folder, pairs carry no mask."""
    errors: list[tuple[str, str]] = []
    images = index_folder(storage.join(src, "images"), "images", errors)
    if masks_optional and not storage.is_dir(storage.join(src, "masks")):
        classes = _declared_classes(src, classes_file, num_classes, None)
        return Plan("ids", pair_folders(images, None, errors), errors, classes, has_masks=False)
    masks = index_folder(storage.join(src, "masks"), "masks", errors, lossless=True)
    palette = _mask_palette(masks) if not _classes_file(src, classes_file) else None
    classes = _declared_classes(src, classes_file, num_classes, palette)
    return Plan("ids", pair_folders(images, masks, errors), errors, classes, colors=palette)


def plan_voc(src: str, classes_file: str | None = None, num_classes: int | None = None) -> Plan:
    """Plans a PASCAL VOC folder: ``JPEGImages/`` and ``SegmentationClassPNG/`` or ``SegmentationClass/``.

    VOC's JPEGImages also holds the images annotated for detection only, so an
    image without a mask is left out (counted), not an error.
    """
    images_uri = storage.join(src, VOC_IMAGES)
    if not storage.is_dir(images_uri):
        raise ConfigError(f"layout voc: {images_uri} is no folder; expected a PASCAL VOC folder (JPEGImages/, SegmentationClass/)", field="layout")
    masks_dir = next((d for d in VOC_MASKS if storage.is_dir(storage.join(src, d))), None)
    if masks_dir is None:
        raise ConfigError(f"layout voc: {src} holds neither {VOC_MASKS[0]}/ nor {VOC_MASKS[1]}/ (the class masks)", field="layout")
    errors: list[tuple[str, str]] = []
    images = index_folder(images_uri, VOC_IMAGES, errors)
    masks = index_folder(storage.join(src, masks_dir), masks_dir, errors, lossless=True)
    palette = _mask_palette(masks) if not _classes_file(src, classes_file) else None
    classes = _declared_classes(src, classes_file, num_classes, palette)
    pairs = pair_folders(images, masks, errors, images_need_masks=False)
    return Plan("voc", pairs, errors, classes, colors=palette, images_without_mask=sum(1 for i in images if i not in masks))


def plan_palette(src: str, classes_file: str | None = None) -> Plan:
    path = _classes_file(src, classes_file)
    if not path:
        raise ConfigError(f"the palette layout needs classes.json with colours: none at {storage.join(src, 'classes.json')}")
    classes = load_classes(path)
    colors = [c.color for c in classes]
    if len(set(colors)) != len(colors):
        raise ConfigError(f"{path}: two classes share a colour; the palette cannot be read back")
    errors: list[tuple[str, str]] = []
    images = index_folder(storage.join(src, "images"), "images", errors)
    masks = index_folder(storage.join(src, "masks"), "masks", errors, lossless=True)
    return Plan("palette", pair_folders(images, masks, errors), errors, classes)


def plan_per_class(
    src: str,
    class_order: list[str] | None = None,
    priority: list[str] | None = None,
    images_dir: str = "images",
) -> Plan:
    """Plans a per-class layout.

    Args:
        class_order: class folder names; they get ids 1..K in this order
            (0 is background). Default: every folder beside ``images_dir``, sorted.
        priority: where layers overlap, the class listed first wins. Default:
            ``class_order``.
    """
    folders = [d for d in storage.list_dirs(src) if d != images_dir and not d.startswith(".")]
    if not storage.is_dir(storage.join(src, images_dir)):
        raise ConfigError(f"images_dir {images_dir!r}: {storage.join(src, images_dir)} is no folder (set `images_dir` to the folder that holds the images)", field="images_dir")
    order = list(class_order) if class_order else folders
    missing = [c for c in order if c not in folders]
    if missing or not order:
        raise ConfigError(f"class_order: class folder(s) {missing or '(none)'} not found in {src}; folders there: {folders}", field="class_order")
    priority = list(priority) if priority else order
    if sorted(priority) != sorted(order):
        raise ConfigError(f"priority must name each class once: got {priority}, classes are {order}", field="priority")
    classes = [ClassInfo(0, "background", tuple(default_color(0)))]
    classes += [ClassInfo(i + 1, name, tuple(default_color(i + 1))) for i, name in enumerate(order)]
    errors: list[tuple[str, str]] = []
    images = index_folder(storage.join(src, images_dir), images_dir, errors)
    layers: dict[str, list[storage.FileEntry]] = {}
    for name in priority:
        for image_id, entry in index_folder(storage.join(src, name), name, errors, lossless=True).items():
            layers.setdefault(image_id, []).append(entry)
    # A pair's mask files are in priority order. A missing layer means the class is
    # absent from that image; each file's class is read from its folder.
    return Plan("per-class", pair_by_id(images, layers, errors), errors, classes, priority=priority)


def list_pairs(
    src: str,
    layout: str = "ids",
    classes_file: str | None = None,
    num_classes: int | None = None,
    class_order: list[str] | None = None,
    priority: list[str] | None = None,
    images_dir: str = "images",
    masks_optional: bool = False,
) -> Plan:
    """Lists ``src`` and pairs its images with their masks, for any layout (listings only, no pixels).

    Args:
        layout: ``ids``, ``palette``, ``per-class`` or ``voc``.
        masks_optional: ``ids`` only: a source without ``masks/`` gives pairs
            without masks (images to segment) instead of errors.

    Raises:
        ConfigError: unknown layout, or a classes file or folder the layout needs is missing.
    """
    if layout == "ids":
        return plan_ids(src, classes_file, num_classes, masks_optional)
    if layout == "palette":
        return plan_palette(src, classes_file)
    if layout == "per-class":
        return plan_per_class(src, class_order, priority, images_dir)
    if layout == "voc":
        return plan_voc(src, classes_file, num_classes)
    raise ConfigError(f"layout {layout!r} is unknown; expected one of {', '.join(LAYOUTS)}", field="layout")


def layer_class(mask_uri: str, src_classes: list[ClassInfo]) -> int:
    """Class id of a per-class layer file, from its folder name."""
    folder = posixpath.basename(posixpath.dirname(mask_uri.replace(os.sep, "/")))
    for c in src_classes:
        if c.name == folder:
            return c.id
    raise BadInput(f"{mask_uri}: folder {folder!r} is not a class")


def build_mask(
    layout: str,
    mask_blobs: list[tuple[str, bytes]],
    classes: list[ClassInfo] | None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Turns the mask file(s) of one pair into an (H, W) uint8 class-id mask.

    Raises:
        BadInput: undecodable mask, unknown colour, layers of different sizes,
            or class ids outside the declared classes.
    """
    if layout in ("ids", "voc"):
        mask = decode_mask(mask_blobs[0][1], max_pixels)
        if classes is not None:
            num = sum(1 for c in classes if c.id != IGNORE_INDEX)
            bad = (mask >= num) & (mask != IGNORE_INDEX)
            if bad.any():
                values = sorted(int(v) for v in np.unique(mask[bad]))
                raise BadInput(f"mask values {values} outside the declared classes 0..{num - 1} (and 255) in {int(bad.sum())} pixels")
        return mask
    if layout == "palette":
        raw = decode_raw(mask_blobs[0][1], max_pixels)
        if raw.ndim != 3 or raw.shape[2] < 3:
            raise BadInput(f"palette mask has {1 if raw.ndim == 2 else raw.shape[2]} channel(s); expected RGB")
        rgb = raw[..., 2::-1][..., :3].astype(np.int32)  # BGR(A) -> RGB
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        lookup = {(c.color[0] << 16) | (c.color[1] << 8) | c.color[2]: c.id for c in classes or []}
        values, inverse = np.unique(packed, return_inverse=True)
        unknown = [v for v in values if int(v) not in lookup]
        if unknown:
            shown = [((int(v) >> 16) & 255, (int(v) >> 8) & 255, int(v) & 255) for v in unknown[:5]]
            count = int(np.isin(packed, unknown).sum())
            raise BadInput(f"palette colour(s) {shown} not in classes.json ({count} pixels)")
        ids = np.array([lookup[int(v)] for v in values], np.uint8)
        return ids[inverse.reshape(packed.shape)]
    if layout == "per-class":
        assert classes is not None
        return paint_layers(mask_blobs, classes, max_pixels).mask
    raise ConfigError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


@dataclass
class PaintedLayers:
    """A per-class pair's class-id mask, and what the overlap priority did to its layers.

    Attributes:
        mask: (H, W) uint8 class ids.
        layer_pixels: class id -> pixels set in its layer.
        covered: (class id, class id on top) -> pixels of the first's layer
            that the second (listed before it in the priority) took.
    """

    mask: np.ndarray
    layer_pixels: dict[int, int]
    covered: dict[tuple[int, int], int]


def paint_layers(mask_blobs: list[tuple[str, bytes]], classes: list[ClassInfo], max_pixels: int | None = None) -> PaintedLayers:
    """Paints per-class layers (in priority order, first wins) into one class-id mask.

    Raises:
        BadInput: an undecodable layer, layers of different sizes, a folder that is no class.
    """
    mask = None
    shape = None
    layers: list[tuple[int, np.ndarray]] = []
    # Paint lowest priority first so that the first-priority class ends on top.
    for uri, data in reversed(mask_blobs):
        raw = decode_raw(data, max_pixels)
        # Binary layers: any colour channel above 127 is set (alpha is ignored:
        # it is 255 everywhere in RGBA layers).
        layer = raw if raw.ndim == 2 else raw[..., :3].max(axis=2)
        if shape is None:
            shape = layer.shape
            mask = np.zeros(shape, np.uint8)
        elif layer.shape != shape:
            raise BadInput(f"layer {uri} is {layer.shape[1]}x{layer.shape[0]}, other layers are {shape[1]}x{shape[0]}")
        on = layer > 127
        class_id = layer_class(uri, classes)
        mask[on] = class_id
        layers.append((class_id, on))
    layer_pixels, covered = {}, {}
    for class_id, on in layers:
        layer_pixels[class_id] = layer_pixels.get(class_id, 0) + int(on.sum())
        on_top = mask[on]
        for winner, count in enumerate(np.bincount(on_top[on_top != class_id], minlength=0)):
            if count:
                covered[(class_id, winner)] = covered.get((class_id, winner), 0) + int(count)
    return PaintedLayers(mask, layer_pixels, covered)
