"""Model names -> ``ModelSpec`` entries (builder and capabilities), and ``build`` by name.

Each entry declares, once, what the rest of segray asks about a model: its
builder, a tiny variant for tests, whether XLA compiles its train step, what
height and width must be divisible by, and whether (and how) it takes deep
supervision heads. Training, planning, tuning and the CLI ask the entry;
none of them names a model.

The built-in models are a plain dict written out here (``BUILTIN``), not
filled by decorators at import time: every built-in name is in this one place.

Adding a model of your own takes its file and one ``register`` call, no
change to segray::

    # mypkg/tiny.py: importable on every node (installed, or shipped in the
    # job's runtime_env ``py_modules`` / ``working_dir``)
    from segray.models.registry import ModelSpec, register

    def build_tiny(num_classes, input_shape=(None, None, 3), *, width=8):
        ...  # returns a keras.Model: (B, H, W, C) images -> (B, H, W, num_classes) logits

    NAME = register(ModelSpec("tiny", build_tiny, tiny_options={"width": 4}))  # "mypkg.tiny:tiny"

and train with ``model: "mypkg.tiny:tiny"`` (``--model mypkg.tiny:tiny``).
A registered model is named ``MODULE:NAME`` after the module that defines
its builder, because Ray Train's workers are other processes, on other
nodes: looking up ``MODULE:NAME`` imports ``MODULE`` (whose ``register``
call then runs there too), so the run's ``config.json`` alone says where its
model comes from. Prediction and export read the saved ``.keras`` file and
need no registry; a model with custom layers registers them with Keras
(``keras.saving.register_keras_serializable``) in that module as usual.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras

from segray.models import bottomup, deeplabv3plus, maskrcnn, segnet, unet

# Lower decoder levels that deep supervision trains heads on (1/2 and 1/4 of the size, nnU-Net's).
DEEP_SUPERVISION_LEVELS = 2


def any_size(**_: Any) -> int:
    """The ``input_multiple`` of a model that takes any height and width."""
    return 1


@dataclass(frozen=True)
class ModelSpec:
    """One model family and what it can do: the only place a model's capabilities are written.

    Attributes:
        name: the short name (``unet``); a model added with ``register`` is
            then known as ``MODULE:name``.
        build: ``build(num_classes, input_shape, **options) -> keras.Model``;
            its keyword-only parameters are the model's options (with defaults).
        tiny_options: options of a tiny variant (a few thousand to ~100k
            parameters, a few ms per 32x32 image on a CPU) for tests and smoke runs.
        no_xla: why XLA cannot compile the model's train step; None: it can.
        input_multiple: ``input_multiple(**options) -> int``, what height and
            width must be divisible by with these options (1: any size).
        deep_supervision: ``deep_supervision(model, num_classes, levels) ->
            keras.Model`` with outputs ``[logits, logits at 1/2, at 1/4 ...]``
            sharing ``model``'s layers; None: the model has no decoder levels to supervise.
        decoder_levels: ``decoder_levels(**options) -> int``, the levels below
            full size that ``deep_supervision`` can put heads on.
        task: what the model answers: ``semantic`` (per-pixel class logits,
            trained by ``TrainingLoss``) or ``instance`` (objects: boxes,
            classes, scores, masks; trained by its own loss, e.g.
            ``segray.models.maskrcnn.MaskRCNNLoss``, on the instance batch).
        instance_loss: for an ``instance`` model, ``instance_loss(model) ->
            loss`` with ``loss(images, instances, classes, training) ->
            (loss, parts)``: the replica's loss divided by the global batch
            and its per-image terms summed (``MaskRCNNLoss``); None otherwise.
    """

    name: str
    build: Callable[..., keras.Model]
    tiny_options: Mapping[str, Any] = field(default_factory=dict)
    no_xla: str | None = None
    input_multiple: Callable[..., int] = any_size
    deep_supervision: Callable[[keras.Model, int, int], keras.Model] | None = None
    decoder_levels: Callable[..., int] | None = None
    task: str = "semantic"
    instance_loss: Callable[[keras.Model], Any] | None = None

    def default_options(self) -> dict[str, Any]:
        """The builder's keyword options with their defaults."""
        params = inspect.signature(self.build).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def supervised_levels(self, **options: Any) -> int:
        """How many lower decoder levels deep supervision can train heads on with these options (0: none)."""
        if self.deep_supervision is None or self.decoder_levels is None:
            return 0
        return self.decoder_levels(**{**self.default_options(), **options})

    def multiple(self, **options: Any) -> int:
        """What height and width must be divisible by with these options (defaults filled in)."""
        return self.input_multiple(**{**self.default_options(), **options})


