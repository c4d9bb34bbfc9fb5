"""Search spaces: a YAML mapping of TrainConfig fields to values or domains, checked before any trial.

A space file maps each key to a fixed value or to one domain::

    lr: {loguniform: [1.0e-4, 1.0e-2]}     # lo <= x <= hi, sampled on a log scale
    loss: {choice: [ce, ce+dice]}           # one of the values, uniformly
    augment_strength: {uniform: [0, 1.5]}   # lo <= x <= hi
    batch_size: {randint: [4, 17]}          # integers lo <= x < hi
    model: {grid: [unet, segnet]}           # every value (Tune's grid_search)
    width: {choice: [16, 32]}               # a model option: model_options.width
    epochs: 6                               # a fixed value: every trial trains with it

Keys are ``TrainConfig`` field names, or keyword options of the model builders
(``width``, ``depth`` ...) which go into ``model_options``. The search sets
``data``, ``storage``, ``name``, ``workers``, ``cpus_per_worker``, ``gpu``,
``epochs`` and ``resume`` itself; a space that names one is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from segray.config import ConfigError, TrainConfig, load_file

# The default search: what people tune by hand on a new dataset.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"loguniform": [1e-4, 1e-2]},
    "loss": {"choice": ["ce", "ce+dice"]},
    "class_weights": {"choice": ["none", "auto"]},
    "model": {"choice": ["unet", "segnet", "deeplabv3plus"]},
    "width": {"choice": [16, 32]},
    "augment_strength": {"uniform": [0.0, 1.5]},
}

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")

# Fields the search sets for every trial (from its own flags), never sampled.
SET_BY_SEARCH = {
    "data": "data",
    "storage": "storage",
    "name": "name",
    "workers": "workers_per_trial",
    "cpus_per_worker": "cpus_per_worker",
    "gpu": "gpu",
    "epochs": "epochs",
    "resume": "resume",
}

_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class Domain:
    """One searched key: ``kind`` is one of ``DOMAINS``; ``values`` the choices or the two bounds."""

    kind: str
    values: list[Any]

    def representatives(self) -> list[Any]:
        """Values that stand for the whole domain when it is checked: every choice, or both ends."""
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(self.values)
        if self.kind == "grid":
            return tune.grid_search(self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(*self.values)


@dataclass(frozen=True)
class SearchSpace:
    """A checked space: ``fixed`` values and ``domains``, keyed as in the file; ``source`` names it."""

    fixed: dict[str, Any]
    domains: dict[str, Domain]
    source: str

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space``: the domains as Tune samplers, the fixed values as they are."""
        return {**self.fixed, **{k: d.to_tune() for k, d in self.domains.items()}}

    def model_names(self, default: str) -> list[str]:
        """Every model a trial may train (``default`` when the space does not name one)."""
        if "model" in self.domains:
            return list(self.domains["model"].values)
        return [self.fixed.get("model", default)]

    @property
    def keys(self) -> list[str]:
        return [*self.fixed, *self.domains]


def _error(source: str, message: str) -> ConfigError:
    return ConfigError(f"search_space {source}: {message}", field="search_space")


