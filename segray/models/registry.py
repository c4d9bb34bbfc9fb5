"""Model names -> builder functions, and ``build`` by name.

The registry is a plain dict written out here, not filled by decorators at
import time: every name a config or the CLI may use is in this one place.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras

from segray.models.deeplabv3plus import build_deeplabv3plus
from segray.models.segnet import build_segnet
from segray.models.unet import build_unet

MODELS: dict[str, Callable[..., keras.Model]] = {
    "deeplabv3plus": build_deeplabv3plus,
    "segnet": build_segnet,
    "unet": build_unet,
}

# Models whose train step XLA cannot compile, and why: `segray train --xla`
# refuses them before any work starts.
NO_XLA: dict[str, str] = {
    "segnet": "its MaxPoolWithArgmax (the pooling indices it unpools with) has no XLA kernel",
}

# Options for a tiny variant of each model (a few thousand to ~100k parameters,
# a few ms per 32x32 image on a CPU): for tests and smoke runs of the pipeline.
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "deeplabv3plus": {
        "width": 8,
        "blocks_per_stage": 1,
        "aspp_filters": 16,
        "low_level_filters": 8,
        "decoder_filters": 16,
    },
    "segnet": {"depth": 2, "width": 8, "convs_per_stage": 1},
    "unet": {"depth": 2, "width": 8},
}


def available() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def builder(name: str) -> Callable[..., keras.Model]:
    """The builder function registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the valid names.
    """
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}") from None


def default_options(name: str) -> dict[str, Any]:
    """The keyword options of model ``name`` with their defaults."""
    params = inspect.signature(builder(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``policy`` (``float32``, ``mixed_float16`` ...) inside the block, the previous one after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build(
    name: str,
    num_classes: int,
    input_shape: Sequence[int | None] = (None, None, 3),
    **options: Any,
) -> keras.Model:
    """Builds the registered model ``name``.

    Args:
        name: a name from ``available()``.
        num_classes: number of output channels; the model outputs logits.
        input_shape: ``(H, W, C)``; leave ``H`` and ``W`` as ``None`` for a
            model that takes images of any (valid) size.
        **options: the builder's keyword options (``default_options(name)``).

    Returns:
        A ``keras.Model`` mapping ``(B, H, W, C)`` float images to
        ``(B, H, W, num_classes)`` float32 logits.

    Raises:
        ValueError: unknown model name or option (the message lists the valid
            ones), or an option value the builder rejects.
    """
    build_fn = builder(name)
    known = default_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"valid options: {', '.join(sorted(known))}"
        )
    return build_fn(num_classes, tuple(input_shape), **options)
