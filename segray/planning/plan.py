"""The plan file: every choice of ``segray plan`` with its reason, validated like a config.

``plan.json`` holds the fingerprint it was made from and one entry per
choice: ``{"value": ..., "reason": "..."}``. Entries named like a
``TrainConfig`` field become that field when ``segray train`` follows the
plan; ``normalization`` and ``validation`` say what training does anyway.
A hand-edited file is read with the same strict checks as a config: an
unknown entry, a value of the wrong type or out of range is refused, naming
the file and the entry.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from segray import storage
from segray.config import Config, ConfigError, TrainConfig
from segray.planning.fingerprint import Fingerprint

PLAN_FORMAT = "segray-plan/1"
PLAN_FILE = "plan.json"
# Entries that describe training rather than set a field; only these values are implemented.
INFO_ENTRIES = {"normalization": ("zscore",), "validation": ("every epoch",)}
# Entries of an instance plan that are options of its model: ``train_values``
# puts them in ``model_options`` (each keeps its own reason in the plan).
MODEL_OPTION_ENTRIES = ("anchor_sizes", "anchor_ratios", "roi_size", "mask_size", "max_detections")
# TrainConfig fields a plan never sets: they say where and what a run is.
NOT_PLANNED = frozenset({"data", "storage", "name", "resume", "seed", "max_failures", "keep_checkpoints"})


@dataclass(frozen=True)
class PlanChoice(Config):
    value: Any
    reason: str

    def validate(self) -> None:
        if not self.reason.strip():
            raise ConfigError("reason: every plan choice needs a one-line reason", field="reason")


@dataclass(frozen=True)
class Plan(Config):
    """A training plan for one dataset.

    Attributes:
        data: the dataset it was made for.
        time_budget: the budget in seconds it was sized for.
        gpu: planned for GPU workers.
        fingerprint: what the rules saw.
        choices: entry -> value and reason.
        format: the file's format version.
    """

    data: str
    time_budget: float
    gpu: bool
    fingerprint: Fingerprint
    choices: dict[str, PlanChoice] = field(default_factory=dict)
    format: str = PLAN_FORMAT

    def validate(self) -> None:
        if self.format != PLAN_FORMAT:
            raise ConfigError(f"format: expected {PLAN_FORMAT!r}, got {self.format!r}", field="format")
        parsed = {}
        for name, choice in self.choices.items():
            try:
                parsed[name] = choice if isinstance(choice, PlanChoice) else PlanChoice.from_dict(choice)
            except ConfigError as e:
                raise ConfigError(f"choices.{name}.{e}", field="choices") from None
        object.__setattr__(self, "choices", parsed)
        self.train_values()  # checks every value against TrainConfig's types and ranges

    def train_values(self) -> dict[str, Any]:
        """The plan's TrainConfig fields, checked; raises ConfigError naming a bad entry."""
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        values: dict[str, Any] = {}
        options = {}
        for name, choice in self.choices.items():
            if name in MODEL_OPTION_ENTRIES:
                options[name] = choice.value
                continue
            if name in INFO_ENTRIES:
                if choice.value not in INFO_ENTRIES[name]:
                    raise ConfigError(f"choices.{name}: expected one of {list(INFO_ENTRIES[name])}, got {choice.value!r}", field="choices")
                continue
            if name not in fields or name in NOT_PLANNED:
                known = sorted((fields - NOT_PLANNED) | set(INFO_ENTRIES) | set(MODEL_OPTION_ENTRIES))
                raise ConfigError(f"choices.{name}: not a plan entry; known: {', '.join(known)}", field="choices")
            values[name] = choice.value
        if options:
            values["model_options"] = {**values.get("model_options", {}), **options}
        try:
            # A full construction runs TrainConfig's own checks on the planned values.
            TrainConfig.from_dict({"data": "/plan-check", "storage": "/plan-check", "name": "plan-check", **values})
        except ConfigError as e:
            raise ConfigError(f"choices.{e}", field="choices") from None
        return values

    @classmethod
    def from_json(cls, text: str, source: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """The choices as an aligned text table: entry, value, reason."""
        rows = [(name, _show(c.value), c.reason) for name, c in self.choices.items()]
        a = max(len(r[0]) for r in rows)
        b = min(28, max(len(r[1]) for r in rows))
        lines = [f"{'choice':<{a}}  {'value':<{b}}  reason", f"{'-' * a}  {'-' * b}  {'-' * 6}"]
        lines += [f"{n:<{a}}  {v:<{b}}  {r}" for n, v, r in rows]
        return "\n".join(lines)


def _show(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def plan_uri(data: str) -> str:
    return storage.join(data, PLAN_FILE)


def read_plan(uri: str) -> Plan:
    """Reads and validates a plan file (``ConfigError`` naming the file and the entry)."""
    return Plan.from_json(storage.read_text(uri), uri)


def write_plan(plan: Plan, uri: str) -> None:
    storage.write_text(uri, plan.to_json() + "\n")