BUILTIN: dict[str, ModelSpec] = {
    "deeplabv3plus": ModelSpec(
        "deeplabv3plus",
        deeplabv3plus.build_deeplabv3plus,
        tiny_options={"width": 8, "blocks_per_stage": 1, "aspp_filters": 16, "low_level_filters": 8, "decoder_filters": 16},
    ),
    "maskrcnn": ModelSpec(
        "maskrcnn",
        maskrcnn.build_maskrcnn,
        tiny_options={
            "blocks_per_stage": (1, 1, 1, 1), "width": 8, "fpn_filters": 16, "anchor_sizes": (8, 16, 32),
            "head_units": 64, "mask_roi_size": 7, "mask_filters": 16, "mask_convs": 2,
            "rpn_pre_nms": 300, "proposals": 100, "max_detections": 10,
        },
        no_xla="its proposal and detection NMS (combined_non_max_suppression) has no XLA kernel",
        input_multiple=maskrcnn.input_multiple,
        task="instance",
        instance_loss=maskrcnn.MaskRCNNLoss,
    ),
    "segnet": ModelSpec(
        "segnet",
        segnet.build_segnet,
        tiny_options={"depth": 2, "width": 8, "convs_per_stage": 1},
        no_xla="its MaxPoolWithArgmax (the pooling indices it unpools with) has no XLA kernel",
    ),
    "unet-instance": ModelSpec(
        "unet-instance",
        bottomup.build_unet_instance,
        tiny_options={"depth": 2, "width": 8},
        input_multiple=unet.input_multiple,
        task="instance",
        instance_loss=bottomup.BottomUpLoss,
    ),
    "unet": ModelSpec(
        "unet",
        unet.build_unet,
        tiny_options={"depth": 2, "width": 8},
        input_multiple=unet.input_multiple,
        deep_supervision=unet.with_deep_supervision,
        decoder_levels=unet.decoder_levels,
    ),
}

# The built-ins, then what ``register`` added in this process.
_SPECS: dict[str, ModelSpec] = dict(BUILTIN)

TASKS = ("semantic", "instance")


class _Field(Mapping):
    """A read-only ``{name: spec.<attribute>}`` view of the semantic models (kept for callers of the older dicts)."""

    def __init__(self, attribute: str, only_set: bool = False) -> None:
        self.attribute, self.only_set = attribute, only_set

    def _items(self) -> dict[str, Any]:
        out = {name: getattr(s, self.attribute) for name, s in _SPECS.items() if s.task == "semantic"}
        return {k: v for k, v in out.items() if v is not None} if self.only_set else out

    def __getitem__(self, name: str) -> Any:
        return self._items()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


MODELS: Mapping[str, Callable[..., keras.Model]] = _Field("build")
NO_XLA: Mapping[str, str] = _Field("no_xla", only_set=True)
TINY_OPTIONS: Mapping[str, Mapping[str, Any]] = _Field("tiny_options")


def register(spec: ModelSpec) -> str:
    """Adds a model defined outside segray; returns the name it is known by, ``MODULE:NAME``.

    ``MODULE`` is the module that defines ``spec.build``: any process that
    looks the name up imports it, so the model exists on Ray's workers too.
    Registering the same name again (the module imported again) replaces it.

    Raises:
        ValueError: the builder is not defined in an importable module
            (``__main__``, a notebook), or ``spec.name`` holds a ``:``.
    """
    module = getattr(spec.build, "__module__", None)
    if not module or module == "__main__" or module.startswith("__"):
        raise ValueError(
            f"model {spec.name!r}: its builder is defined in {module or 'no module'}; define it in an importable module "
            "(Ray's workers import it by name), then register it there"
        )
    if not spec.name or ":" in spec.name:
        raise ValueError(f"model name {spec.name!r}: expected a plain name without ':'")
    name = f"{module}:{spec.name}"
    _SPECS[name] = spec
    return name


def available(task: str | None = "semantic") -> list[str]:
    """The model names known in this process (the built-ins and those registered) for ``task``, sorted.

    Args:
        task: ``semantic`` (the default: the models every semantic path
            walks), ``instance``, or None for every model.

    Raises:
        ValueError: an unknown task.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return sorted(n for n, s in _SPECS.items() if task is None or s.task == task)


def spec(name: str) -> ModelSpec:
    """The entry of model ``name``; a ``MODULE:NAME`` not registered yet imports ``MODULE`` first.

    Raises:
        ValueError: ``name`` is not registered (the message lists the valid
            names), or its module cannot be imported or registers no such model.
    """
    if isinstance(name, str) and name in _SPECS:
        return _SPECS[name]
    if isinstance(name, str) and ":" in name:
        module, _, short = name.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"model {name!r}: cannot import its module {module!r} ({e})") from None
        if name in _SPECS:
            return _SPECS[name]
        there = [n.partition(":")[2] for n in _SPECS if n.startswith(f"{module}:")]
        raise ValueError(
            f"model {name!r}: module {module} registers no model {short!r} "
            f"({'it registers ' + ', '.join(there) if there else 'it calls segray.models.registry.register for none'})"
        )
    others = [n for n in available(None) if n not in available()]
    raise ValueError(
        f"unknown model {name!r}; available: {', '.join(available())}"
        + (f"; instance models: {', '.join(others)}" if others else "")
    )


def builder(name: str) -> Callable[..., keras.Model]:
    """The builder function of model ``name`` (``spec(name).build``)."""
    return spec(name).build


def default_options(name: str) -> dict[str, Any]:
    """The keyword options of model ``name`` with their defaults."""
    return spec(name).default_options()


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
        name: a name from ``available()``, or ``MODULE:NAME`` of a module that registers it.
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
    entry = spec(name)
    known = entry.default_options()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"valid options: {', '.join(sorted(known))}"
        )
    return entry.build(num_classes, tuple(input_shape), **options)
