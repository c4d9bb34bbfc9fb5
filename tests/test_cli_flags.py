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
    ["ingest", "--layout", "coco"],
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
