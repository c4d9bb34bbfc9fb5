"""Classes and the ``dataset.json`` that describes an ingested dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from segray import storage
from segray.config import ConfigError, from_dict, to_dict

IGNORE_INDEX = 255
DATASET_FORMAT = "segray-dataset/1"
TASKS = ("semantic", "instance")

# Distinct colours for overlays and palettes; class i takes colour i.
PALETTE = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (255, 215, 180), (0, 0, 128), (128, 128, 128),
]


def default_color(class_id: int) -> list[int]:
    if class_id < len(PALETTE):
        return list(PALETTE[class_id])
    # Beyond the table: a deterministic spread over the colour cube.
    return [(class_id * 97) % 256, (class_id * 57) % 256, (class_id * 199) % 256]


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    color: tuple[int, int, int] = (0, 0, 0)


def parse_classes(entries: Any, source: str) -> list[ClassInfo]:
    """Reads a classes.json list; ids must be unique and 0..254, or 255 for an ignore colour.

    Returns:
        The classes sorted by id, the entry with id 255 (if any) last.
    """
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: expected a non-empty list of {{id, name, color}} objects")
    classes = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and "color" not in entry and "id" in entry:
            entry = {**entry, "color": default_color(entry["id"])}
        try:
            c = from_dict(ClassInfo, entry, prefix=f"{source}[{i}].")
        except ConfigError as e:
            raise ConfigError(str(e)) from None
        if not 0 <= c.id <= 255:
            raise ConfigError(f"{source}[{i}]: class id {c.id} is outside 0..255")
        classes.append(c)
    ids = [c.id for c in classes]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: class ids repeat: {sorted(ids)}")
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: class names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    real = sorted(c.id for c in classes if c.id != IGNORE_INDEX)
    if real != list(range(len(real))):
        raise ConfigError(f"{source}: class ids must be 0..C-1 without gaps, got {real}")
    return sorted(classes, key=lambda c: c.id)


def load_classes(uri: str) -> list[ClassInfo]:
    try:
        entries = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{uri}: not valid JSON ({e})") from None
    return parse_classes(entries, uri)


@dataclass(frozen=True)
class DatasetInfo:
    """The contents of ``DST/dataset.json``."""

    classes: list[ClassInfo]
    splits: dict[str, int]
    pixel_counts: list[int]
    pixel_frequency: dict[str, float]
    mean: list[float]
    std: list[float]
    layout: str
    source: str
    command: str
    size: list[int] | None = None  # [H, W] when every image shares it
    channels: int = 3
    ignore_index: int = IGNORE_INDEX
    errors: int = 0
    priority: list[str] | None = None
    val_fraction: float = 0.1
    val_ids: list[str] | None = None  # the val split's ids (None in datasets ingested before they were recorded)
    format: str = DATASET_FORMAT
    task: str = "semantic"  # "instance": shards also hold instance maps and object classes
    objects: dict[str, Any] | None = None  # instance datasets: object statistics (segray.data.instance_ingest)
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved IngestConfig

    @property
    def num_classes(self) -> int:
        return sum(1 for c in self.classes if c.id != IGNORE_INDEX)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes if c.id != IGNORE_INDEX]

    def to_dict(self) -> dict[str, Any]:
        data = to_dict(self)
        data["num_classes"] = self.num_classes
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def describe(self, uri: str) -> str:
        """A few lines for a person: layout, classes, splits, statistics, a bar per class frequency."""
        size = "x".join(map(str, self.size)) if self.size else "varies"
        lines = [
            f"dataset: {uri}",
            f"  layout {self.layout}, {self.num_classes} classes, size {size}",
            "  splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()) + self._split_note() + f"; rejected inputs: {self.errors}",
            f"  mean {[round(x, 2) for x in self.mean]}  std {[round(x, 2) for x in self.std]}",
            "  pixel frequency (train):",
        ]
        width = max(len(n) for n in self.pixel_frequency)
        for name, freq in self.pixel_frequency.items():
            lines.append(f"    {name:<{width}}  {freq:7.2%}  {'#' * int(round(freq * 40))}")
        if self.objects:
            lines += describe_objects(self.objects)
        if self.priority:
            lines.append(f"  overlap priority (first wins): {', '.join(self.priority)}")
        survival = self.extra.get("layer_survival")
        if survival:
            lines.append("  share of each class layer's pixels kept after the overlap priority:")
            for name, s in survival.items():
                top = next(iter(s["covered_by"].items()), None)
                under = f"  (under {top[0]}: {top[1]:.2%})" if top else ""
                flag = "  <- under half kept" if s["layer_pixels"] and s["kept"] < 0.5 else ""
                lines.append(f"    {name:<{width}}  {s['kept']:7.2%} of {s['layer_pixels']:,}{under}{flag}")
        return "\n".join(lines)

    def _split_note(self) -> str:
        """How the split came out: the realised val share and the rule that made it."""
        split = self.extra.get("split")
        if not split:
            return ""
        total = sum(self.splits.values())
        share = self.splits.get("val", 0) / total if total else 0.0
        if split.get("rule") == "pinned":
            how = f"pinned by {split['val_ids_file']}"
            if split.get("pinned_missing"):
                how += f", {split['pinned_missing']} of its {split['pinned']} ids not in the source"
        else:
            f = split["fraction"]
            how = f"asked {f:g}: round({f:g} x {split['listed']}) = {split['assigned_val']} by hash rank"
            if split.get("seed"):
                how += f", seed {split['seed']}"
        short = split["assigned_val"] - self.splits.get("val", 0)
        if short > 0:
            how += f"; {short} val pair(s) rejected"
        return f" ({share:.1%} val; {how})"

    @classmethod
    def from_json(cls, text: str, source: str = "dataset.json") -> "DatasetInfo":
        """Parses and checks a ``dataset.json``; every problem raises ConfigError naming ``source`` and the field.

        Raises:
            ConfigError: not JSON, a missing, unknown or mistyped field, or
                values that contradict each other (classes vs frequencies,
                split counts, statistics).
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        declared = data.pop("num_classes", None)
        if "classes" not in data:
            raise ConfigError(f"{source}: classes is required")
        data["classes"] = parse_classes(data["classes"], f"{source}: classes")
        info = from_dict(cls, data, prefix=f"{source}: ")
        info.check(source, declared)
        return info

    def check(self, source: str, declared_classes: Any = None) -> None:
        """Values that must agree with each other; raises ConfigError naming the field."""
        if self.format != DATASET_FORMAT:
            raise ConfigError(f"{source}: format {self.format!r} is not {DATASET_FORMAT!r} (written by another tool or version?)")
        if declared_classes is not None and declared_classes != self.num_classes:
            raise ConfigError(f"{source}: num_classes is {declared_classes!r} but classes lists {self.num_classes}")
        for split, count in self.splits.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ConfigError(f"{source}: splits.{split} must be a count of images, got {count!r}")
        if sorted(self.pixel_frequency) != sorted(self.class_names):
            raise ConfigError(f"{source}: pixel_frequency names {sorted(self.pixel_frequency)}, classes are {sorted(self.class_names)}")
        if len(self.pixel_counts) != self.num_classes:
            raise ConfigError(f"{source}: pixel_counts holds {len(self.pixel_counts)} values for {self.num_classes} classes")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std, default=0) <= 0:
            raise ConfigError(f"{source}: mean and std need {self.channels} values each, std positive; got {self.mean} and {self.std}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise ConfigError(f"{source}: size must be [H, W] with positive sides or null, got {self.size}")
        if self.task not in TASKS:
            raise ConfigError(f"{source}: task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if not 0 <= self.ignore_index <= 255:
            raise ConfigError(f"{source}: ignore_index must be 0..255, got {self.ignore_index}")


def describe_objects(objects: dict[str, Any]) -> list[str]:
    """A few lines on an instance dataset's objects: per image, and size and aspect per class."""
    per = objects["per_image"]
    lines = [f"  objects: {objects['count']:,} in {objects['images']:,} images (per image: mean {per['mean']:.1f}, "
             f"median {per['p50']:g}, max {per['max']}); overlap pixels resolved {objects['overlap_pixels']:,}, "
             f"crowd annotations left out {objects['crowd_skipped']:,}, objects dropped {objects['dropped']:,}",
             "  object side (sqrt of area, px) and aspect (box height / width) per class (train):"]
    width = max((len(n) for n in objects["classes"]), default=5)
    for name, c in objects["classes"].items():
        if c["count"]:
            s, a = c["side"], c["aspect"]
            lines.append(f"    {name:<{width}}  {c['count']:6d} objects  side p10 {s['p10']:.1f}  p50 {s['p50']:.1f}  p90 {s['p90']:.1f}  "
                         f"aspect p5 {a['p5']:.2f}  p50 {a['p50']:.2f}  p95 {a['p95']:.2f}")
    return lines


def load_dataset_info(uri: str) -> DatasetInfo:
    """Reads ``URI/dataset.json``.

    Raises:
        FileNotFoundError: ``uri`` is not an ingested dataset.
    """
    path = storage.join(uri, "dataset.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{uri} is not an ingested dataset: {path} is missing (run `segray ingest` first)")
    return DatasetInfo.from_json(storage.read_text(path), source=path)
