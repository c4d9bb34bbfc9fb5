"""The bottom-up instance baseline: a semantic model learns background / interior / boundary, objects come from seeds.

Any semantic model in the registry (the U-Net first) becomes an instance
model with two functions around it:

- ``boundary_target``: instance map -> 3-class target (0 background,
  1 interior, 2 boundary), the mask it is trained on with the semantic
  trainer unchanged;
- ``instances_from_classes``: its 3-class probabilities (or label map) ->
  instance map: connected components of the interior are the seeds (those
  under ``min_size`` pixels dropped), a seeded watershed grows them over
  interior and boundary, and each object scores the mean interior probability
  over its pixels.

The output has the keys and meaning of Mask R-CNN's ``predict_instances``
(``instances``, ``boxes``, ``classes``, ``scores``; ids in descending score
order), so both families feed the same tables and metrics.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


def _diamond(radius: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), radius)


def boundary_target(instances: npt.ArrayLike, width: int = 1) -> np.ndarray:
    """The 3-class target of an instance map (or a batch of them).

    A boundary pixel is an object pixel within ``width`` pixels (4-connected
    steps) of a pixel of another id or of background; the image's edge is not
    a boundary. With ``width >= 1`` the interiors of two objects are never
    8-adjacent, so their components stay apart.

    Args:
        instances: ``(H, W)`` or ``(B, H, W)`` integer ids, 0 background.
        width: boundary width in pixels (>= 1).

    Returns:
        uint8 of the same shape: 0 background, 1 interior, 2 boundary.
    """
    from scipy import ndimage

    ids = np.asarray(instances)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"instance ids must be integers, got dtype {ids.dtype}")
    if width < 1:
        raise ValueError(f"boundary width must be at least 1 pixel, got {width}")
    if ids.ndim == 3:
        return np.stack([boundary_target(image, width) for image in ids])
    if ids.ndim != 2:
        raise ValueError(f"expected an instance map (H, W) or a batch (B, H, W), got shape {ids.shape}")
    footprint = _diamond(width)
    # Any neighbour with another id is either larger (the max differs) or smaller (the min differs).
    larger = ndimage.grey_dilation(ids, footprint=footprint, mode="nearest") != ids
    smaller = ndimage.grey_erosion(ids, footprint=footprint, mode="nearest") != ids
    target = np.zeros(ids.shape, np.uint8)
    objects = ids > 0
    target[objects] = INTERIOR
    target[objects & (larger | smaller)] = BOUNDARY
    return target


def instances_from_classes(
    classes_or_probabilities: npt.ArrayLike,
    min_size: int = 4,
    class_id: int = 1,
    interior_threshold: float | None = None,
) -> dict[str, np.ndarray]:
    """Objects from a 3-class prediction: interior components as seeds, seeded watershed over the foreground.

    Args:
        classes_or_probabilities: ``(H, W, 3)`` probabilities of background,
            interior, boundary (softmax of the logits), or an ``(H, W)``
            integer label map with those three values.
        min_size: interior components with fewer pixels are not seeds (their
            pixels may still join a neighbouring object through the watershed).
        class_id: the class every object gets (a one-class bottom-up model).
        interior_threshold: with probabilities, a seed pixel must also have
            P(interior) at least this; soft predictions blur thin boundaries,
            and a margin keeps touching objects' seeds apart (None: argmax only).

    Returns:
        ``instances`` uint16 ``(H, W)`` (object ``i`` has value ``i + 1``,
        ids in descending score order), ``boxes`` float32 ``(N, 4)``
        ``(y1, x1, y2, x2)`` pixel edges, ``classes`` int32 ``(N,)``,
        ``scores`` float32 ``(N,)``: each object's mean interior probability
        over its pixels (1.0 for every object of a label map, which carries no
        confidence).
    """
    from scipy import ndimage
    from skimage.segmentation import watershed

    values = np.asarray(classes_or_probabilities)
    if values.ndim == 3:
        if values.shape[-1] != 3:
            raise ValueError(f"expected probabilities (H, W, 3) of background, interior, boundary; got shape {values.shape}")
        probabilities = values.astype(np.float32, copy=False)
        labels = np.argmax(probabilities, axis=-1)
        interior_probability = probabilities[..., INTERIOR]
    elif values.ndim == 2:
        if not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"a label map must hold integers 0, 1, 2; got dtype {values.dtype}")
        if values.size and (values.min() < 0 or values.max() > 2):
            raise ValueError(f"a label map holds 0 background, 1 interior, 2 boundary; found {int(values.min())}..{int(values.max())}")
        labels, interior_probability = values, None
    else:
        raise ValueError(f"expected (H, W, 3) probabilities or an (H, W) label map, got shape {values.shape}")

    interior = labels == INTERIOR
    if interior_threshold is not None and interior_probability is not None:
        interior &= interior_probability >= interior_threshold
    seeds, count = ndimage.label(interior, structure=np.ones((3, 3), bool))
    if count:
        sizes = np.bincount(seeds.reshape(-1), minlength=count + 1)
        keep = sizes >= min_size
        keep[0] = False
        renumber = np.zeros(count + 1, np.int64)
        renumber[keep] = np.arange(1, int(keep.sum()) + 1)
        seeds = renumber[seeds]
        count = int(keep.sum())
    # Flood from the seeds over the foreground, the lowest ground first: with
    # probabilities where the interior is least certain last, with labels the
    # pixels nearest a seed first.
    if interior_probability is not None:
        elevation = 1.0 - interior_probability
    else:
        elevation = ndimage.distance_transform_edt(seeds == 0)
    foreground = labels != BACKGROUND
    grown = watershed(elevation, markers=seeds, mask=foreground) if count else np.zeros(labels.shape, np.int64)
    grown = np.asarray(grown, np.int64)

    if interior_probability is None:
        scores = np.ones(count, np.float64)
    else:
        area = np.bincount(grown.reshape(-1), minlength=count + 1)[1:]
        total = np.bincount(grown.reshape(-1), weights=interior_probability.reshape(-1).astype(np.float64), minlength=count + 1)[1:]
        scores = total / np.maximum(area, 1)
    if count > np.iinfo(np.uint16).max:
        raise ValueError(f"{count} objects do not fit a uint16 instance map (at most 65535)")
    order = np.argsort(-scores, kind="stable")
    renumber = np.zeros(count + 1, np.int64)
    renumber[order + 1] = np.arange(1, count + 1)
    instances = renumber[grown].astype(np.uint16)
    boxes = np.zeros((count, 4), np.float32)
    for k, found in enumerate(ndimage.find_objects(instances, max_label=count)):
        if found is not None:
            boxes[k] = (found[0].start, found[1].start, found[0].stop, found[1].stop)
    return {
        "instances": instances,
        "boxes": boxes,
        "classes": np.full(count, class_id, np.int32),
        "scores": scores[order].astype(np.float32),
    }
