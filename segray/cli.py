"""The ``segray`` command: one entry point, one subcommand per job.

Each subcommand turns its flags (over the values of ``--config FILE.yaml``)
into one config, calls one function of the Python API (``segray.api``, whose
``COMMANDS`` names the subcommands) and prints what it returns
(``describe()``) or, with a handler here, where the results went. The flags are generated from the config
classes' fields (``segray.config.flag``): a field is the long flag with dashes
as underscores, so a YAML file uses the same names. Errors the user can fix
end with a one-line message naming the flag, and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from segray import api
from segray.config import (
    ConfigError,
    DemoConfig,
    FlagSpec,
    IngestConfig,
    MlflowConfig,
    ModelsConfig,
    PlanConfig,
    QueryConfig,
    ReportConfig,
    ServeConfig,
    SynthConfig,
    field_defaults,
    flags,
    load_file,
)
from segray.runtime import quiet_logging

Handler = Callable[[dict[str, Any]], None]


# --- subcommands: flags -> config -> one API call -> what was written -----------------


def describing(call: Callable[[Any], Any], config_cls: type) -> Handler:
    """The handler of an API call whose result says what it made: ``print(call(config).describe())``."""

    def handler(values: dict[str, Any]) -> None:
        result = call(config_cls.from_dict(values))
        if result is not None:
            print(result.describe())

    return handler


def cmd_synth(values: dict[str, Any]) -> None:
    from segray.data import synthesize, synthesize_instances

    cfg = SynthConfig.from_dict(values)
    if cfg.task == "instance":
        synthesize_instances(cfg.dst, n=cfg.n, size=tuple(cfg.size), num_classes=cfg.classes, seed=cfg.seed)
        print(f"wrote {cfg.n} images with instance maps ({cfg.size[0]}x{cfg.size[1]}, {cfg.classes} classes) to {cfg.dst} (layout instance-ids)")
        return
    if cfg.large:
        from segray.data import write_synthetic_raster

        image, truth = write_synthetic_raster(cfg.dst, cfg.large[0], cfg.large[1], num_classes=cfg.classes, seed=cfg.seed)
        print(f"wrote a {cfg.large[0]}x{cfg.large[1]} raster ({cfg.classes} classes): {image}, truth {truth}")
        return
    synthesize(cfg.dst, n=cfg.n, size=tuple(cfg.size), num_classes=cfg.classes, seed=cfg.seed)
    print(f"wrote {cfg.n} image/mask pairs ({cfg.size[0]}x{cfg.size[1]}, {cfg.classes} classes) to {cfg.dst}")


def cmd_ingest(values: dict[str, Any]) -> None:
    import segray

    cfg = IngestConfig.from_dict(values)
    result = segray.ingest(cfg, command="segray " + shlex.join(sys.argv[1:]))
    print(result.info.describe(cfg.destination))
    if result.errors:
        from segray.data import errors_uri

        print(f"{len(result.errors)} input(s) rejected, reasons in {errors_uri(cfg.destination)}; first ones:")
        for _, reason in result.errors[:5]:
            print(f"  {reason}")


def cmd_plan(values: dict[str, Any]) -> None:
    import segray
    from segray.planning import plan_uri

    made = segray.plan(PlanConfig.from_dict(values))
    print(made.table())
    print(f"plan: {values.get('output') or plan_uri(made.data)}")


def cmd_train(values: dict[str, Any]) -> None:
    import segray
    from segray.training import config_from

    cfg = config_from(values)
    if cfg.plan:
        p = cfg.plan
        print(f"following the plan ({p['source']}): {', '.join(sorted(p['applied'])) or 'nothing'} from it"
              + (f"; given over it: {', '.join(sorted(p['overridden']))}" if p["overridden"] else ""))
    result = segray.train(cfg)
    h, best = result.history, result.best
    if "val_ap50" in h.columns:  # an instance run
        print(f"trained {cfg.model} for {len(h)} epoch(s); best val mask AP50 {best['val_ap50']:.4f} at epoch {result.best_epoch + 1}")
        print(h[["epoch", "train_loss", "val_loss", "val_ap50", "val_ap", "val_pq", "seconds"]].to_string(index=False))
    else:
        print(f"trained {cfg.model} for {len(h)} epoch(s); best val mIoU {best['val_miou']:.4f} at epoch {result.best_epoch + 1}")
        print(h[["epoch", "train_loss", "val_loss", "val_pixel_accuracy", "val_miou", "val_mean_dice", "seconds"]].to_string(index=False))
    print(f"run: {result.run_uri} (model/model.keras, history.parquet, curves.png, config.json, tensorboard/)")


def cmd_report(values: dict[str, Any]) -> None:
    import segray

    result = segray.report(ReportConfig.from_dict(values))
    print(f"wrote {result.uri} ({result.size_bytes / 2**20:.2f} MB, {result.strips} image strips; self-contained, opens offline)")


def cmd_query(values: dict[str, Any]) -> None:
    import segray
    from segray.reporting import format_text, to_json

    cfg = QueryConfig.from_dict(values)
    frame = segray.query(cfg)
    if cfg.output:
        print(f"wrote {len(frame):,} row(s) to {cfg.output}")
    elif cfg.format == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    elif cfg.format == "json":
        sys.stdout.write(to_json(frame))
    else:
        print(format_text(frame))
def cmd_serve(values: dict[str, Any]) -> None:
    import segray

    segray.serve(ServeConfig.from_dict(values))


def cmd_mlflow(values: dict[str, Any]) -> None:
    from segray.tracking import send_pending

    cfg = MlflowConfig.from_dict(values)
    sent, left = send_pending(cfg.folder, cfg.mlflow)
    print(f"sent {sent} record(s) of {cfg.folder} to MLflow" + (f"; {left} still wait" if left else "; nothing waits"))


def cmd_models(values: dict[str, Any]) -> None:
    from segray import models

    cfg = ModelsConfig.from_dict(values)
    if cfg.benchmark:
        cmd_models_benchmark(cfg)
        return
    for name in ("data", "output", "epochs", "repeats"):
        if name in values:  # given, even at its default: it means nothing without --benchmark
            raise ConfigError(f"{name}: only with --benchmark", field=name)
    print(models.describe(cfg.name, size=tuple(cfg.size), num_classes=cfg.num_classes))


def cmd_models_benchmark(cfg: ModelsConfig) -> None:
    from segray import benchmark as bench
    from segray import models

    name = cfg.name
    if name is not None:
        try:
            models.spec(name)
        except ValueError as e:
            raise ConfigError(f"name {name!r}: {e}", field="name") from None
    data = cfg.data
    # Without data every model is timed; with data, the models of its task (an instance dataset: maskrcnn, unet-instance).
    task = None
    if data is not None:
        from segray.data import load_dataset_info
        from segray.runtime import init_ray

        task = load_dataset_info(data).task  # a wrong path fails here, before any model is timed
        init_ray()
    frame = bench.benchmark(
        [name] if name else models.available(task), size=tuple(cfg.size), num_classes=cfg.num_classes, data=data,
        epochs=cfg.epochs, repeats=cfg.repeats,
    )
    print(bench.format_table(frame))
    if not bench.gpu_available():
        print("no GPU found: the gpu_ and gpu_fp16_ columns are left out")
    written = bench.write_report(frame, cfg.output)
    print("wrote " + ", ".join(written))


def cmd_demo(values: dict[str, Any]) -> None:
    from segray.demo import run_demo

    cfg = DemoConfig.from_dict(values)
    run_demo(cfg.dir, n=cfg.n, size=tuple(cfg.size), epochs=cfg.epochs)


# --- parser ------------------------------------------------------------------------


# API calls whose subcommand prints more, or other than, the result's describe().
HANDLERS: dict[str, Handler] = {
    "ingest": cmd_ingest,
    "plan": cmd_plan,
    "train": cmd_train,
    "report": cmd_report,
    "query": cmd_query,
    "serve": cmd_serve,
}

# Subcommand -> its handler, its config class (whose fields are its flags) and its line in `segray --help`:
# the API's (segray.api.COMMANDS) between the commands of the CLI alone.
COMMANDS: dict[str, tuple[Handler, type, str]] = {
    "synth": (cmd_synth, SynthConfig, "write a synthetic dataset of shapes in the ids layout"),
    **{name: (HANDLERS.get(name) or describing(call, cls), cls, text) for name, (call, cls, text) in api.COMMANDS.items()},
    "mlflow": (cmd_mlflow, MlflowConfig, "MLflow: `sync FOLDER` sends what a tracked job could not send to its server"),
    "models": (cmd_models, ModelsConfig, "list models, show one's parameters and FLOPs, or benchmark speed against accuracy"),
    "demo": (cmd_demo, DemoConfig, "run the whole pipeline on a local synthetic dataset"),
}


def _subparser(sub, name: str, handler: Handler, help_text: str, config_cls: type) -> argparse.ArgumentParser:
    # SUPPRESS: a flag the user did not give is absent, so --config values and
    # the config's own defaults (shown in --help) fill it, not argparse's.
    p = sub.add_parser(name, help=help_text, argument_default=argparse.SUPPRESS)
    p.epilog = "Defaults: " + ", ".join(f"{k}={v}" for k, v in field_defaults(config_cls).items())
    p.add_argument("--config", help="YAML file of config fields (flags override its values)")
    p.add_argument("--verbose", action="store_true", help="show every log line of Ray and TensorFlow")
    p.set_defaults(handler=handler, config_class=config_cls)
    return p


def _argument_type(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``parse`` for argparse: its ConfigError becomes the usage error ``argument --flag: MESSAGE``."""
    if parse in (int, float):
        return parse  # argparse names them: "invalid int value: '2.5'"

    def typed(text):
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = parse.__name__
    return typed