def _domain(source: str, key: str, value: Any) -> Domain | None:
    """The domain ``value`` spells, or None for a fixed value."""
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAINS):
        if isinstance(value, dict) and len(value) == 1 and key != "model_options":
            kind = next(iter(value))
            raise _error(source, f"`{key}`: unknown domain {kind!r}; expected one of {', '.join(DOMAINS)} or a fixed value")
        return None
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise _error(source, f"`{key}`: {kind} expects a list, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if len(args) != 2 or not numeric or not args[0] < args[1]:
            raise _error(source, f"`{key}`: {kind} expects [low, high] with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise _error(source, f"`{key}`: loguniform needs a positive low bound, got {args[0]!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise _error(source, f"`{key}`: randint expects integer bounds, got {args!r}")
    return Domain(kind, list(args))


def parse_space(data: dict[str, Any], source: str) -> SearchSpace:
    """Splits a space mapping into fixed values and domains; checks the domains' own form.

    Raises:
        ConfigError: a malformed domain, or a key the search sets itself, naming the key.
    """
    if not isinstance(data, dict) or not data:
        raise _error(source, f"expected a mapping of TrainConfig fields to values or domains, got {data!r}")
    fixed, domains = {}, {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise _error(source, f"key {key!r}: expected a field name")
        if key in SET_BY_SEARCH:
            raise _error(source, f"`{key}` is set by the search for every trial (`{SET_BY_SEARCH[key]}`), not by the space")
        domain = _domain(source, key, value)
        if domain is None:
            fixed[key] = value
        else:
            domains[key] = domain
    return SearchSpace(fixed, domains, source)


def load_space(uri: str | None) -> SearchSpace:
    """The space in the YAML file ``uri``, or the default space (``DEFAULT_SPACE``) when None."""
    if uri is None:
        return parse_space(DEFAULT_SPACE, "(default)")
    try:
        data = load_file(uri)
    except FileNotFoundError:
        raise _error(uri, "no such file") from None
    except ConfigError as e:
        raise ConfigError(f"search_space {e}", field="search_space") from None
    return parse_space(data, uri)


def _plain(value: Any) -> Any:
    """numpy scalars (Tune samples them) -> Python numbers, which TrainConfig's strict types accept."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def trial_config(base: dict[str, Any], params: dict[str, Any], plan=None) -> TrainConfig:
    """The TrainConfig of one trial: the search's ``base`` fields, then the trial's sampled ``params``.

    With ``plan`` (``(Plan, source)``, the dataset's plan the search made
    once), the plan fills the fields that neither sets, as for ``segray
    train`` (``segray.training.config_from``); the run's config.json records it.

    ``params`` keys that are not TrainConfig fields are model options and go
    into ``model_options`` (over a fixed ``model_options`` mapping, if any).
    Every trial's config is built here and nowhere else.
    """
    values = {**base}
    options = dict(base.get("model_options") or {})
    for key, value in params.items():
        value = _plain(value)
        if key == "model_options":
            options.update(value)
        elif key in _TRAIN_FIELDS:
            values[key] = value
        else:
            options[key] = value
    if options:
        values["model_options"] = options
    if plan is not None:
        from segray.training import config_from

        return config_from(values, plan)
    return TrainConfig.from_dict(values)


def check_space(space: SearchSpace, base: dict[str, Any]) -> None:
    """Checks every key and every value the space may give a trial, before any trial starts.

    Each choice (or both ends of a range) goes through ``trial_config`` with
    the rest at the first value, so a bad loss, a negative rate or a wrong type
    is refused here with the key that holds it; model names and model options
    are checked against the registry.

    Raises:
        ConfigError: naming the space's source and the key.
    """
    from segray import models

    models_used = space.model_names(default=trial_config(base, {}).model)
    for name in models_used:
        try:
            models.spec(name)
        except ValueError as e:
            raise _error(space.source, f"`model`: {e}") from None
    for key in space.keys:
        if key in _TRAIN_FIELDS:
            continue
        for name in models_used:
            if key not in models.spec(name).default_options():
                raise _error(
                    space.source,
                    f"`{key}` is neither a TrainConfig field nor an option of model {name!r} "
                    f"(its options: {', '.join(sorted(models.spec(name).default_options()))})",
                )
    first = {**space.fixed, **{k: d.representatives()[0] for k, d in space.domains.items()}}
    for key in space.keys:
        candidates = space.domains[key].representatives() if key in space.domains else [space.fixed[key]]
        for value in candidates:
            try:
                trial_config(base, {**first, key: value})
            except ConfigError as e:
                raise _error(space.source, f"`{key}` value {value!r}: {e}") from None


def probes(space: SearchSpace) -> list[dict[str, Any]]:
    """Trial params that stand for the space's models: each model with each value of each model option.

    The search resolves each (``segray.training.resolve``) before any trial
    starts: the model is built at the trial's input size, which runs its own
    checks (valid options, sides divisible by its stride), and the dataset's
    limits (batch size, classes) are checked once for all.
    """
    first = {**space.fixed, **{k: d.representatives()[0] for k, d in space.domains.items()}}
    models_used = list(space.domains["model"].values) if "model" in space.domains else [first.get("model")]
    option_keys = [k for k in space.domains if k not in _TRAIN_FIELDS]
    found = []
    for name in models_used:
        at = {**first, **({"model": name} if name is not None else {})}
        found.append(at)
        for key in option_keys:
            found.extend({**at, key: value} for value in space.domains[key].representatives()[1:])
    return found
