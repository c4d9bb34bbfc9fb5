"""Custom layers shared by the segmentation models.

Every layer here is registered under the ``segray`` package and implements
``get_config``, so a saved ``.keras`` model loads with ``safe_mode=True`` and
no pickled code. They use TensorFlow ops (the project runs the TensorFlow
backend) and read sizes with ``tf.shape`` so that batch, height and width may
all be unknown until run time, as under ``MultiWorkerMirroredStrategy`` and
in inference over images of varying sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras

if TYPE_CHECKING:
    import tensorflow as tf


def _tf() -> Any:
    # Imported when a layer first needs it, so the models build (at known
    # sizes) under any Keras backend; segray itself trains on TensorFlow.
    import tensorflow

    return tensorflow


def valid_sizes(n: int, multiple: int) -> tuple[int, ...]:
    """The multiples of ``multiple`` nearest to ``n``: ``(n,)`` if it is one.

    Args:
        n: a height or width in pixels.
        multiple: what the size has to be divisible by.

    Returns:
        ``(n,)`` when ``n`` is divisible, else the multiple below (left out
        when it would be 0) and the one above.
    """
    if n % multiple == 0:
        return (n,)
    lower = n // multiple * multiple
    return (lower, lower + multiple) if lower > 0 else (lower + multiple,)


def size_error(label: str, height: int | None, width: int | None, multiple: int) -> str:
    """The message for an input whose sides are not divisible by ``multiple``.

    Example: ``unet (depth 4) needs height and width divisible by 16, got
    33x32; nearest valid height: 32 or 48, width: 32``. An unknown side
    (``None``) shows as ``?``.
    """

    def shown(n: int | None) -> str:
        return "?" if n is None else str(n)

    def options(n: int | None) -> str:
        if n is None:
            return f"any multiple of {multiple}"
        return " or ".join(str(v) for v in valid_sizes(n, multiple))

    return (
        f"{label} needs height and width divisible by {multiple}, got {shown(height)}x{shown(width)}; "
        f"nearest valid height: {options(height)}, width: {options(width)}"
    )


def check_static_size(label: str, input_shape: tuple[int | None, ...], multiple: int) -> None:
    """Raises ValueError at build time when a known height or width is not divisible."""
    height, width = input_shape[0], input_shape[1]
    bad = [n for n in (height, width) if n is not None and n % multiple]
    if bad:
        raise ValueError(size_error(label, height, width, multiple))


@keras.saving.register_keras_serializable(package="segray")
class DivisibleSizeCheck(keras.layers.Layer):
    """Passes its input through, failing if height or width is not divisible.

    A model with ``n`` 2x poolings and same-size skip connections only works on
    sides divisible by ``2**n``. Built for dynamic ``(None, None, C)`` inputs,
    such a model would otherwise fail deep inside a ``Concatenate`` with a
    shape message that names neither the input size nor a fix.

    When the size is known while tracing (always in eager mode) the check is
    plain Python and raises ``ValueError``; when it is only known at run time
    a ``tf.debugging.Assert`` raises ``tf.errors.InvalidArgumentError`` with
    the same message.

    Args:
        multiple: height and width must be divisible by this.
        label: names the model in the message, e.g. ``"unet (depth 4)"``.
    """

    def __init__(self, multiple: int, label: str = "model", **kwargs: Any) -> None:
        # A pass-through check has no reason to cast the image to float16.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.multiple = int(multiple)
        self.label = str(label)
        # tf.debugging.Assert does not compile under XLA.
        self.supports_jit = False

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        static_h, static_w = inputs.shape[1], inputs.shape[2]
        if static_h is not None and static_w is not None:
            if static_h % self.multiple or static_w % self.multiple:
                raise ValueError(size_error(self.label, static_h, static_w, self.multiple))
            return inputs
        tf = _tf()
        shape = tf.shape(inputs)
        height, width = shape[1], shape[2]
        ok = tf.logical_and(
            tf.equal(tf.math.floormod(height, self.multiple), 0),
            tf.equal(tf.math.floormod(width, self.multiple), 0),
        )
        # Same text as size_error; tf.strings.format would quote the string parts.
        message = tf.strings.join(
            [
                f"{self.label} needs height and width divisible by {self.multiple}, got ",
                tf.strings.as_string(height),
                "x",
                tf.strings.as_string(width),
                "; nearest valid height: ",
                self._options(height),
                ", width: ",
                self._options(width),
            ]
        )
        assertion = tf.debugging.Assert(ok, [message])
        with tf.control_dependencies([assertion]):
            return tf.identity(inputs)

    def _options(self, n: tf.Tensor) -> tf.Tensor:
        """Graph version of ``valid_sizes`` joined by ' or ' (a string tensor)."""
        tf = _tf()
        lower = n // self.multiple * self.multiple
        upper = lower + self.multiple
        both = tf.strings.join([tf.strings.as_string(lower), " or ", tf.strings.as_string(upper)])
        either = tf.where(lower > 0, both, tf.strings.as_string(upper))
        return tf.where(tf.equal(n, lower), tf.strings.as_string(n), either)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "multiple": self.multiple, "label": self.label}


@keras.saving.register_keras_serializable(package="segray")
class MaxPoolingWithArgmax2D(keras.layers.Layer):
    """Max pooling that also returns where each maximum came from.

    Returns ``(pooled, argmax)``, both ``(B, ceil(H/s), ceil(W/s), C)``;
    ``argmax`` is int64 and indexes the flattened input *including* the batch
    (``((b * H + y) * W + x) * C + c``), which is what ``MaxUnpooling2D``
    scatters with. Padding is ``SAME``, so an odd side keeps its last row.

    Args:
        pool_size: window side.
        strides: step; defaults to ``pool_size``.
    """

    def __init__(self, pool_size: int = 2, strides: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_size = int(pool_size)
        self.strides = int(strides) if strides is not None else self.pool_size
        # MaxPoolWithArgmax has no XLA kernel.
        self.supports_jit = False

    def call(self, inputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        tf = _tf()
        pooled, argmax = tf.nn.max_pool_with_argmax(
            inputs,
            ksize=self.pool_size,
            strides=self.strides,
            padding="SAME",
            include_batch_in_index=True,
        )
        return pooled, argmax

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        def pooled(n: int | None) -> int | None:
            return None if n is None else -(-n // self.strides)

        shape = (input_shape[0], pooled(input_shape[1]), pooled(input_shape[2]), input_shape[3])
        return shape, shape

    def compute_output_spec(self, inputs: keras.KerasTensor) -> tuple[keras.KerasTensor, keras.KerasTensor]:
        shape, _ = self.compute_output_shape(inputs.shape)
        return keras.KerasTensor(shape, dtype=self.compute_dtype), keras.KerasTensor(shape, dtype="int64")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides}


@keras.saving.register_keras_serializable(package="segray")
class MaxUnpooling2D(keras.layers.Layer):
    """SegNet's upsampling: each value goes back where its maximum came from.

    Call on ``[values, argmax, reference]``: ``values`` and ``argmax`` are
    ``(B, h, w, C)`` (``argmax`` from ``MaxPoolingWithArgmax2D``), and
    ``reference`` is the tensor that was pooled, read only for its height and
    width. Returns ``(B, H, W, C)``: zeros except at the recorded positions.
    All sizes come from ``tf.shape``, so the batch may be dynamic.
    """

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        tf = _tf()
        values, argmax, reference = inputs
        ref_shape = tf.shape(reference, out_type=tf.int64)
        out_shape = tf.stack(
            [ref_shape[0], ref_shape[1], ref_shape[2], tf.shape(values, out_type=tf.int64)[3]]
        )
        flat = tf.scatter_nd(
            tf.reshape(argmax, [-1, 1]),
            tf.reshape(values, [-1]),
            tf.reduce_prod(out_shape, keepdims=True),
        )
        return tf.reshape(flat, out_shape)

    def compute_output_shape(self, input_shape: list[tuple]) -> tuple:
        values, _, reference = input_shape
        return (values[0], reference[1], reference[2], values[3])

    def get_config(self) -> dict[str, Any]:
        return super().get_config()


@keras.saving.register_keras_serializable(package="segray")
class ResizeLike(keras.layers.Layer):
    """Resizes ``x`` to the height and width of ``reference`` (known or not).

    Call on ``[x, reference]``. ``keras.layers.Resizing`` and ``UpSampling2D``
    need the size or factor when the model is built; DeepLab has to match
    feature maps whose sizes depend on the input (``ceil(H / 4)`` and so on).

    Args:
        interpolation: ``"bilinear"`` or ``"nearest"`` (``tf.image.resize`` methods).
    """

    def __init__(self, interpolation: str = "bilinear", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation: expected 'bilinear' or 'nearest', got {interpolation!r}")
        self.interpolation = interpolation

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        tf = _tf()
        x, reference = inputs
        resized = tf.image.resize(x, tf.shape(reference)[1:3], method=self.interpolation)
        # tf.image.resize returns float32 for bilinear; keep float16 under mixed precision.
        return tf.cast(resized, x.dtype)

    def compute_output_shape(self, input_shape: list[tuple]) -> tuple:
        x, reference = input_shape
        return (x[0], reference[1], reference[2], x[3])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "interpolation": self.interpolation}