class _ParsedTogether(argparse.Action):
    """A flag of several texts (``--below CLASS IOU``) parsed as one value by its field's ``parse``."""

    def __init__(self, *args, parse: Callable[[Any], Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.parse = parse

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, self.parse(values))
        except ConfigError as e:
            parser.error(f"argument {option_string}: {e}")


def add_flags(p: argparse.ArgumentParser, config_cls: type) -> None:
    """Adds the flag of each field of ``config_cls`` that has one (``segray.config.flags``)."""
    for spec in flags(config_cls):
        p.add_argument(*(spec.option_strings or (spec.name,)), **_argument_options(spec))


def _argument_options(spec: FlagSpec) -> dict[str, Any]:
    f = spec.flag
    options: dict[str, Any] = {"help": f.help}
    if f.metavar is not None:
        options["metavar"] = f.metavar
    if spec.kind == "switch":
        options["action"] = "store_true"
        return options
    if spec.kind == "negatable":
        options["action"] = argparse.BooleanOptionalAction
        return options
    if spec.choices is not None:
        options["choices"] = list(spec.choices)
    if not spec.option_strings and not f.required:
        options["nargs"] = "?"
    if f.nargs is not None:
        options["nargs"] = f.nargs
        if spec.parse is not None:
            options.update(action=_ParsedTogether, parse=spec.parse)
    elif spec.parse is not None:
        options["type"] = _argument_type(spec.parse)
    if f.collect is not None:
        options["action"] = "append"
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segray", description="Distributed semantic segmentation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, config_cls, help_text) in COMMANDS.items():
        add_flags(_subparser(sub, name, handler, help_text, config_cls), config_cls)
    return parser


