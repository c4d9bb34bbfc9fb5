"""Objects from any instance model of the registry: Mask R-CNN's detections, or the bottom-up model's two heads.

A saved ``.keras`` file carries no registry entry, so the family is read
from the outputs: Mask R-CNN's dict has ``count``, ``boxes`` ...,
``unet-instance``'s has ``boundary`` and ``classes`` logits.
"""

from __future__ import annotations

import numpy as np

from segray.models import bottomup, maskrcnn


def predict_instances(model, images, threshold: float = 0.5, min_size: int = 4) -> list[dict[str, np.ndarray]]:
    """Per-image objects at the input's size: ``instances`` uint16 (ids in descending score order), ``boxes``, ``classes``, ``scores``.

    Args:
        model: an instance model (``maskrcnn``, ``unet-instance``) or its saved ``.keras``.
        images: ``(B, H, W, 3)`` normalised float32, sides divisible by the model's multiple.
        threshold: Mask R-CNN's mask probability from which a pixel belongs to an object.
        min_size: the bottom-up model's smallest seed, in pixels.

    Returns:
        One dict per image; Mask R-CNN's also hold ``masks`` (box-relative
        probabilities, ``maskrcnn.predict_instances``).
    """
    import tensorflow as tf

    out = model(tf.convert_to_tensor(images, tf.float32), training=False)
    if bottomup.is_bottom_up(out):
        boundary, classes = bottomup.probabilities(out)
        return [bottomup.instances_from_outputs(boundary[b], classes[b], min_size) for b in range(boundary.shape[0])]
    return maskrcnn.instances_from_detections(out, int(images.shape[1]), int(images.shape[2]), threshold)
