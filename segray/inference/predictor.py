"""The predictor actor: uint8 images in, class-id masks at each image's own size out.

Images arrive as ``ReadDecode`` left them (uint8, or float32 on the 0..255
scale for 16-bit files); one ``tf.function`` casts, normalises
(``normalize_tf``) and runs the model, so the saved model keeps taking
normalised float32 and the object store carries uint8.

One instance per actor of ``ActorPoolStrategy``: it loads the model once and
keeps it, so the cost of loading TensorFlow and the weights is paid per actor,
not per batch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from segray.inference.components import remove_small_components
from segray.inference.geometry import Geometry, fitted_content, pad_to, restore, round_up, tiled_argmax, tiled_full
from segray.inference.sources import columns_of, empty_array, model_image
from segray.inference.tta import mean_of_views

OUT_COLUMNS = ("image_id", "uri", "error", "height", "width", "pred", "truth", "original")


class Predictor:
    """``map_batches`` callable class run by the actor pool.

    Args:
        model_uri: the ``.keras`` file.
        model_id: the weights' hash the driver pinned (``weights_id``); the actor refuses other weights.
        geometry: how images reach the model.
        batch_size: images (or windows) per model call.
        onnx_model: the model converted on the driver (``segray.export.session.convert``)
            to run in ONNX Runtime instead of TensorFlow (its bytes, or a Ray
            object ref to them), or None.
        onnx_id: the hash of ``onnx_model`` the driver pinned.
        mean, std: the normalisation applied in the graph before the model
            (``preprocessing.json``'s).
    """

    def __init__(
        self, model_uri: str, geometry: Geometry, batch_size: int, model_id: str | None = None,
        onnx_model: Any = None, onnx_id: str | None = None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    ):
        self.geometry = geometry
        self.batch_size = batch_size
        self.mean = tuple(float(m) for m in mean)
        # TensorFlow traces one graph per input shape, so short chunks are padded to one shape;
        # ONNX Runtime runs any batch size as it comes (a served request of one image costs one).
        self.pad_chunks = onnx_model is None
        if onnx_model is not None:
            from segray.export import OnnxLogits

            if not isinstance(onnx_model, bytes):
                import ray

                onnx_model = ray.get(onnx_model)
            # Converted from the weights the driver pinned; the bytes' hash pins the conversion.
            onnx = OnnxLogits(onnx_model, onnx_id)
            mean_np, std_np = np.asarray(mean, np.float32), np.asarray(std, np.float32)
            self.forward = lambda x: onnx((np.asarray(x, np.float32) - mean_np) / std_np)
            return
        import tensorflow as tf

        from segray.data import normalize_tf
        from segray.runs import load_keras, share_gpus, weights_id

        share_gpus()
        self.model = load_keras(model_uri)
        # The driver pinned the weights it checked; a file replaced since then
        # (a new checkpoint exported mid-run) would mix two models in one OUT.
        if model_id is not None and weights_id(self.model) != model_id:
            raise RuntimeError(
                f"{model_uri} changed after predict started (weights {weights_id(self.model)}, pinned {model_id}); "
                "refusing to mix two models in one output: run predict again"
            )
        model = self.model
        # XLA where Keras' own predict would use it (a GPU), so masks match model.predict's.
        self.forward = tf.function(
            lambda x: model(normalize_tf(x, mean, std), training=False), reduce_retracing=True, jit_compile=model.jit_compile
        )

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 or float32 (0..255) -> (N, H, W, C) float32 logits, ``batch_size`` at a time.

        In ``fit`` and ``tile`` modes every input has one shape, and with
        TensorFlow a short last chunk is padded to ``batch_size``: the model
        then always sees one input shape, so it is traced once and an image's
        logits do not depend on how many others share its batch (a resumed run
        gives the same masks). ONNX Runtime runs each chunk as it is. With
        ``tta`` each chunk's logits are the mean of its views' (``mean_of_views``).
        """
        fixed = (self.geometry.mode != "whole" or self.geometry.tile is not None) and self.pad_chunks
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            n = len(chunk)
            if fixed and n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)])
            out.append(mean_of_views(self.forward, chunk, self.geometry.tta)[:n])
        return np.concatenate(out) if len(out) > 1 else out[0]

    def _windowed(self, batch: dict[str, Any], i: int) -> np.ndarray:
        """The mask of image ``i`` predicted window by window (``tile``, or ``fit`` with a window)."""
        g = self.geometry
        image = model_image(batch, i)
        if g.mode == "tile":
            return tiled_argmax(self.logits, image, g.tile, g.overlap, self.batch_size, self.mean, g.weighting)
        # A fitted image is at most the model's size: its logits fit in memory, and are mapped back whole.
        logits = tiled_full(self.logits, image, g.tile, g.overlap, self.batch_size, self.mean, g.weighting)
        height, width = int(batch["height"][i]), int(batch["width"][i])
        return restore(logits, fitted_content(height, width, g.size, g.fit), height, width).argmax(axis=-1).astype(np.uint8)

    def _predict_groups(self, batch: dict[str, Any], todo: list[int], preds: list, errors: list) -> None:
        g = self.geometry
        groups: dict[tuple, list[int]] = defaultdict(list)
        inputs: dict[int, np.ndarray] = {}
        for i in todo:
            image = model_image(batch, i)
            if g.mode == "whole" and g.multiple > 1:
                # Padded with the mean: zeros after normalisation, as before it moved in-graph.
                image = pad_to(image, round_up(image.shape[0], g.multiple), round_up(image.shape[1], g.multiple), self.mean)
            inputs[i] = image
            groups[(image.shape, image.dtype.str)].append(i)
        for indices in groups.values():
            try:
                logits = self.logits(np.stack([inputs[i] for i in indices]))
            except Exception as e:  # noqa: BLE001 - the images of this call fail, the rest go on
                for i in indices:
                    errors[i] = f"{batch['uri'][i]}: model failed on a {inputs[i].shape[1]}x{inputs[i].shape[0]} input: {type(e).__name__}: {e}"
                continue
            for i, out in zip(indices, logits):
                height, width = int(batch["height"][i]), int(batch["width"][i])
                content = fitted_content(height, width, g.size, g.fit) if g.mode == "fit" else (height, width)
                preds[i] = restore(out, content, height, width).argmax(axis=-1).astype(np.uint8)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["image_id"])
        errors = [str(e) for e in batch["error"]]
        preds: list[np.ndarray] = [empty_array(np.uint8, None)] * n
        todo = [i for i in range(n) if not errors[i]]
        if self.geometry.tile is not None:
            for i in todo:
                try:
                    preds[i] = self._windowed(batch, i)
                except Exception as e:  # noqa: BLE001
                    errors[i] = f"{batch['uri'][i]}: tiled prediction failed: {type(e).__name__}: {e}"
        else:
            self._predict_groups(batch, todo, preds, errors)
        if self.geometry.min_component:
            for i in todo:
                if not errors[i]:
                    preds[i] = remove_small_components(preds[i], self.geometry.min_component)
        rows = []
        for i in range(n):
            failed = bool(errors[i])
            rows.append(
                {
                    "image_id": batch["image_id"][i],
                    "uri": batch["uri"][i],
                    "error": errors[i],
                    "height": batch["height"][i],
                    "width": batch["width"][i],
                    "pred": empty_array(np.uint8, None) if failed else preds[i],
                    "truth": empty_array(np.uint8, None) if failed else batch["truth"][i],
                    "original": empty_array(np.uint8) if failed else batch["original"][i],
                }
            )
        return columns_of(rows, OUT_COLUMNS)