def flag_names(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """Config field -> how the user names it on this subcommand's command line."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]  # noqa: SLF001
    names = {}
    for action in sub._actions:  # noqa: SLF001
        if action.option_strings:
            names[action.dest] = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        else:
            names[action.dest] = action.dest.upper()
    return names


def render(error: BaseException, flags: dict[str, str], config_file: str | None = None, from_file: frozenset[str] = frozenset()) -> str:
    """The message with config field names replaced by the flags a user types.

    A message starts with the field it is about (``error.field``) and names
    other fields in backticks (`` `resume` ``); both become flags here, but
    a field whose value came from ``config_file`` (``from_file``) is named as
    the file's key, with the file. Any credentials written into a URI are redacted.
    """
    from segray.storage import redact

    message = redact(str(error))
    field = getattr(error, "field", None)
    if field in from_file and message.startswith(field):
        message = f"{field} (in config file {redact(config_file)})" + message[len(field):]
    elif field in flags and message.startswith(field):
        message = flags[field] + message[len(field):]
    elif config_file and isinstance(error, ConfigError) and message.startswith("unknown config key"):
        message = f"config file {redact(config_file)}: {message}"
    return re.sub(r"`([a-z_]+)`", lambda m: f"`{m.group(1)}`" if m.group(1) in from_file else flags.get(m.group(1), m.group(0)), message)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given as flags (a repeated flag's values collected into its field's value)."""
    given = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "config", "verbose", "config_class") and v is not None}
    for spec in flags(args.config_class) if hasattr(args, "config_class") else ():
        if spec.flag.collect is not None and spec.name in given:
            given[spec.name] = spec.flag.collect(given[spec.name])
    return given


def values_of(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields: the ``--config`` file's values, overridden by the flags given."""
    values = load_file(args.config) if getattr(args, "config", None) else {}
    values.update(_given(args))
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_logging(verbose=getattr(args, "verbose", False))
    from segray.data import IngestError

    from_file: frozenset[str] = frozenset()
    try:
        values = values_of(args)
        if getattr(args, "config", None):
            from_file = frozenset(set(values) - set(_given(args)))
        args.handler(values)
    except (ConfigError, IngestError, FileNotFoundError, FileExistsError, ValueError) as e:
        message = render(e, flag_names(parser, args.command), getattr(args, "config", None), from_file)
        print(f"segray {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:
        from segray.storage import redact

        full = disk_full(e)
        if full is None:
            raise
        print(f"segray {args.command}: error: {redact(full)}; free some space and run the same command again", file=sys.stderr)
        return 1
    return 0


# A full disk or quota, as an OSError's text gives it: '[Errno 28] No space left on device: '/out/masks/a.png''.
_DISK_FULL = re.compile(rf"\[Errno (?:{errno.ENOSPC}|{errno.EDQUOT})\] ([^:\n]+?)(?:: '([^'\n]+)')?(?:\n|$)")


def disk_full(error: BaseException) -> str | None:
    """'No space left on device writing FILE' when a full disk stopped the job, else None.

    Read from the messages of the error's chain: past a Ray task only the
    text of the worker's error survives (its cause is not pickled).
    """
    seen, found = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found += _DISK_FULL.findall(str(error))
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    named = [f for f in found if f[1]] or found
    if not named:
        return None
    reason, path = named[0]
    return f"{reason} writing {path}" if path else reason


def job(command: str) -> None:
    """The body of every ``jobs/*.py``: ``segray COMMAND`` with the job's own arguments; exits with its code."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
