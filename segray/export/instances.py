"""Exporting an instance model (``maskrcnn``): a SavedModel whose signature returns the detections after NMS.

``serving_default`` takes uint8 RGB images ``(N, H, W, 3)`` of any size
(``images``), normalises them with the run's mean and std, pads them at the
bottom and right to the model's multiple (zeros after normalisation, as
``segray predict`` pads), runs the model, and returns per image, for up to
``D`` (the model's ``max_detections``) detections of which the first
``count`` are real, highest score first:

- ``boxes`` float32 ``(N, D, 4)``: ``(y1, x1, y2, x2)`` in pixels of the image;
- ``scores`` float32 ``(N, D)``; ``classes`` int32 ``(N, D)`` (1.. object classes);
- ``masks`` float32 ``(N, D, S, S)``: each object's mask probabilities over its box;
- ``count`` int32 ``(N,)``.

``segray.models.paste_instances(boxes[:count], masks[:count], scores[:count], H, W)``
turns one image's detections into the instance map ``segray predict`` writes.

ONNX is refused: tf2onnx (1.17) converts TensorFlow's
``CombinedNonMaxSuppression`` only when all classes share one box per
detection; Mask R-CNN's detection NMS has a box per class, so the converter
leaves the TensorFlow op in the graph and ONNX Runtime rejects it
(docs/maskrcnn.md has the details). The plain ``keras`` export is refused
too: the model's custom layers (proposals, RoIAlign, NMS) have no standard
Keras equivalent, so the file would need segray to load; the run's own
``model/model.keras`` is that file.
"""

from __future__ import annotations

import numpy as np

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "classes", "masks", "count")
# Boxes are in pixels: float rounding between the traced and the eager model stays far below this.
PARITY_TOLERANCE = 1e-3

ONNX_REFUSAL = (
    "ONNX cannot hold this model's detection NMS: tf2onnx converts TensorFlow's CombinedNonMaxSuppression only when all classes "
    "share one box per detection (the converter says 'CombinedNonMaxSuppression only currently implemented for boxes shared "
    "across classes'), and Mask R-CNN keeps a box per class, so the op stays a TensorFlow op that ONNX Runtime rejects; "
    "use `format` savedmodel (its serving signature returns boxes, scores, classes, masks and count after NMS)"
)
KERAS_REFUSAL = (
    "a plain Keras file of this model would need segray to load (its proposal, RoIAlign and NMS layers have no standard Keras "
    "equivalent); use `format` savedmodel, or the run's own model/model.keras with segray installed"
)


