"""Every subcommand keeps the flags users have (issue 25: fields are declared once).

``tests/data/cli_flags_before.json`` is the parser as it was before the flags
were generated from the config dataclasses' field metadata: each
subcommand's option strings, positionals, choices, nargs, metavars and help,
and what a set of command lines parsed to. ``python3 tests/test_cli_flags.py``
rewrites it from today's parser (only do that on purpose).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cli_flags_before.json")

# Command lines that give every flag that takes a value, and what they parse to.
SAMPLES = [
    ["synth", "d", "--n", "5", "--size", "64x32", "--classes", "3", "--seed", "1"],
    ["synth", "d", "--size", "48"],
    ["ingest", "src", "dst", "--layout", "per-class", "--val-fraction", "0.2", "--val-ids", "v.txt", "--split-seed", "3",
     "--shard-mb", "1.5", "--classes", "c.json", "--num-classes", "4", "--class-order", "a, b,,c", "--priority", "b,a",
     "--images-dir", "im", "--overwrite", "--max-pixels", "1000"],
    ["ingest"],
    ["ingest", "src", "dst", "--layout", "coco", "--task", "instance", "--max-instances", "50"],
    ["synth", "d", "--task", "instance"],
    ["plan", "d", "--time-budget", "1.5h", "--gpu", "--out", "p.json", "--max-images", "8"],
    ["plan", "--output", "p.json", "--time-budget", "90"],
    ["train", "--data", "d", "--storage", "s", "--name", "n", "--model", "fcn", "--epochs", "3", "--batch-size", "2",
     "--lr", "0.01", "--workers", "1", "--cpus-per-worker", "2", "--gpu", "--mixed-precision", "--xla", "--loss", "ce+dice",
     "--dice-weight", "0.5", "--class-weights", "1,2.5", "--size", "64", "--crop", "32x48", "--no-augment",
     "--augment-strength", "0.5", "--schedule", "poly", "--optimizer", "sgd", "--warmup", "0.1", "--augment-set", "flip,rot90",
     "--patches-per-image", "2", "--foreground-oversample", "0.3", "--oversample-classes", "rare", "--time-budget", "30m",
     "--deep-supervision", "--patience", "4", "--keep", "3", "--max-failures", "0", "--seed", "7",
     "--model-option", "depth=3", "--model-options", "width=[8, 16]", "--resume"],
    ["train", "--class-weights", "auto", "--augment", "--no-mixed-precision", "--no-deep-supervision", "--keep-checkpoints", "1",
     "--time-budget", "45s"],
    ["train"],
    ["tune", "--data", "d", "--storage", "s", "--name", "n", "--trials", "4", "--time-budget", "2h", "--search-space", "sp.yaml",
     "--workers-per-trial", "2", "--cpus-per-worker", "1", "--gpu", "--max-concurrent", "2", "--epochs", "5",
     "--grace-epochs", "1", "--reduction-factor", "3", "--seed", "2", "--resume"],
    ["predict", "--model", "m", "--input", "i", "--output", "o", "--split", "val", "--layout", "palette", "--classes", "c.json",
     "--class-order", "a,b", "--priority", "b", "--images-dir", "im", "--batch-size", "4", "--workers", "2",
     "--gpus-per-worker", "0.5", "--tile", "128x96", "--overlap", "0.25", "--weighting", "linear", "--tta", "flip8",
     "--min-component", "10", "--overlays", "2", "--max-pixels", "99", "--backend", "onnxruntime"],
    ["evaluate", "--pred", "p", "--truth", "t", "--output", "o", "--classes", "c.json", "--layout", "per-class",
     "--class-order", "x,y", "--priority", "y,x", "--images-dir", "im"],
    ["report", "o", "--run", "s/r", "--output", "r.html", "--worst", "3", "--overwrite"],
    ["query", "o", "select 1", "--format", "csv", "--output", "q.json", "--overwrite"],
    ["query", "o", "--worst", "cat", "--k", "4"],
    ["query", "o", "--below", "cat", "0.5", "--format", "json"],
    ["query", "o", "--confused", "cat", "dog"],
    ["export", "r", "--format", "keras", "--output", "e", "--allow-unfinished"],
    ["serve", "r", "--host", "0.0.0.0", "--port", "9000", "--replicas", "auto", "--min-replicas", "1", "--max-replicas", "3",
     "--target-ongoing-requests", "4", "--max-batch", "8", "--batch-wait-ms", "2.5", "--backend", "tensorflow",
     "--replica-cpus", "0.25", "--max-pixels", "1000", "--max-body-mb", "1.5"],
    ["serve", "r", "--replicas", "3"],
    ["models", "unet", "--size", "96x64", "--num-classes", "3", "--benchmark", "--data", "d", "--epochs", "1",
     "--repeats", "2", "--output", "out"],
    ["models"],
    ["demo", "--dir", "w", "--n", "10", "--size", "32", "--epochs", "1"],
    ["train", "--verbose", "--config", "c.yaml"],
]

# Command lines argparse refuses (exit 2) before any config is built.
REFUSED = [
    ["train", "--time-budget", "soon"],
    ["train", "--time-budget", "30x"],
    ["plan", "--time-budget", "m"],
    ["tune", "--time-budget", ""],
    ["train", "--model-option", "depth"],
    ["train", "--model-option", "=3"],
    ["train", "--model-option", "depth=[1"],
    ["train", "--class-weights", "a,b"],
    ["train", "--loss", "dice"],
    ["train", "--size", "0"],
    ["train", "--epochs", "2.5"],
    ["query", "o", "--below", "cat", "low"],
    ["serve", "r", "--replicas", "many"],
    ["predict", "--tta", "flip4"],
    ["ingest", "--layout", "yolo"],
    ["ingest", "--task", "panoptic"],
    ["synth"],
    ["models", "--benchmark", "--epochs"],
]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: SLF001


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe(parser: argparse.ArgumentParser) -> dict:
    """Subcommand -> its arguments (as users see them) and the parsed samples."""
    commands = {}
    for name, sub in _subparsers(parser).items():
        arguments = []
        for action in sub._actions:  # noqa: SLF001
            if isinstance(action, argparse._HelpAction):  # noqa: SLF001
                continue
            arguments.append({
                "option_strings": list(action.option_strings),
                "dest": action.dest,
                "positional": not action.option_strings,
                "takes_value": action.nargs != 0,
                "nargs": action.nargs,
                "choices": _plain(action.choices) if action.choices is not None else None,
                "metavar": _plain(action.metavar),
                "help": action.help,
                "repeatable": isinstance(action, argparse._AppendAction),  # noqa: SLF001
                "negatable": isinstance(action, argparse.BooleanOptionalAction),
            })
        commands[name] = {"arguments": arguments, "epilog": sub.epilog}
    return commands


def parsed(parser_factory, argv: list[str]):
    """The config fields a command line gives (``values_of`` without a config file), or "refused"."""
    from segray.cli import _given

    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args = parser_factory().parse_args(argv)
        except SystemExit as e:
            return f"refused ({e.code})"
    return {k: _plain(v) for k, v in _given(args).items()}


def snapshot() -> dict:
    from segray.cli import build_parser

    return {
        "commands": describe(build_parser()),
        "samples": [{"argv": argv, "values": parsed(build_parser, argv)} for argv in SAMPLES + REFUSED],
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(FIXTURE, "w") as f:
        json.dump(snapshot(), f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {FIXTURE}")


# --- the tests -------------------------------------------------------------------------

import ast  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

from segray import cli, config  # noqa: E402
from segray.cli import COMMANDS, build_parser, main  # noqa: E402


def _before() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)


@pytest.mark.parametrize("command", sorted(_before()["commands"]))
def test_every_subcommand_keeps_its_flags_choices_values_and_help(command):
    before = _before()["commands"][command]
    now = describe(build_parser())[command]
    by_dest = lambda arguments: {a["dest"]: a for a in arguments}  # noqa: E731
    # Flags may be added (issue 28's --chunk, --truth, --mask-format, synth --large; issue 29's --mlflow ...), never dropped or changed.
    assert set(by_dest(before["arguments"])) <= set(by_dest(now["arguments"]))
    for dest, argument in by_dest(before["arguments"]).items():
        assert by_dest(now["arguments"])[dest] == argument, dest
    # Positionals keep their order: `segray query OUT SQL`.
    positionals = lambda arguments: [a["dest"] for a in arguments if a["positional"]]  # noqa: E731
    assert positionals(now["arguments"]) == positionals(before["arguments"])
    if before["epilog"] is not None:
        items = lambda epilog: set(re.split(r", (?=\w+=)", epilog.removeprefix("Defaults: ")))  # noqa: E731
        assert items(before["epilog"]) <= items(now["epilog"])


@pytest.mark.parametrize("sample", _before()["samples"], ids=lambda s: " ".join(s["argv"])[:60])
def test_command_lines_parse_to_the_same_values_as_before(sample):
    assert parsed(build_parser, sample["argv"]) == sample["values"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_each_subcommand_runs_and_lists_every_flag(command):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = out.getvalue()
    for argument in _before()["commands"].get(command, describe(build_parser())[command])["arguments"]:
        for option in argument["option_strings"]:
            assert option in text, f"segray {command} --help lacks {option}"
        if argument["positional"]:
            assert argument["dest"] in text
        if argument["help"]:
            # argparse wraps lines, at hyphens too: compare without whitespace.
            assert "".join(argument["help"].split()[:3]) in "".join(text.split()), argument["help"]


def _field_names_and_flags() -> set[str]:
    names = set()
    for _, config_cls, _ in COMMANDS.values():
        for spec in config.flags(config_cls):
            names.add(spec.name)
            names.update(spec.option_strings)
    return names


def test_build_parser_names_no_config_field():
    tree = ast.parse(inspect.getsource(cli))
    named = _field_names_and_flags()
    parser_functions = {"build_parser", "_subparser", "add_flags", "_argument_options", "_argument_type"}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in parser_functions:
            strings = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            assert not strings & named, f"{node.name} names {sorted(strings & named)}"
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            literal = [a.value for a in node.args if isinstance(a, ast.Constant)]
            assert set(literal) <= {"--config", "--verbose"}, literal


def test_every_config_field_has_a_flag_but_the_internal_ones():
    flagless = {
        (cls.__name__, f.name)
        for _, cls, _ in COMMANDS.values()
        for f in dataclasses.fields(cls)
        if "flag" not in f.metadata
    }
    # plan: set by config_from from the plan file; blocking: the API's serve returns, the CLI's serves until stopped.
    assert flagless == {("TrainConfig", "plan"), ("ServeConfig", "blocking")}


def test_one_duration_parser():
    for cls in (config.PlanConfig, config.TrainConfig, config.TuneConfig):
        spec = next(s for s in config.flags(cls) if s.name == "time_budget")
        assert spec.parse is config.parse_duration, cls.__name__
    assert not hasattr(cli, "_duration")
    assert "def _duration" not in inspect.getsource(cli)
    assert config.parse_duration("1.5h") == 5400.0 and config.parse_duration(" 90S ") == 90.0
    for bad in ("soon", "30x", "m", "", "0", "-5m"):
        with pytest.raises(config.ConfigError, match="duration"):
            config.parse_duration(bad)


def test_one_run_name_rule_for_runs_and_searches():
    source = inspect.getsource(config)
    assert source.count('in (".", "..")') == 1
    for bad in ("", "a/b", "a\\b", ".", ".."):
        with pytest.raises(config.ConfigError, match="expected a plain run name") as e:
            config.TrainConfig(data="/d", storage="/s", name=bad)
        assert e.value.field == "name"
        with pytest.raises(config.ConfigError, match="expected a plain search name") as e:
            config.TuneConfig(data="/d", storage="/s", name=bad)
        assert e.value.field == "name"


def test_resume_may_change_the_fields_marked_resumable():
    from segray.training.trainer import RESUMABLE_FIELDS

    assert RESUMABLE_FIELDS == config.resumable_fields(config.TrainConfig) == {"epochs", "patience", "max_failures", "resume", "time_budget", "mlflow", "mlflow_experiment"}


def test_a_field_declared_with_a_flag_is_a_flag_a_yaml_key_and_an_api_argument(tmp_path):
    """One declaration: --config's keys and the flags are the same names, flags win, from_dict takes them."""
    path = tmp_path / "train.yaml"
    path.write_text("epochs: 4\nbatch_size: 2\nmodel_options: {depth: 2}\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--batch-size", "3", "--model-option", "width=8",
                                      "--data", "/d", "--storage", "/s", "--name", "n"])
    values = cli.values_of(args)
    assert values == {"epochs": 4, "batch_size": 3, "model_options": {"width": 8}, "data": "/d", "storage": "/s", "name": "n"}
    cfg = config.TrainConfig.from_dict(values)
    assert (cfg.epochs, cfg.batch_size, cfg.model_options) == (4, 3, {"width": 8})


def test_a_flag_of_several_texts_reports_a_bad_one_as_a_usage_error():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["query", "o", "--below", "cat", "low"])
    assert exit_.value.code == 2
    assert "argument --below: IOU 'low' is not a number" in err.getvalue()


def test_each_api_command_is_a_subcommand_and_a_name_of_segray():
    """A subcommand of an API call is wired by its ``segray.api.COMMANDS`` entry alone (issue 25: 3 files, not 5)."""
    import segray
    from segray import api

    assert [c for c in COMMANDS if c in api.COMMANDS] == list(api.COMMANDS)
    for name, (call, config_cls, help_text) in api.COMMANDS.items():
        handler, cls, text = COMMANDS[name]
        assert (cls, text) == (config_cls, help_text), name
        assert handler is cli.HANDLERS.get(name, handler) and callable(handler)
        assert call.__name__ in api.__all__ and getattr(segray, call.__name__) is call, name
    assert set(api.__all__) <= set(segray.__all__)
