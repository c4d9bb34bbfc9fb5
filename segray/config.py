"""Configuration: frozen dataclasses with strict checks, one per job.

Configuration flows one way: YAML and flags -> one of ``IngestConfig``,
``TrainConfig``, ``TuneConfig``, ``PredictConfig``, ``EvaluateConfig``, ``ExportConfig``,
``ServeConfig`` (unknown keys, wrong
types and bad values raise ``ConfigError`` naming the field) -> ``to_dict``
into Ray's ``train_loop_config`` or an output's record -> rebuilt with
``from_dict`` where it is needed. Each field is declared once, with its
command-line flag in its metadata (``flag(default, help=...)``): the CLI's
flags and ``--help``, the keys of ``--config FILE.yaml`` and the API's
arguments are the same names (``batch_size`` is ``--batch-size``). The
library never speaks in flags; the CLI maps a field to its flag when it
prints an error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")

# Decoding takes about 50 bytes of memory per pixel on the way to a float
# batch; 100 million pixels (10,000 x 10,000) is about 5 GB. Larger images are
# set aside before decoding (the header says how large) unless a job raises
# its ``max_pixels``.
DEFAULT_MAX_PIXELS = 100_000_000
MIB = 2**20
# segray serve's default body limit per pixel of max_pixels: an uncompressed
# 8-bit RGBA file (or 16-bit grey with alpha) fits; compressed files are smaller.
BODY_BYTES_PER_PIXEL = 4


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range.

    Attributes:
        field: the config field the message starts with, or None.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


# A value in a message is cut to about this many characters: a config can hold
# any amount of data, and a message that formats all of it could be gigabytes.
SHOWN_CHARS = 120


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters, saying how large a cut value was.

    Built without the full repr (``reprlib`` stops at a few items and levels),
    so a value of billions of items costs no more than a small one.
    """
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    cut = len(text) > limit or "..." in text
    if len(text) > limit:
        text = text[:limit] + "..."
    if not cut:
        return text
    if isinstance(value, (str, bytes)):
        return f"{text} ({len(value):,} characters)"
    if isinstance(value, (list, tuple, dict, set)):
        return f"{text} (a {type(value).__name__} of {len(value):,} items)"
    return text


def about(field_name: str, error: BaseException) -> BaseException:
    """Marks ``error`` (whose message starts with ``field_name``) as being about that field.

    The CLI prints such a message with the field's flag in its place, so
    errors raised deep in the library read like the command line that caused them.
    """
    error.field = field_name  # type: ignore[attr-defined]
    return error