def instance_serving_function(net, mean: tuple[float, ...], std: tuple[float, ...], multiple: int):
    """The ``tf.function`` of the module docstring over ``net`` (a loaded ``maskrcnn``)."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)
    mean_np, std_np = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    @tf.function(input_signature=[spec])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        x = (tf.cast(images, tf.float32) - tf.constant(mean_np)) / tf.constant(std_np)
        shape = tf.shape(x)
        pad_h = (multiple - shape[1] % multiple) % multiple
        pad_w = (multiple - shape[2] % multiple) % multiple
        x = tf.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
        out = net(x, training=False)
        # The model's boxes are fractions of the padded image, whose top-left part is the image.
        padded = tf.cast(tf.shape(x)[1:3], tf.float32)
        scale = tf.concat([padded, padded], axis=0)
        return {
            "boxes": tf.identity(tf.cast(out["boxes"], tf.float32) * scale, name="boxes"),
            "scores": tf.identity(tf.cast(out["scores"], tf.float32), name="scores"),
            "classes": tf.identity(tf.cast(out["classes"], tf.int32), name="classes"),
            "masks": tf.identity(tf.cast(out["masks"], tf.float32), name="masks"),
            "count": tf.identity(tf.cast(out["count"], tf.int32), name="count"),
        }

    return serve


def write_instance_savedmodel(net, mean, std, multiple: int, folder: str) -> str:
    """A SavedModel in ``folder`` whose ``serving_default`` signature is ``instance_serving_function``."""
    import tensorflow as tf

    module = tf.Module()
    module.net = net
    module.serve = instance_serving_function(net, mean, std, multiple)
    tf.saved_model.save(module, folder, signatures={"serving_default": module.serve})
    return folder


def reference_detections(net, images: np.ndarray, mean, std) -> list[dict[str, np.ndarray]]:
    """What ``segray predict`` computes for ``images`` (uint8, sides divisible by the multiple): ``predict_instances``' detections."""
    from segray.models import predict_instances

    x = (images.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return predict_instances(net, x)


def exported_detections(path: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """The SavedModel at ``path`` loaded afresh and run on ``images``."""
    import tensorflow as tf

    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    return {k: v.numpy() for k, v in out.items()}


def detection_parity(net, path: str, images: np.ndarray, mean, std) -> dict[str, float | int | list[int]]:
    """Compares the export's detections with the model's on ``images``.

    Returns:
        ``probe_shape``, ``detections`` (per image), ``max_abs_box_diff`` (pixels),
        ``max_abs_score_diff``, ``max_abs_mask_diff``, ``classes_equal`` (1 or 0).

    Raises:
        ValueError: the detection counts differ.
    """
    from segray.models import paste_instances

    got = exported_detections(path, images)
    height, width = images.shape[1:3]
    diffs = {"box": 0.0, "score": 0.0, "mask": 0.0}
    equal, counts = True, []
    for b in range(images.shape[0]):
        # The reference pastes its detections; paste the export's the same way and compare what predict keeps.
        n = int(got["count"][b])
        boxes, scores, masks, classes = got["boxes"][b, :n], got["scores"][b, :n], got["masks"][b, :n], got["classes"][b, :n]
        _, keep = paste_instances(boxes, masks, scores, height, width)
        want = reference_detections(net, images[b: b + 1], mean, std)[0]
        if len(keep) != len(want["scores"]):
            raise ValueError(f"the savedmodel export keeps {len(keep)} objects of probe image {b}, the model {len(want['scores'])}")
        counts.append(len(keep))
        if len(keep):
            diffs["box"] = max(diffs["box"], float(np.abs(boxes[keep] - want["boxes"]).max()))
            diffs["score"] = max(diffs["score"], float(np.abs(scores[keep] - want["scores"]).max()))
            diffs["mask"] = max(diffs["mask"], float(np.abs(masks[keep] - want["masks"]).max()))
            equal = equal and bool(np.array_equal(classes[keep], want["classes"]))
    return {"probe_shape": list(images.shape), "detections": counts, "max_abs_box_diff": diffs["box"],
            "max_abs_score_diff": diffs["score"], "max_abs_mask_diff": diffs["mask"], "classes_equal": int(equal)}


def describe_instance_outputs(num_classes: int, max_detections: int | None, mask_size: int | None) -> dict:
    """The model card's inputs and outputs of an instance export."""
    d, s = max_detections or "D", mask_size or "S"
    return {
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", "H", "W", 3], "channels": "RGB"},
        "outputs": {
            "boxes": {"dtype": "float32", "shape": ["N", d, 4], "note": "(y1, x1, y2, x2) in pixels of the image"},
            "scores": {"dtype": "float32", "shape": ["N", d], "note": "highest first; rows past count are padding"},
            "classes": {"dtype": "int32", "shape": ["N", d], "note": f"object classes 1..{num_classes - 1}"},
            "masks": {"dtype": "float32", "shape": ["N", d, s, s], "note": "mask probabilities over each box (>= 0.5: the object's)"},
            "count": {"dtype": "int32", "shape": ["N"], "note": "real detections of each image, after per-class NMS"},
        },
        "instance_map": "segray.models.paste_instances(boxes[:count], masks[:count], scores[:count], H, W) gives segray predict's instance map",
    }
