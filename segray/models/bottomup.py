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


# ---------------------------------------------------------------------------
# The trainable model: ``unet-instance`` in the registry.

BOUNDARY_OUTPUT, CLASS_OUTPUT = "boundary", "classes"


def build_unet_instance(
    num_classes: int,
    input_shape=(None, None, 3),
    *,
    depth: int = 4,
    width: int = 32,
    residual: bool = False,
    attention: bool = False,
    dropout: float = 0.5,
):
    """The U-Net with two heads on its last decoder features: background / interior / boundary, and the pixel's class.

    Args:
        num_classes: the dataset's classes with background (2 for one kind of object).
        input_shape, depth, width, residual, attention, dropout: as ``build_unet``.

    Returns:
        A ``keras.Model`` named ``unet_instance`` mapping ``(B, H, W, 3)``
        images to ``{"boundary": (B, H, W, 3), "classes": (B, H, W,
        num_classes)}`` float32 logits. ``instances_from_outputs`` turns the
        softmax of both into objects: the first gives them (seeded watershed),
        the second their class (the largest mean foreground-class probability
        over the object's pixels).
    """
    import keras

    from segray.models.unet import build_unet

    unet = build_unet(num_classes, input_shape, depth=depth, width=width, residual=residual, attention=attention, dropout=dropout)
    features = unet.get_layer("classifier").input
    x = keras.layers.Conv2D(3, 1, padding="same", name="boundary_classifier")(features)
    boundary = keras.layers.Activation("linear", dtype="float32", name="boundary_logits")(x)
    return keras.Model(unet.input, {BOUNDARY_OUTPUT: boundary, CLASS_OUTPUT: unet.output}, name="unet_instance")


def is_bottom_up(outputs) -> bool:
    """Whether a model's outputs are those of ``build_unet_instance`` (a dict with the boundary and class logits)."""
    return isinstance(outputs, dict) and set(outputs) == {BOUNDARY_OUTPUT, CLASS_OUTPUT}


def instances_from_outputs(boundary_probabilities: np.ndarray, class_probabilities: np.ndarray, min_size: int = 4) -> dict[str, np.ndarray]:
    """One image's objects from the softmax of both heads: ``instances_from_classes``, each object's class from the class head.

    Args:
        boundary_probabilities: ``(H, W, 3)`` background / interior / boundary.
        class_probabilities: ``(H, W, C)`` the class head's softmax (class 0 background).
        min_size: the smallest seed, in pixels.

    Returns:
        As ``instances_from_classes``; ``classes`` is, per object, the
        foreground class (1..C-1) with the largest summed probability over its pixels.
    """
    found = instances_from_classes(boundary_probabilities, min_size=min_size)
    count, channels = len(found["scores"]), class_probabilities.shape[-1]
    if count and channels > 2:
        ids = found["instances"].reshape(-1).astype(np.int64)
        flat = class_probabilities.reshape(-1, channels)[:, 1:].astype(np.float64)
        sums = np.stack([np.bincount(ids, weights=flat[:, k], minlength=count + 1)[1:] for k in range(channels - 1)], axis=1)
        found["classes"] = (np.argmax(sums, axis=1) + 1).astype(np.int32)
    return found


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(outputs) -> tuple[np.ndarray, np.ndarray]:
    """(boundary, class) softmax probabilities ``(B, H, W, 3)``, ``(B, H, W, C)`` of a bottom-up model's outputs."""
    return (_softmax(np.asarray(outputs[BOUNDARY_OUTPUT], np.float32)),
            _softmax(np.asarray(outputs[CLASS_OUTPUT], np.float32)))


def tf_boundary_target(instances, width: int = 1):
    """``boundary_target`` in TensorFlow, on a batch ``(B, H, W)``: the same values (the image's edge is no boundary).

    A diamond of radius ``width`` is ``width`` 4-neighbour steps, so the
    largest and smallest id within it come from ``width`` cross-shaped max and
    min filters, each padding the image by repeating its edge (scipy's
    ``nearest``), which reaches exactly the image's pixels within the diamond.
    """
    import tensorflow as tf

    ids = tf.cast(instances, tf.int32)

    def cross(x, reduce):
        p = tf.pad(x, [[0, 0], [1, 1], [1, 1]], mode="SYMMETRIC")  # repeats the edge row and column
        shifted = [p[:, 1:-1, 1:-1], p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]
        return reduce(tf.stack(shifted, axis=0), axis=0)

    high, low = ids, ids
    for _ in range(int(width)):
        high, low = cross(high, tf.reduce_max), cross(low, tf.reduce_min)
    objects = ids > 0
    edge = objects & ((high != ids) | (low != ids))
    return tf.where(edge, BOUNDARY, tf.where(objects, INTERIOR, BACKGROUND))


class BottomUpLoss:
    """The training loss of ``unet-instance`` on a batch of the instance contract (``MaskRCNNLoss``'s interface).

    Per image: the cross-entropy of the boundary head against
    ``tf_boundary_target`` of the id map, the cross-entropy of the class head
    against the pixels' classes (each object's class over its pixels), and
    a soft Dice loss of the interior and boundary channels (they are few
    pixels beside the background). Summed over the replica's images and
    divided by the global batch, as ``MaskRCNNLoss``.
    """

    def __init__(self, model, boundary_width: int = 1, dice_weight: float = 1.0) -> None:
        self.model, self.boundary_width, self.dice_weight = model, int(boundary_width), float(dice_weight)

    def __call__(self, images, instances, classes, training: bool = True):
        import tensorflow as tf

        replica = tf.distribute.get_replica_context()
        terms = self.image_terms(images, instances, classes, training)
        local = tf.cast(tf.shape(images)[0], tf.float32)
        global_batch = replica.all_reduce(tf.distribute.ReduceOp.SUM, local) if replica is not None else local
        parts = {name: tf.reduce_sum(value) for name, value in terms.items()}
        return tf.add_n(list(parts.values())) / tf.maximum(global_batch, 1.0), parts

    def image_terms(self, images, instances, classes, training: bool = True):
        """The terms of each image, ``(B,)`` each: ``boundary`` and ``class`` cross-entropy, ``dice``."""
        import tensorflow as tf

        outputs = self.model(images, training=training)
        boundary_logits = tf.cast(outputs[BOUNDARY_OUTPUT], tf.float32)
        class_logits = tf.cast(outputs[CLASS_OUTPUT], tf.float32)
        ids = tf.cast(instances, tf.int32)
        target = tf_boundary_target(ids, self.boundary_width)
        # The class of each pixel: object k's class is classes[k - 1] (0 padding); background 0.
        lookup = tf.concat([tf.zeros_like(classes[:, :1]), classes], axis=1)
        pixel_classes = tf.gather(tf.cast(lookup, tf.int32), ids, batch_dims=1)
        boundary_ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=boundary_logits)
        class_ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=pixel_classes, logits=class_logits)
        terms = {"boundary": tf.reduce_mean(boundary_ce, axis=[1, 2]), "class": tf.reduce_mean(class_ce, axis=[1, 2])}
        if self.dice_weight > 0:
            p = tf.nn.softmax(boundary_logits)[..., 1:]
            t = tf.one_hot(target, 3)[..., 1:]
            overlap = tf.reduce_sum(p * t, axis=[1, 2])
            total = tf.reduce_sum(p + t, axis=[1, 2])
            dice = (2.0 * overlap + 1.0) / (total + 1.0)
            terms["dice"] = self.dice_weight * (1.0 - tf.reduce_mean(dice, axis=-1))
        return terms
