"""From a dataset to a plan, and from a plan plus the given values to a TrainConfig."""

from __future__ import annotations

import dataclasses
from typing import Any

from segray import storage
from segray.config import ConfigError, TrainConfig
from segray.planning.fingerprint import fingerprint, warn_missing
from segray.planning.instance_rules import instance_plan_choices
from segray.planning.plan import Plan, PlanChoice, plan_uri, read_plan
from segray.planning.rules import Machine, plan_choices

# A planned field that rests on other fields: when the user gives one of
# those and not the field itself, the plan's value is left out (the
# TrainConfig default stands) rather than applied to a run it was not made for.
DEPENDS: dict[str, tuple[str, ...]] = {
    "model_options": ("model",),
    "deep_supervision": ("model", "model_options"),
    "crop": ("size",),
    "patches_per_image": ("size", "crop"),
    "workers": ("gpu",),
    "cpus_per_worker": ("workers", "gpu"),
    "lr": ("optimizer",),
    "warmup": ("schedule",),
    "dice_weight": ("loss",),
    # Given epochs say how long to train: a budget the user did not ask for would cut them short.
    "time_budget": ("epochs",),
}


def make_plan(data: str, time_budget: float | None = None, gpu: bool = False, machine: Machine | None = None, max_images: int = 64) -> Plan:
    """Fingerprints ``data``'s train split and applies the rules.

    Raises:
        ConfigError: one class only, or an empty train split (naming ``data``).
    """
    import os

    from segray.data import load_dataset_info

    info = load_dataset_info(data)
    if machine is None and os.environ.get("RAY_ADDRESS"):
        from segray.runtime import init_ray

        init_ray()  # a job on a cluster: fit the plan to the cluster's nodes, not the submitting process's machine
    fp = fingerprint(data, info, max_images=max_images)
    if info.objects:
        fp = dataclasses.replace(fp, objects=info.objects)
    warn_missing(fp, data)
    if info.task == "instance" and info.objects:
        choices = instance_plan_choices(fp, info.objects, time_budget, gpu, machine or Machine.detect())
    else:
        choices = plan_choices(fp, info.num_classes, time_budget, gpu, machine or Machine.detect())
    return Plan(
        data=data,
        time_budget=float(choices["time_budget"][0]),
        gpu=gpu,
        fingerprint=fp,
        choices={k: PlanChoice(value=v, reason=why) for k, (v, why) in choices.items()},
    )


def plan_for(values: dict[str, Any]) -> tuple[Plan, str]:
    """The plan a run with these given values follows: DATA/plan.json when it fits their budget and device, else a fresh one."""
    data, budget, gpu = values["data"], values.get("time_budget"), bool(values.get("gpu", False))
    uri = plan_uri(data)
    if storage.exists(uri):
        plan = read_plan(uri)
        if (budget is None or abs(plan.time_budget - float(budget)) < 1e-6) and plan.gpu == gpu:
            return plan, uri
    return make_plan(data, budget, gpu), "computed"


def config_from(values: dict[str, Any], plan: tuple[Plan, str] | None = None) -> TrainConfig:
    """The TrainConfig of a run given only ``values`` (the fields the user set): the plan fills the rest.

    The CLI, ``segray.train(dict)`` and the tuner build their configs
    through ``segray.training.config_from``, which handles ``resume`` (the
    run's own config.json is the base) and comes here otherwise.
    Explicit values always win over the plan; a planned field that depends
    on a given one (``DEPENDS``) is left out. The config's ``plan`` field
    records the plan (its choices and reasons), the fields it set, and those
    given over it, so ``config.json`` of the run says how it was made.

    Args:
        values: the fields given.
        plan: ``(plan, source)`` made already (``plan_for``), as a search
            does once for all its trials; None: ``plan_for`` the values.

    Raises:
        ConfigError: a bad value (named), an unknown key, or a plan file that
            does not validate (naming the file and its entry).
    """
    cfg = TrainConfig.from_dict(values)  # the given values alone: unknown keys, types, ranges
    if "plan" in values:
        return cfg
    plan, source = plan or plan_for({"data": cfg.data, "time_budget": cfg.time_budget, "gpu": cfg.gpu})
    planned = plan.train_values()
    applied, overridden, left_out = {}, {}, {}
    for name, value in planned.items():
        if name in values:
            if values[name] != value:
                overridden[name] = {"plan": value, "given": values[name]}
            continue
        given = [d for d in DEPENDS.get(name, ()) if d in values]
        if given:
            left_out[name] = f"rests on the given {', '.join(given)}"
            continue
        applied[name] = value
    record = {"source": source, "applied": applied, "overridden": overridden, "left_out": left_out, "plan": plan.to_dict()}
    return TrainConfig.from_dict({**applied, **values, "plan": record})