def _check(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None) and value is None:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: expected {hint}, got {shown(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {list(args)}, got {shown(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {shown(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {shown(value)}")
            return tuple(_check(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_check(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {shown(value)}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {shown(value)}")
        return from_dict(hint, value, prefix=f"{name}.")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {shown(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {shown(value)}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {shown(value)}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Builds ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            try:
                kwargs[name] = _check(prefix + name, data[name], hints[name])
            except ConfigError as e:
                if not prefix and e.field is None:
                    e.field = name
                raise
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix + name} is required", field=None if prefix else name)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """``asdict`` with tuples turned into lists, so the result is JSON-ready."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


@dataclass(frozen=True)
class Flag:
    """How a config field is given on the command line; ``flag()`` puts it in the field's metadata.

    The flag is the field's name with dashes, ``--batch-size`` for ``batch_size``.
    A field without a ``Flag`` has none (``TrainConfig.plan``, ``ServeConfig.blocking``).

    Attributes:
        help: the flag's line in ``--help``.
        parse: text -> value, raising ConfigError; with ``nargs``, the list of
            texts -> value. None: from the field's type (int, float, else text).
        metavar: what ``--help`` calls the value (a tuple with ``nargs``).
        positional: given without a flag, in field order (``segray ingest SOURCE DESTINATION``).
        required: a positional the command line must give (others may come
            from ``--config``; the config says what is required).
        aliases: other spellings (``--keep`` for ``--keep-checkpoints``).
        nargs: the number of texts the flag takes; None: one.
        negatable: a bool flag with a ``--no-`` form, for a default a plan or
            a config file may turn on.
        collect: the flag may be repeated; the list of its parsed values
            becomes the field's value through this (``dict`` for KEY=VALUE pairs).
        resumable: ``segray train --resume`` may change this field.
    """

    help: str | None = None
    parse: Callable[[Any], Any] | None = None
    metavar: str | tuple[str, ...] | None = None
    positional: bool = False
    required: bool = False
    aliases: tuple[str, ...] = ()
    nargs: int | None = None
    negatable: bool = False
    collect: Callable[[list], Any] | None = None
    resumable: bool = False


def flag(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **options: Any) -> Any:
    """A dataclass field with its command-line ``Flag`` (``options`` are its attributes)."""
    return field(default=default, default_factory=default_factory, metadata={"flag": Flag(**options)})


@dataclass(frozen=True)
class FlagSpec:
    """A field's flag resolved against the field's type: what the CLI adds for it.

    Attributes:
        name: the field.
        option_strings: ``--name`` and its aliases; () for a positional.
        kind: ``value``, ``switch`` (a bool's ``store_true``) or ``negatable`` (``--x`` / ``--no-x``).
        parse: text -> value; None leaves the text as it is.
        choices: the values a ``Literal`` field allows, else None.
    """

    name: str
    option_strings: tuple[str, ...]
    kind: str
    parse: Callable[[Any], Any] | None
    choices: tuple | None
    flag: Flag


def _plain_type(hint: Any) -> Any:
    """``X | None`` -> X; anything else as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def flags(cls: type) -> list[FlagSpec]:
    """The command-line flags of config class ``cls``, in field order (positionals among them).

    Raises:
        TypeError: a field whose type gives no parser and whose ``Flag`` names none.
    """
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("flag")
        if spec is None:
            continue
        hint = _plain_type(hints[f.name])
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
        parse = spec.parse
        if hint is bool:
            kind = "negatable" if spec.negatable else "switch"
        else:
            kind = "value"
            if parse is None and hint in (int, float):
                parse = hint
            elif parse is None and not (hint is str or choices or spec.nargs):
                raise TypeError(f"{cls.__name__}.{f.name}: a {hints[f.name]} field's flag needs a parse function")
        names = () if spec.positional else ("--" + f.name.replace("_", "-"), *spec.aliases)
        specs.append(FlagSpec(f.name, names, kind, parse, choices, spec))
    return specs


def resumable_fields(cls: type) -> frozenset[str]:
    """The fields of ``cls`` that a resumed run may change (``Flag.resumable``)."""
    return frozenset(f.name for f in dataclasses.fields(cls) if getattr(f.metadata.get("flag"), "resumable", False))


def parse_names(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_hw(text: str) -> list[int]:
    """``parse_size`` as a list, the form a config field holds."""
    return list(parse_size(text))


def parse_key_value(text: str) -> tuple[str, Any]:
    """'depth=3' -> ('depth', 3): KEY=VALUE with a YAML value."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{text!r}: expected KEY=VALUE, e.g. depth=3")
    return key, load_yaml(value, f"{key}={shown(value)}")


def parse_class_weights(text: str) -> str | list[float]:
    """'auto', 'none' or 'w0,w1,...' -> the weights."""
    if text in ("auto", "none"):
        return text
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"{text!r}: expected auto, none or w0,w1,...") from None


def parse_replicas(text: str) -> str | int:
    """'auto' or a number of replicas."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{text!r}: expected auto or a number of replicas") from None


def parse_class_iou(texts: list[str]) -> list:
    """['cat', '0.5'] -> ['cat', 0.5]: a class and an IoU threshold."""
    cls, threshold = texts
    try:
        return [cls, float(threshold)]
    except ValueError:
        raise ConfigError(f"IOU {threshold!r} is not a number") from None


def parse_height_width(texts: list[str]) -> list[int]:
    """['10000', '12000'] -> [10000, 12000]: a height and a width in pixels."""
    try:
        values = [int(t) for t in texts]
    except ValueError:
        raise ConfigError(f"expected H W in pixels, got {' '.join(texts)!r}") from None
    if min(values) < 16:
        raise ConfigError(f"a raster of {values[0]}x{values[1]} is too small; use at least 16 16")
    return values


def parse_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '256x320' -> (256, 320) as (height, width)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"size {text!r}: expected H or HxW, e.g. 256 or 256x320") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ConfigError(f"size {text!r}: expected H or HxW with positive integers")
    return sizes[0], sizes[1]


def load_file(uri: str) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file, local or on S3.

    Every error names the file (and the line, where YAML has one).

    Raises:
        FileNotFoundError: no file at ``uri``.
        ConfigError: the file is not UTF-8, not YAML, uses what a config file
            does not need (anchors, aliases, tags, a key given twice), or does
            not hold a mapping.
    """
    from segray import storage

    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {uri}: no such file") from None
    except OSError as e:
        raise ConfigError(f"config file {uri}: cannot be read ({e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"config file {uri}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}, offset {e.start}); save it as UTF-8"
        ) from None
    data = load_yaml(text, f"config file {uri}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {uri}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def load_yaml(text: str, source: str) -> Any:
    """``text`` parsed as YAML without anchors, aliases, tags or duplicate keys.

    A config needs none of them, and an alias can expand a few hundred bytes
    into billions of values (nine levels of ``&a [*b, *b, ...]`` took 3.6 GB
    before failing). They are refused while the document is composed, before
    anything is expanded.

    Args:
        source: what the text is (``config file run.yaml``), the start of every message.

    Raises:
        ConfigError: ``source``, the line and column, and what is wrong.
    """
    import yaml

    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = "; ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(f"{source}{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e})") from None


def _strict_loader():
    """A ``yaml.SafeLoader`` subclass that refuses anchors, aliases and tags as it composes, and keys given twice."""
    import yaml

    def refuse(event, what: str):
        return yaml.composer.ComposerError(None, None, f"{what} refused: config values are plain YAML; write each value out", event.start_mark)

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise refuse(event, f"alias *{event.anchor}")
            if getattr(event, "anchor", None) is not None:
                raise refuse(event, f"anchor &{event.anchor}")
            if getattr(event, "tag", None) is not None:
                raise refuse(event, f"tag {event.tag.replace('tag:yaml.org,2002:', '!!')}")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = first_line.get(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, "a key must be a plain name, not a list or mapping", key_node.start_mark
                    ) from None
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key)} is given twice (first on line {first}); give it once", key_node.start_mark
                    )
                first_line[key] = line
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


class Config:
    """Base of the job configs: type checks on construction, ``validate``, dict round trip.

    Every construction (keyword arguments in a notebook, ``from_dict`` of a
    YAML file or of flags) runs the same checks: the strict type check of
    each field, then the class's ``validate``.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            try:
                value = _check(f.name, getattr(self, f.name), hints[f.name])
            except ConfigError as e:
                raise ConfigError(str(e), field=f.name) from None
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks values beyond their types; raises ConfigError naming the field."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Strict: unknown keys and wrong types raise ConfigError naming the key."""
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that ``from_dict`` turns back into an equal config."""
        return to_dict(self)


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive, got {shown(value)}", field=name)


def _uri(cfg: Any, *names: str) -> None:
    """Checks URI fields; a local path becomes absolute, so Ray workers (whatever their folder) find it."""
    from segray.storage import absolute, check_uri

    for name in names:
        value = getattr(cfg, name)
        if not value:
            raise ConfigError(f"{name}: expected a path or a storage URI, got {shown(value)}", field=name)
        try:
            check_uri(value)
        except ValueError as e:
            raise ConfigError(f"{name} {e}", field=name) from None
        object.__setattr__(cfg, name, absolute(value))


def _mlflow(cfg: Any) -> None:
    """``mlflow`` (a tracking URI) carries no credentials: they come from MLflow's own variables, never a config."""
    from urllib.parse import urlsplit

    if cfg.mlflow is not None:
        if not cfg.mlflow.strip():
            raise ConfigError("mlflow: expected a tracking URI (http://host:5000, sqlite:///mlflow.db, file:///path), got ''", field="mlflow")
        parts = urlsplit(cfg.mlflow)
        if parts.username or parts.password:
            # Not echoed: the value holds a secret.
            raise ConfigError(
                "mlflow: the tracking URI holds a user name or password; give them in MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead, so no config or log records them",
                field="mlflow",
            )
    if not cfg.mlflow_experiment.strip():
        raise ConfigError("mlflow_experiment: expected an experiment name, got ''", field="mlflow_experiment")
    import importlib.util
    import os

    if (cfg.mlflow or os.environ.get("MLFLOW_TRACKING_URI")) and importlib.util.find_spec("mlflow") is None:
        # Refused before the job claims anything (a run name, an OUT), not after.
        source = "mlflow" if cfg.mlflow else "MLFLOW_TRACKING_URI"
        raise ConfigError(f"mlflow: tracking is on ({source} is set) but the mlflow package is not installed: "
                          "pip install 'segray[mlflow]', or unset it", field="mlflow")


def _model_uri(cfg: Any, name: str) -> None:
    """A run or model field: a path or storage URI (``_uri``), or a registered model ``models:/NAME/VERSION`` / ``models:/NAME@ALIAS``."""
    value = getattr(cfg, name)
    if isinstance(value, str) and value.startswith("models:/"):
        import re

        if not re.match(r"^models:/[^/@]+(/\d+|@[\w-]+)$", value):
            raise ConfigError(f"{name} {shown(value)}: expected models:/NAME/VERSION or models:/NAME@ALIAS", field=name)
        return
    _uri(cfg, name)


def _hw(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    if value is not None and (len(value) != 2 or min(value) <= 0):
        raise ConfigError(f"{name}: expected [H, W] with positive integers, got {shown(value)}", field=name)


def _plain_name(cfg: Any, what: str) -> None:
    """``cfg.name`` names one folder beneath ``cfg.storage``: a run or a search."""
    name = cfg.name
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"name {shown(name)}: expected a plain {what} name (no '/', not '.' or '..')", field="name")


def _layout_options(cfg: Any, where: str) -> None:
    """The per-class options of predict and evaluate: only with ``layout`` per-class."""
    if cfg.layout != "per-class":
        for name in ("class_order", "priority"):
            if getattr(cfg, name):
                raise ConfigError(f"{name} is for the per-class layout; set `layout` per-class to read `{where}` that way", field=name)
        if cfg.images_dir != "images":
            raise ConfigError(f"images_dir is for the per-class layout; set `layout` per-class to read `{where}` that way", field="images_dir")
    if cfg.classes:
        _uri(cfg, "classes")


@dataclass(frozen=True)
class IngestConfig(Config):
    """What ``segray ingest`` checks and writes.

    Attributes:
        source: the raw dataset, a local folder or a storage URI (``segray.storage``).
        destination: where the Parquet shards and ``dataset.json`` go.
        layout: ``ids``, ``palette``, ``per-class`` or ``voc`` (see the README).
        val_fraction: share of ids in the val split: exactly
            ``round(val_fraction x N)`` of the N listed pairs (at least 1 when
            above 0 and N >= 2, at most N - 1), those of lowest stable hash.
        val_ids: a file of image ids, one a line: these are the val split
            (``val_fraction`` is then not used).
        split_seed: salts the hash that ranks ids for the split (0: the plain
            hash); another seed draws another split of the same size.
        shard_mb: target shard size in MB of source bytes.
        classes: a classes.json (default ``SOURCE/classes.json`` when present).
        num_classes: ``ids`` or ``voc`` without classes.json: declare C classes.
        class_order: ``per-class``: class folders in id order (ids 1..K).
        priority: ``per-class``: overlap priority, the first listed wins.
        images_dir: ``per-class``: the folder of images.
        overwrite: replace DESTINATION if segray ingested it before.
        max_pixels: an image or mask with more pixels (by its header) is set
            aside before it is decoded.
        task: ``instance`` (objects) or ``semantic`` (classes); None: from
            the layout (``coco``, ``instance-ids`` and ``per-instance`` are
            instance layouts). ``instance`` with the default layout ``ids``
            reads ``instance-ids``.
        max_instances: instance datasets: an image with more objects is set aside.
    """

    source: str = flag(positional=True, help="raw dataset: local folder or a bucket URI (s3, gs, az)")
    destination: str = flag(positional=True, help="where the ingested dataset goes")
    layout: Literal["ids", "palette", "per-class", "voc", "coco", "instance-ids", "per-instance"] = flag(
        "ids", help="voc: PASCAL VOC's JPEGImages/ and SegmentationClass/ (default ids)")
    task: Literal["semantic", "instance"] | None = flag(
        None, help="instance: objects, not only classes (default: from the layout; with layout ids it reads instance-ids)")
    max_instances: int = flag(256, help="instance: images with more objects are set aside (default 256)")
    val_fraction: float = flag(0.1, help="share of images in val: exactly round(F x N), by hash rank (default 0.1)")
    val_ids: str | None = flag(None, help="file of image ids, one a line: these are the val split (pins it; --val-fraction is not used)")
    split_seed: int = flag(0, help="draw another split of the same size (default 0)")
    shard_mb: float = flag(128.0, help="target shard size in MB of source bytes")
    classes: str | None = flag(None, help="classes.json (default SOURCE/classes.json)")
    num_classes: int | None = flag(None, help="ids or voc without classes.json or class_names.txt: declare C classes")
    class_order: list[str] | None = flag(None, parse=parse_names, help="per-class: class folders in id order (ids 1..K)")
    priority: list[str] | None = flag(None, parse=parse_names, help="per-class: overlap priority, first wins")
    images_dir: str = flag("images", help="per-class: folder of images (default images)")
    overwrite: bool = flag(False, help="replace DESTINATION if segray ingested it (only the files it wrote)")
    max_pixels: int = flag(DEFAULT_MAX_PIXELS, help="set aside images larger than this (by their header) before decoding")

    def validate(self) -> None:
        _positive(self, "max_pixels")
        _uri(self, "source", "destination")
        if self.classes:
            _uri(self, "classes")
        if self.val_ids:
            _uri(self, "val_ids")
        if self.split_seed < 0:
            raise ConfigError(f"split_seed must be 0 or more, got {self.split_seed}", field="split_seed")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}", field="val_fraction")
        _positive(self, "shard_mb", "num_classes", "max_instances")
        if self.max_instances > 65535:
            raise ConfigError(f"max_instances must be at most 65535 (instance maps are 16-bit), got {self.max_instances}", field="max_instances")
        layout_task = "instance" if self.layout in INSTANCE_LAYOUTS else "semantic"
        if self.task and self.task != layout_task and not (self.task == "instance" and self.layout == "ids"):
            raise ConfigError(f"task {self.task} does not go with layout {self.layout} (a{'n' if layout_task == 'instance' else ''} {layout_task} layout); "
                              f"instance layouts: {', '.join(INSTANCE_LAYOUTS)}", field="task")

    @property
    def instance_layout(self) -> str | None:
        """The instance layout this ingest reads, or None for a semantic one."""
        if self.layout in INSTANCE_LAYOUTS:
            return self.layout
        return "instance-ids" if self.task == "instance" else None


# Raw layouts of instance datasets (segray/data/instance_layouts.py).
INSTANCE_LAYOUTS = ("coco", "instance-ids", "per-instance")

# What TrainConfig.augment_set may hold (see segray/data/transforms.py).
AUGMENTATIONS = ("flip", "rot90", "scale", "brightness", "contrast", "rotate", "elastic", "gamma", "noise", "blur")
BASIC_AUGMENTATIONS = AUGMENTATIONS[:5]


def parse_duration(text: str | float | int) -> float:
    """'30m' -> 1800.0, '90s' -> 90.0, '1.5h' -> 5400.0, '45' (seconds) -> 45.0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        t = str(text).strip().lower()
        unit = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
        try:
            value = float(t[:-1] if unit else t) * (unit or 1)
        except ValueError:
            raise ConfigError(f"duration {text!r}: expected seconds or a number with s, m or h, e.g. 90s, 30m, 1.5h") from None
    if value <= 0:
        raise ConfigError(f"duration {text!r}: must be positive")
    return value


@dataclass(frozen=True)
class PlanConfig(Config):
    """What ``segray plan`` fingerprints and for which budget.

    Attributes:
        data: an ingested dataset (holds dataset.json).
        time_budget: training seconds to plan for (None: 30 minutes).
        gpu: plan for GPU workers.
        output: where plan.json goes (default ``DATA/plan.json``).
        max_images: train images decoded for the fingerprint at most.
    """

    data: str = flag(positional=True, help="an ingested dataset (local or a bucket URI)")
    time_budget: float | None = flag(None, parse=parse_duration, help="training time to plan for (90s, 30m, 1.5h; default 30m)")
    gpu: bool = flag(False, help="plan for GPU workers")
    output: str | None = flag(None, aliases=("--out",), help="where plan.json goes (default DATA/plan.json)")
    max_images: int = flag(64, help="train images decoded for the fingerprint at most (default 64)")

    def validate(self) -> None:
        _uri(self, "data")
        if self.output:
            _uri(self, "output")
        _positive(self, "time_budget", "max_images")


def field_defaults(cls) -> dict[str, Any]:
    """A config class's fields that have a plain default, with it (fields built by a factory are left out)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@dataclass(frozen=True)
class TrainConfig(Config):
    """What ``segray train`` runs; ``to_dict`` of it travels to every worker.

    Attributes:
        data: an ingested dataset (holds dataset.json).
        storage: where runs live; the run goes to ``STORAGE/NAME``.
        name: the run's name, without '/'.
        model: a registered model name (``segray models``), or ``MODULE:NAME``
            of a model that module adds with ``segray.models.registry.register``.
        batch_size: images per step per worker.
        workers: Ray Train workers; ``cpus_per_worker`` CPUs each, one GPU each with ``gpu``.
        mixed_precision: compute in float16 with loss scaling on GPUs, in
            bfloat16 on CPUs that have bfloat16 instructions (AVX-512 BF16,
            AMX; float32 on others, with a warning); weights, losses and the
            saved model stay float32.
        loss: ``ce`` or ``ce+dice`` (``dice_weight`` times soft Dice).
        class_weights: ``auto`` (inverse square root of frequency), ``none``
            or one weight per class.
        size: ``[H, W]`` images are resized to; None: the dataset's own size, else 256x256.
        crop: ``[H, W]`` random training crops after resizing.
        patience: early stopping after this many epochs without a better val mIoU (0: off).
        keep_checkpoints: checkpoints kept, best by val mIoU (plus the latest).
        max_failures: worker failures the run recovers from.
        resume: continue the run NAME from its last checkpoint.
        model_options: keyword options of the model builder (``depth``, ``width`` ...).
        augment_strength: scales the augmentation's magnitudes (scale range,
            brightness, contrast); 1 is the default, 0 leaves flips and rotations only.
        augment_set: the augmentations drawn, of ``AUGMENTATIONS``; the default is
            the first five. ``rot90`` also turns on vertical flips.
        patches_per_image: with ``crop``: patches cut from each image per epoch.
        foreground_oversample: with ``crop``: share of patches centred on a
            pixel of a class (other than class 0) chosen at random among those
            present in the image (nnU-Net oversamples a third).
        oversample_classes: which present class an oversampled patch centres
            on: ``uniform`` (each alike, nnU-Net) or ``rare`` (weighted by the
            inverse square root of the class's train pixel frequency, from
            dataset.json: rarer classes more often).
        optimizer: ``adam``, or ``sgd`` (Nesterov momentum 0.99, nnU-Net's).
        warmup: share of training (of the steps, or of ``time_budget``) over
            which the learning rate rises linearly from 0.
        time_budget: seconds of training; stops cleanly (a last validation,
            the best model kept) when the next step would pass it.
        deep_supervision: for models whose registry entry has decoder levels
            to supervise (the U-Net): also train 1x1 heads on the decoder at
            1/2 and 1/4 of the size against nearest-downsampled masks, the loss
            weighted 4:2:1 from full size down (nnU-Net); the heads are for
            training only and not part of the saved model.
        plan: set by ``segray.training.config_from``: the plan followed, the
            fields it set and those given over it ({} when no plan was used).
    """

    data: str = flag(help="ingested dataset (local or a bucket URI); required")
    storage: str = flag(help="where runs live (local or a bucket URI); required")
    name: str = flag(help="run name: results go to STORAGE/NAME; required")
    model: str = flag("unet", help="model name (see `segray models`)")
    epochs: int = flag(10, resumable=True)
    batch_size: int = flag(8, help="per worker")
    lr: float = flag(1e-3)
    workers: int = flag(2)
    gpu: bool = flag(False, help="one GPU per worker")
    cpus_per_worker: int = flag(1)
    mixed_precision: bool = flag(
        False, negatable=True,
        help="float16 with loss scaling on GPUs, bfloat16 on CPUs with bfloat16 instructions (the plan keeps float32)")
    xla: bool = flag(False, help="compile the train step with XLA")
    loss: Literal["ce", "ce+dice"] = flag("ce")
    dice_weight: float = flag(1.0, help="weight of the Dice term with --loss ce+dice")
    class_weights: str | list[float] = flag("none", parse=parse_class_weights, help="auto, none or w0,w1,...")
    size: list[int] | None = flag(None, parse=parse_hw, help="resize to H or HxW (default: the dataset's size, else 256)")
    crop: list[int] | None = flag(None, parse=parse_hw, help="train on random crops of H or HxW")
    augment: bool = flag(True, negatable=True, help="flips, rotations, scale, brightness (default on)")
    augment_strength: float = flag(1.0, help="scales the augmentation's magnitudes (default 1; 0: flips and rotations only)")
    augment_set: list[str] = flag(default_factory=lambda: list(BASIC_AUGMENTATIONS), parse=parse_names,
                                  help="augmentations, comma-separated: " + ",".join(AUGMENTATIONS))
    patches_per_image: int = flag(1, help="with --crop: patches cut from each image per epoch")
    foreground_oversample: float = flag(0.0, help="with --crop: share of patches centred on a present class")
    oversample_classes: Literal["uniform", "rare"] = flag(
        "uniform", help="the present class such a patch centres on: each alike, or rarer classes more often")
    optimizer: Literal["adam", "sgd"] = flag("adam")
    schedule: Literal["cosine", "plateau", "constant", "poly"] = flag("cosine")
    warmup: float = flag(0.0, help="share of training with a linear learning-rate warm-up (poly)")
    time_budget: float | None = flag(None, parse=parse_duration, resumable=True,
                                     help="stop training cleanly after this long (90s, 30m, 1.5h)")
    patience: int = flag(0, resumable=True, help="early stopping on val mIoU after N epochs without gain (0: off)")
    keep_checkpoints: int = flag(2, aliases=("--keep",), help="checkpoints kept, best by val mIoU")
    max_failures: int = flag(2, resumable=True, help="worker failures to recover from")
    seed: int = flag(0)
    resume: bool = flag(False, resumable=True, help="continue the run NAME from its last checkpoint")
    model_options: dict[str, Any] = flag(default_factory=dict, parse=parse_key_value, collect=dict, aliases=("--model-option",),
                                         help="KEY=VALUE for the model builder (repeat)")
    deep_supervision: bool = flag(
        False, negatable=True,
        help="U-Net: also train heads at 1/2 and 1/4 of the size (training only; planned for depth 3 or more)")
    mlflow: str | None = flag(None, resumable=True, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI; unset: no tracking)")
    mlflow_experiment: str = flag("segray", resumable=True, help="MLflow experiment the run goes to (default segray)")
    plan: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _uri(self, "data", "storage")
        _mlflow(self)
        if self.deep_supervision:
            _deep_supervision_model(self.model)
        _positive(self, "epochs", "batch_size", "workers", "cpus_per_worker", "lr", "keep_checkpoints", "patches_per_image", "time_budget")
        unknown = [a for a in self.augment_set if a not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"augment_set: unknown augmentation(s) {', '.join(unknown)}; known: {', '.join(AUGMENTATIONS)}", field="augment_set")
        for name in ("foreground_oversample", "warmup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be a share in [0, 1], got {getattr(self, name)!r}", field=name)
        _plain_name(self, "run")
        if isinstance(self.class_weights, str) and self.class_weights not in ("auto", "none"):
            raise ConfigError(f"class_weights {shown(self.class_weights)}: expected auto, none or w0,w1,...", field="class_weights")
        for name in ("size", "crop"):
            _hw(self, name)
        for name in ("patience", "max_failures", "dice_weight", "augment_strength"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)!r}", field=name)
        if self.xla and self.workers > 1 and not self.gpu:
            # The gradient all-reduce sits inside the compiled step (tensorflow b/194942685).
            raise ConfigError(
                f"xla with `workers` {self.workers} on CPU: TensorFlow does not compile collectives for CPU devices; "
                "use `workers` 1, add `gpu`, or drop `xla`",
                field="xla",
            )


def _deep_supervision_model(model: str) -> None:
    """Raises ConfigError unless ``model``'s registry entry says it takes deep supervision heads."""
    # Only here: the registry imports Keras.
    from segray.models import available, spec

    try:
        entry = spec(model)
    except ValueError as e:
        raise ConfigError(str(e), field="model") from None
    if entry.deep_supervision is None:
        takes = [n for n in available() if spec(n).deep_supervision is not None]
        raise ConfigError(
            f"deep_supervision: model {model!r} has no decoder levels to supervise; models that have: {', '.join(takes)}",
            field="deep_supervision",
        )


@dataclass(frozen=True)
class TuneConfig(Config):
    """What ``segray tune`` searches: trials of ``segray train`` on Ray Tune, poor ones stopped early.

    Attributes:
        data: an ingested dataset (holds dataset.json).
        storage: where searches live; the search goes to ``STORAGE/NAME``
            (each trial's run to ``STORAGE/NAME/runs/TRIAL``).
        name: the search's name, without '/'.
        trials: trials sampled from the space (each grid value is tried this many times).
        time_budget: seconds after which the search stops, running trials included; None: no limit.
        search_space: a YAML file of the space (see ``segray.tune.space``); None: the default space.
        workers_per_trial: Ray Train workers of each trial.
        cpus_per_worker: CPUs each worker reserves.
        gpu: one GPU per worker.
        max_concurrent: trials at once; None: as many as the CPUs (GPUs) hold.
        epochs: epochs of a trial that is never stopped (ASHA's max_t).
        grace_epochs: epochs every trial runs before it may be stopped.
        reduction_factor: ASHA keeps the best 1 / reduction_factor of trials at each rung.
        seed: seeds the sampling of the space (the same seed samples the same trials).
        resume: continue the search NAME after its driver stopped; finished trials stay done.
    """

    data: str = flag(help="ingested dataset (local or a bucket URI); required")
    storage: str = flag(help="where searches live (local or a bucket URI); required")
    name: str = flag(help="search name: results go to STORAGE/NAME; required")
    trials: int = flag(8, help="trials sampled from the space (each grid value this many times)")
    time_budget: float | None = flag(None, parse=parse_duration, help="stop the search after this long: seconds, or 30m, 2h")
    search_space: str | None = flag(None, help="YAML file of the space (default: lr, loss, class weights, model, width, augment strength)")
    workers_per_trial: int = flag(1, help="Ray Train workers of each trial")
    cpus_per_worker: int = flag(1)
    gpu: bool = flag(False, help="one GPU per worker")
    max_concurrent: int | None = flag(None, help="trials at once (default: as many as the CPUs hold)")
    epochs: int = flag(10, help="epochs of a trial that is never stopped")
    grace_epochs: int = flag(1, help="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = flag(2.0, help="ASHA keeps the best 1/F of trials at each rung")
    seed: int = flag(0, help="seeds the sampling of the space")
    resume: bool = flag(False, help="continue the search NAME; finished trials are not run again")
    mlflow: str | None = flag(None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI; unset: no tracking)")
    mlflow_experiment: str = flag("segray", help="MLflow experiment the run goes to (default segray)")

    def validate(self) -> None:
        _uri(self, "data", "storage")
        _mlflow(self)
        if self.search_space is not None:
            _uri(self, "search_space")
        _positive(self, "trials", "time_budget", "workers_per_trial", "cpus_per_worker", "max_concurrent", "epochs", "grace_epochs")
        _plain_name(self, "search")
        if self.grace_epochs > self.epochs:
            raise ConfigError(f"grace_epochs {self.grace_epochs} is above `epochs` {self.epochs}", field="grace_epochs")
        if self.reduction_factor <= 1:
            raise ConfigError(f"reduction_factor must be above 1, got {self.reduction_factor!r}", field="reduction_factor")


@dataclass(frozen=True)
class PredictConfig(Config):
    """What ``segray predict`` was asked to do.

    Attributes:
        model: a training run (``STORAGE/RUN``, holding ``model/model.keras``
            and ``model/preprocessing.json``), its ``model/`` folder, or a
            ``.keras`` file (``preprocessing.json`` beside it is used when present).
        input: a raw layout (``images/`` with or without ``masks/``), a folder
            of Parquet shards (``DATA/val``), or an ingested dataset with ``split``.
        output: where masks, overlays and tables go (local or a storage URI).
        batch_size: images per model call; windows per call with ``tile``.
        workers: predictor actors (``ActorPoolStrategy(size=workers)``).
        gpus_per_worker: GPUs per actor; 0 predicts on CPUs.
        tile: ``[H, W]`` sliding window at each image's own resolution, for
            images too large to predict whole; None: the model's own
            ``window`` (``preprocessing.json``, a patch-trained model) slides
            over each image (fitted to its ``size`` first, if any), else whole
            (or fitted) images.
        overlap: with a window, the fraction of the window shared by
            neighbouring windows (0 <= overlap <= 0.9), per axis.
        weighting: how overlapping windows' logits are blended: ``gaussian``
            (sigma 1/8 of the window, nnU-Net's) or ``linear`` (ramps across
            the middle half of each overlap).
        tta: test-time augmentation: ``none``, ``flip`` (logits averaged over
            4 mirrored views) or ``flip8`` (and their transposes; needs a
            square model input).
        min_component: foreground components smaller than this many pixels
            (8-connected, per class) become background (class 0); 0: off.
        overlays: colour overlays for the first K images by id (0: none).
        split: the split of an ingested dataset (``val``, ``train``).
        max_pixels: an image with more pixels (by its header) is set aside
            before it is decoded.
        backend: ``tensorflow`` runs the Keras model; ``onnxruntime`` runs it
            converted to ONNX on the driver (``segray export``'s converter),
            CPU only.
        layout: read ``input`` as a raw folder of this layout (``ids``,
            ``palette``, ``per-class``, ``voc``: see ``IngestConfig``), images and
            truth masks straight from it, with ingest's quarantine rules;
            None: a raw ``ids`` folder (masks optional) or ingested data.
        classes: ``palette`` (and ``ids``): the classes.json (default ``INPUT/classes.json``).
        class_order: ``per-class``: class folders in id order; default the
            model's classes. Must give the model's classes, in its order.
        priority: ``per-class``: overlap priority, first wins; default the
            model's (recorded at training), else ``class_order``.
        images_dir: ``per-class``: the folder of images.
        chunk: raster inputs (``segray.inference.rasters``): the side of an
            output chunk, the unit of work and of resume.
        truth: raster inputs: the truth raster, or a folder of rasters named as the inputs.
        mask_format: raster inputs: ``ome-zarr`` (``masks/<id>.ome.zarr``) or
            ``tiff`` (a tiled pyramidal BigTIFF ``masks/<id>.ome.tif``).
    """

    model: str = flag(help="a training run (STORAGE/RUN), a search (STORAGE/NAME: its best trial) or a .keras file; required")
    input: str = flag(help="raw layout (images/ [+ masks/]) or an ingested split, local or a bucket URI; required")
    output: str = flag(help="where masks and tables go; required")
    split: str | None = flag(None, help="with an ingested dataset as --input: the split (train, val, or all)")
    batch_size: int = flag(8)
    workers: int = flag(1, help="predictor actors")
    gpus_per_worker: float = flag(0.0)
    tile: list[int] | None = flag(
        None, parse=parse_hw, help="sliding window H or HxW for large images (default: the model's training window, if any)")
    overlap: float = flag(0.5, help="with a window: fraction shared by neighbouring windows")
    overlays: int = flag(8, help="colour overlays for the first K images")
    max_pixels: int = flag(DEFAULT_MAX_PIXELS, help="set aside images larger than this (by their header) before decoding")
    backend: Literal["tensorflow", "onnxruntime"] = flag("tensorflow", help="run the Keras model, or its ONNX conversion on CPUs")
    weighting: Literal["gaussian", "linear"] = flag("gaussian", help="how overlapping windows' logits are blended")
    tta: Literal["none", "flip", "flip8"] = flag(
        "none", help="average logits over 4 mirrored views (flip) or 8 with transposes (flip8)")
    min_component: int = flag(0, help="set foreground components under N pixels to background (0: off)")
    layout: Literal["ids", "palette", "per-class", "voc"] | None = flag(
        None, help="read --input as a raw folder of this layout, truth masks included (as ingest reads it)")
    classes: str | None = flag(None, help="palette (and ids): classes.json (default INPUT/classes.json)")
    class_order: list[str] | None = flag(
        None, parse=parse_names, help="per-class: class folders in id order (default: the model's classes; must match them)")
    priority: list[str] | None = flag(
        None, parse=parse_names, help="per-class: overlap priority, first wins (default: the model's; must match it)")
    images_dir: str = flag("images", help="per-class: folder of images (default images)")
    chunk: int = flag(2048, help="raster inputs (TIFF/Zarr): output chunk side, the unit of work and of resume (default 2048)")
    truth: str | None = flag(None, help="raster inputs: the truth raster, or a folder of them named as the inputs")
    mask_format: Literal["ome-zarr", "tiff"] = flag("ome-zarr", help="raster inputs: masks as OME-Zarr, or tiled pyramidal BigTIFF")
    mlflow: str | None = flag(None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI; unset: no tracking)")
    mlflow_experiment: str = flag("segray", help="MLflow experiment the run goes to (default segray)")

    def validate(self) -> None:
        _positive(self, "max_pixels")
        _positive(self, "chunk")
        if self.truth is not None:
            _uri(self, "truth")
        _mlflow(self)
        _model_uri(self, "model")
        _uri(self, "input", "output")
        _layout_options(self, "input")
        if self.layout is not None and self.split is not None:
            raise ConfigError(f"split {self.split!r} is for an ingested dataset; with `layout` {self.layout} the input is read as a raw folder", field="split")
        if self.classes and self.split is not None:
            raise ConfigError("classes is for a raw input; an ingested dataset's classes are in its dataset.json", field="classes")
        _positive(self, "batch_size", "workers")
        for name in ("overlays", "gpus_per_worker", "min_component"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)!r}", field=name)
        if not 0.0 <= self.overlap <= 0.9:
            raise ConfigError(f"overlap must be a fraction of the tile in [0, 0.9], got {self.overlap!r}", field="overlap")
        _hw(self, "tile")
        if self.split is not None and (not self.split or "/" in self.split):
            raise ConfigError(f"split: expected a split name such as val, got {shown(self.split)}", field="split")
        if self.backend == "onnxruntime" and self.gpus_per_worker > 0:
            raise ConfigError(
                f"backend onnxruntime runs on CPUs; `gpus_per_worker` {self.gpus_per_worker:g} needs `backend` tensorflow",
                field="backend",
            )


@dataclass(frozen=True)
class EvaluateConfig(Config):
    """What ``segray evaluate`` scores.

    Attributes:
        pred: a folder of ``<id>.png`` predicted class-id masks (e.g. predict's OUT/masks).
        truth: a folder of ``<id>.png`` truth class-id masks (255: ignored).
        output: where the tables go.
        classes: a classes.json naming the classes; default ``class_0 .. class_{C-1}``
            with C = 1 + the largest id found (with ``layout``: the layout's
            classes; ``palette`` reads its colours from it, default ``TRUTH/classes.json``).
        layout: read ``truth`` as a raw folder of this layout (``ids``,
            ``palette``, ``per-class``), its masks paired with the images by
            id as ingest pairs them; None: a folder of class-id masks.
        class_order: ``per-class``: class folders in id order; default the
            classes of the predict output ``pred`` belongs to, else the folders sorted.
        priority: ``per-class``: overlap priority, first wins; default that
            output's model's, else ``class_order``.
        images_dir: ``per-class``: the folder of images.
        task: ``instance``: ``pred`` holds 16-bit ``<id>.png`` instance-id maps
            (predict's ``OUT/instances``; its ``instances.parquet`` gives each
            object's class and score, else every object is class 1 with score 1)
            scored against truth objects with mask AP / PQ
            (``segray.inference.instance_evaluation``). None: ``instance`` when
            ``instance_layout`` is given, ``truth`` is an ingested instance
            dataset, or ``pred`` is a predict's ``instances/`` folder.
        instance_layout: ``instance``: read ``truth`` as a raw folder of this
            layout (``coco``, ``instance-ids``, ``per-instance``, as ingest reads
            it); None: an ingested instance dataset, else inferred from what
            ``truth`` holds (``annotations.json``: coco; ``instances/``: instance-ids).
        split: ``instance`` with an ingested dataset as ``truth``: its split;
            default the split the predict output ``pred`` belongs to was made from.
    """

    pred: str = flag(help="folder of predicted <id>.png class-id masks; required")
    truth: str = flag(help="folder of true <id>.png class-id masks; required")
    output: str = flag(help="where the tables go; required")
    classes: str | None = flag(None, help="classes.json (default: class_0.., or the layout's classes)")
    layout: Literal["ids", "palette", "per-class", "voc"] | None = flag(
        None, help="read --truth as a raw folder of this layout, truth masks included (as ingest reads it)")
    class_order: list[str] | None = flag(
        None, parse=parse_names,
        help="per-class: class folders in id order (default: the --pred output's model's classes; must match them)")
    priority: list[str] | None = flag(
        None, parse=parse_names, help="per-class: overlap priority, first wins (default: the --pred output's model's; must match it)")
    images_dir: str = flag("images", help="per-class: folder of images (default images)")
    task: Literal["semantic", "instance"] | None = flag(
        None, help="instance: --pred holds 16-bit instance-id maps (predict's OUT/instances, classes and scores from its "
                   "instances.parquet), scored by mask AP/PQ against truth objects; default: instance when --instance-layout "
                   "is given, --truth is an ingested instance dataset or --pred is a predict's instances/ folder")
    instance_layout: Literal["coco", "instance-ids", "per-instance"] | None = flag(
        None, help="instance: read --truth as a raw folder of this layout (default: an ingested dataset, or inferred from --truth: "
                   "annotations.json is coco, instances/ is instance-ids)")
    split: str | None = flag(None, help="instance, --truth an ingested dataset: its split (default: the one --pred's predict read)")
    mlflow: str | None = flag(None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI; unset: no tracking)")
    mlflow_experiment: str = flag("segray", help="MLflow experiment the run goes to (default segray)")

    def validate(self) -> None:
        _uri(self, "pred", "truth", "output")
        _mlflow(self)
        if self.classes:
            _uri(self, "classes")
        _layout_options(self, "truth")
        if self.task == "semantic" and (self.instance_layout or self.split):
            name = "instance_layout" if self.instance_layout else "split"
            raise ConfigError(f"{name} is for instance outputs; leave it out or set `task` instance", field=name)
        if self.layout is not None and (self.task == "instance" or self.instance_layout or self.split):
            raise ConfigError(
                f"layout {self.layout} reads semantic truth masks; for instance truth give `instance_layout` (coco, instance-ids, per-instance)",
                field="layout")
        if self.split is not None and (not self.split or "/" in self.split):
            raise ConfigError(f"split: expected a split name such as val, got {shown(self.split)}", field="split")


@dataclass(frozen=True)
class QueryConfig(Config):
    """What ``segray query`` asks of a predict (or evaluate) output.

    Exactly one of ``sql``, ``worst``, ``below`` and ``confused`` is given.

    Attributes:
        out: the output folder (local or a storage URI) holding the tables.
        sql: a DuckDB query over the views ``per_image``, ``per_class``,
            ``confusion``, ``errors`` and ``image_confusion``.
        worst: a class (name or id): its ``k`` images of lowest IoU.
        k: how many images ``worst`` lists.
        below: ``[CLASS, IOU]``: the images whose IoU for CLASS is below IOU.
        confused: ``[A, B]``: the images with the most pixels of truth A predicted as B.
        format: ``table`` (aligned text), ``csv`` or ``json`` on standard output.
        output: a ``.parquet``, ``.csv`` or ``.json`` file to write the result
            to instead: a new file, outside any predict or evaluate output.
        overwrite: replace ``output`` when it is a file segray wrote (its
            ``.NAME.segray.json`` sidecar holds its hash); any other file is refused.
    """

    out: str = flag(positional=True, help="a predict (or evaluate) output folder, local or a bucket URI")
    sql: str | None = flag(None, positional=True, help="a query over per_image, per_class, confusion, errors, image_confusion")
    worst: str | None = flag(None, metavar="CLASS", help="the --k images of lowest IoU for CLASS (name or id)")
    k: int = flag(10, help="images --worst lists (default 10)")
    below: tuple[str, float] | None = flag(None, nargs=2, metavar=("CLASS", "IOU"), parse=parse_class_iou,
                                           help="images whose IoU for CLASS is below IOU")
    confused: tuple[str, str] | None = flag(None, nargs=2, metavar=("A", "B"), help="images with the most pixels of truth A predicted as B")
    format: Literal["table", "csv", "json"] = flag("table", help="what to print (default an aligned table)")
    output: str | None = flag(None, help="write the result to a .parquet, .csv or .json file instead")
    overwrite: bool = flag(False, help="replace --output if segray wrote it (any other file is refused)")

    def validate(self) -> None:
        _uri(self, "out")
        asked = [name for name in ("sql", "worst", "below", "confused") if getattr(self, name) is not None]
        if len(asked) != 1:
            got = f"got {', '.join(f'`{n}`' for n in asked)}" if asked else "got none"
            raise ConfigError(f"sql: expected exactly one of SQL, `worst`, `below` or `confused`; {got}", field="sql")
        _positive(self, "k")
        if self.below is not None and not 0.0 <= self.below[1] <= 1.0:
            raise ConfigError(f"below: IOU must be in [0, 1], got {self.below[1]!r}", field="below")
        if self.output is not None:
            _uri(self, "output")
            if not self.output.lower().endswith((".parquet", ".csv", ".json")):
                raise ConfigError(f"output {self.output}: expected a file ending in .parquet, .csv or .json", field="output")


@dataclass(frozen=True)
class ReportConfig(Config):
    """What ``segray report`` puts in one self-contained HTML file.

    Attributes:
        out: the predict (or evaluate) output folder, local or a storage URI.
        run: the training run (``STORAGE/RUN``) whose curves to show, or None.
        output: the HTML file to write (local or a storage URI): a new file, outside
            any predict or evaluate output.
        worst: images shown per class, worst IoU first (0: none).
        overwrite: replace ``output`` when it is a report segray wrote (its
            ``.NAME.segray.json`` sidecar holds its hash); any other file is refused.
    """

    out: str = flag(positional=True, help="a predict (or evaluate) output folder, local or a bucket URI")
    run: str | None = flag(None, help="the training run (STORAGE/RUN) whose curves to show")
    output: str = flag("report.html", help="the .html file to write (default report.html)")
    worst: int = flag(12, help="image strips per class, worst IoU first (default 12)")
    overwrite: bool = flag(False, help="replace --output if segray wrote it (any other file is refused)")

    def validate(self) -> None:
        _uri(self, "out", "output")
        if self.run is not None:
            _uri(self, "run")
        if self.worst < 0:
            raise ConfigError(f"worst must be 0 or more, got {self.worst!r}", field="worst")
        if not self.output.lower().endswith((".html", ".htm")):
            raise ConfigError(f"output {self.output}: expected a file ending in .html", field="output")


@dataclass(frozen=True)
class ExportConfig(Config):
    """What ``segray export`` writes.

    Attributes:
        run: a training run (``STORAGE/RUN``), its ``model/`` folder or a ``.keras`` file.
        format: ``savedmodel``, ``onnx`` or ``keras``.
        output: a folder (local or a storage URI) that does not exist yet or is
            empty; the model and ``model_card.json`` go there.
        allow_unfinished: export a run that is still training, was killed or
            failed before its last epoch (refused otherwise); the card says
            how far it got and why it stopped.
    """

    run: str = flag(positional=True, help="a training run (STORAGE/RUN), its model/ folder or a .keras file")
    output: str = flag(help="a new or empty folder, local or a bucket URI; required")
    format: Literal["savedmodel", "onnx", "keras"] = flag("onnx")
    allow_unfinished: bool = flag(
        False, help="export a run still training, killed or failed before its last epoch (the card says so)")
    register: str | None = flag(None, metavar="NAME", help="also log the ONNX export as an MLflow pyfunc and register a new version of NAME")
    mlflow: str | None = flag(None, help="with --register: MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    mlflow_experiment: str = flag("segray", help="with --register: the experiment of the registering run (default segray)")

    def validate(self) -> None:
        _model_uri(self, "run")
        _uri(self, "output")
        _mlflow(self)
        if self.register is not None and self.format != "onnx":
            raise ConfigError(f"register wraps the ONNX export in an MLflow pyfunc; `format` is {self.format}, use onnx", field="register")


@dataclass(frozen=True)
class ServeConfig(Config):
    """What ``segray serve`` runs on Ray Serve.

    Attributes:
        run: a training run (``STORAGE/RUN``), its ``model/`` folder or a ``.keras`` file.
        host: the address the HTTP proxy binds (127.0.0.1: this machine only).
        port: its port.
        replicas: ``auto`` (autoscaling between ``min_replicas`` and
            ``max_replicas`` on ``target_ongoing_requests``) or a fixed count.
        max_batch: requests one model call takes at most (``@serve.batch``); 1 turns batching off.
        batch_wait_ms: how long a replica waits for a batch to fill.
        backend: ``onnxruntime`` (the model converted on start) or ``tensorflow``.
        replica_cpus: CPUs Ray reserves per replica (fractions allowed).
        max_pixels: larger images are refused (413) from their header, before decoding.
        max_body_mb: larger request bodies are refused (413) from their
            Content-Length, or as they arrive, before they are read whole
            (MiB; default: ``BODY_BYTES_PER_PIXEL`` bytes per pixel of
            ``max_pixels`` + 1 MiB, see ``max_body_bytes``).
        blocking: keep serving until interrupted (the CLI); False returns once it is up.
    """

    run: str = flag(positional=True, help="a training run (STORAGE/RUN), its model/ folder or a .keras file")
    host: str = flag("127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    port: int = flag(8000)
    replicas: str | int = flag("auto", parse=parse_replicas, help="auto (autoscaling) or a fixed count")
    min_replicas: int = flag(1, help="with --replicas auto")
    max_replicas: int = flag(2, help="with --replicas auto")
    target_ongoing_requests: float = flag(8.0, help="with --replicas auto: requests per replica to scale at")
    max_batch: int = flag(16, help="requests per model call at most (1: no batching)")
    batch_wait_ms: float = flag(5.0, help="how long a replica waits for a batch to fill")
    backend: Literal["tensorflow", "onnxruntime"] = flag("onnxruntime")
    replica_cpus: float = flag(0.5, help="CPUs reserved per replica")
    max_pixels: int = flag(25_000_000, help="refuse larger images (413) from their header")
    max_body_mb: float | None = flag(
        None, help="refuse larger request bodies (413) before reading them (MiB; default 4 bytes per pixel of --max-pixels + 1)")
    blocking: bool = True

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted: ``max_body_mb`` MiB, or room for an uncompressed RGBA image of ``max_pixels``."""
        if self.max_body_mb is not None:
            return int(self.max_body_mb * MIB)
        return self.max_pixels * BODY_BYTES_PER_PIXEL + MIB

    def validate(self) -> None:
        _model_uri(self, "run")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, got {self.port}", field="port")
        if isinstance(self.replicas, str) and self.replicas != "auto":
            raise ConfigError(f"replicas: expected auto or a positive count, got {shown(self.replicas)}", field="replicas")
        _positive(self, "min_replicas", "max_replicas", "max_batch", "target_ongoing_requests", "max_pixels", "max_body_mb")
        if isinstance(self.replicas, int) and self.replicas <= 0:
            raise ConfigError(f"replicas must be positive, got {self.replicas}", field="replicas")
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"min_replicas {self.min_replicas} is above `max_replicas` {self.max_replicas}", field="min_replicas")
        if self.batch_wait_ms < 0 or self.replica_cpus < 0:
            name = "batch_wait_ms" if self.batch_wait_ms < 0 else "replica_cpus"
            raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)!r}", field=name)
        if not self.host:
            raise ConfigError("host: expected an address such as 127.0.0.1", field="host")


@dataclass(frozen=True)
class SynthConfig(Config):
    """What ``segray synth`` writes: a synthetic dataset of shapes in the ids layout (``segray.data.synthesize``).

    Attributes:
        dst: the folder or storage URI to write to.
        n: image/mask pairs.
        size: ``[H, W]`` of each image.
        classes: classes including background.
        seed: seeds the shapes.
        task: ``instance``: objects with ids (``segray.data.synthesize_instances``).
        large: ``[H, W]``: instead of ``n`` pairs, one raster of that size
            (``DST/images/synth_HxW.ome.tif`` and ``DST/truth/...``,
            ``segray.data.rasters.write_synthetic_raster``).
    """

    dst: str = flag(positional=True, required=True, help="local folder or a bucket URI (s3, gs, az)")
    n: int = flag(100, help="number of image/mask pairs (default 100)")
    size: list[int] = flag(default_factory=lambda: [128, 128], parse=parse_hw, help="H or HxW (default 128)")
    classes: int = flag(4, help="classes including background (default 4)")
    seed: int = flag(0, help="default 0")
    task: Literal["semantic", "instance"] = flag(
        "semantic", help="instance: overlapping shapes, one id per object, in the instance-ids layout (default semantic)")
    large: list[int] | None = flag(None, nargs=2, metavar=("H", "W"), parse=parse_height_width,
                                   help="instead: one tiled OME-TIFF raster of H x W pixels and its truth, written tile by tile")


@dataclass(frozen=True)
class ModelsConfig(Config):
    """What ``segray models`` shows: the registry, one model's parameters and FLOPs, or a speed benchmark.

    Attributes:
        name: one model; None: all of them.
        size: ``[H, W]`` of the input for FLOPs and the benchmark.
        num_classes: output classes of the models built.
        benchmark: time the models (``segray.models.benchmark``).
        data: with ``benchmark``: an ingested dataset; each model of its task trains ``epochs`` on it for its
            val mIoU (an instance dataset: the instance models, for val mask AP50, AP and PQ).
        epochs: with ``data``: each model's training epochs.
        repeats: with ``benchmark``: timed batch-1 calls.
        output: with ``benchmark``: folder for speed_accuracy.parquet and .png.
    """

    name: str | None = flag(None, positional=True)
    size: list[int] = flag(default_factory=lambda: [256, 256], parse=parse_hw, help="H or HxW for FLOPs and the benchmark (default 256)")
    num_classes: int = flag(2, help="default 2")
    benchmark: bool = flag(False, help="params, GFLOPs, CPU latency p50/p95 and throughput per model (fp16 on a GPU)")
    data: str | None = flag(None, help="with --benchmark: an ingested dataset; adds val mIoU after --epochs of training")
    epochs: int = flag(3, help="with --data: the training budget of every model (default 3)")
    repeats: int = flag(20, help="with --benchmark: timed batch-1 calls (default 20)")
    output: str = flag(".", help="with --benchmark: folder for speed_accuracy.parquet and .png (default .)")


@dataclass(frozen=True)
class DemoConfig(Config):
    """What ``segray demo`` runs: the whole pipeline on a local synthetic dataset (``segray.demo.run_demo``).

    Attributes:
        dir: the working folder; an earlier demo's files there are replaced, anything else is refused.
        n: synthetic pairs.
        size: ``[H, W]`` of the images.
        epochs: training epochs.
    """

    dir: str = flag("segray-demo", help="working folder (default ./segray-demo; an earlier demo's files there are replaced, anything else is refused)")
    n: int = flag(96, help="synthetic pairs (default 96)")
    size: list[int] = flag(default_factory=lambda: [64, 64], parse=parse_hw, help="image size (default 64)")
    epochs: int = flag(8, help="training epochs (default 8)")


@dataclass(frozen=True)
class MlflowConfig(Config):
    """What ``segray mlflow sync FOLDER`` does: send what a tracked job could not send to its MLflow server.

    Attributes:
        operation: ``sync``.
        folder: a tracked training run or predict / evaluate output (with ``mlflow/run.json``).
        mlflow: send to this tracking URI instead of the one the job used (a new MLflow run there).
    """

    operation: Literal["sync"] = flag(positional=True, help="the operation: sync sends the records waiting in FOLDER/mlflow/pending.jsonl")
    folder: str = flag(positional=True, help="a tracked training run (STORAGE/RUN) or predict / evaluate output")
    mlflow: str | None = flag(None, help="send to this tracking URI instead of the one in FOLDER/mlflow/run.json")
    mlflow_experiment: str = flag("segray", help="with --mlflow: the experiment of the new run there")

    def validate(self) -> None:
        _uri(self, "folder")
        _mlflow(self)
