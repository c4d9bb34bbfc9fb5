"""The ``segray`` command: one entry point, one subcommand per job.

Each subcommand turns its flags (over the values of ``--config FILE.yaml``)
into one config, calls one function of the Python API (``segray.api``) and
prints where the results went. Config fields are the long flags with dashes
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

from segray.config import (
    AUGMENTATIONS,
    ConfigError,
    PlanConfig,
    EvaluateConfig,
    ExportConfig,
    IngestConfig,
    PredictConfig,
    QueryConfig,
    ReportConfig,
    ServeConfig,
    TrainConfig,
    TuneConfig,
    field_defaults,
    load_file,
    load_yaml,
    parse_duration,
    parse_size,
    shown,
)
from segray.runtime import quiet_logging

Handler = Callable[[dict[str, Any]], None]


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(text: str) -> list[int]:
    try:
        return list(parse_size(text))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _class_weights(text: str) -> str | list[float]:
    if text in ("auto", "none"):
        return text
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, none or w0,w1,...") from None


class _BelowAction(argparse.Action):
    """``--below CLASS IOU``: IOU must be a number."""

    def __call__(self, parser, namespace, values, option_string=None):
        cls, threshold = values
        try:
            setattr(namespace, self.dest, [cls, float(threshold)])
        except ValueError:
            parser.error(f"argument --below: IOU {threshold!r} is not a number")


def _model_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. depth=3")
    try:
        return key, load_yaml(value, f"{key}={shown(value)}")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- subcommands: flags -> config -> one API call -> what was written -----------------


def cmd_synth(values: dict[str, Any]) -> None:
    from segray.data import synthesize

    dst, n, size, classes = values["dst"], values.get("n", 100), values.get("size", [128, 128]), values.get("classes", 4)
    synthesize(dst, n=n, size=tuple(size), num_classes=classes, seed=values.get("seed", 0))
    print(f"wrote {n} image/mask pairs ({size[0]}x{size[1]}, {classes} classes) to {dst}")


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
    print(f"trained {cfg.model} for {len(h)} epoch(s); best val mIoU {best['val_miou']:.4f} at epoch {result.best_epoch + 1}")
    print(h[["epoch", "train_loss", "val_loss", "val_pixel_accuracy", "val_miou", "val_mean_dice", "seconds"]].to_string(index=False))
    print(f"run: {result.run_uri} (model/model.keras, history.parquet, curves.png, config.json, tensorboard/)")


def _duration(text: str) -> float:
    """'90', '90s', '30m', '1.5h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1].lower()) if text and text[-1].lower() in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds or a duration such as 90s, 30m, 2h") from None
    return seconds


def cmd_tune(values: dict[str, Any]) -> None:
    import segray

    result = segray.tune(TuneConfig.from_dict(values))
    print(result.describe())


def cmd_predict(values: dict[str, Any]) -> None:
    import segray

    print(segray.predict(PredictConfig.from_dict(values)).describe())


def cmd_evaluate(values: dict[str, Any]) -> None:
    import segray

    print(segray.evaluate(EvaluateConfig.from_dict(values)).describe())


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
def cmd_export(values: dict[str, Any]) -> None:
    import segray

    print(segray.export_model(ExportConfig.from_dict(values)).describe())


def _replicas(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or a number of replicas") from None


def cmd_serve(values: dict[str, Any]) -> None:
    import segray

    segray.serve(ServeConfig.from_dict(values))


def cmd_models(values: dict[str, Any]) -> None:
    from segray import models

    if values.get("benchmark"):
        cmd_models_benchmark(values)
        return
    for flag in ("data", "output", "epochs", "repeats"):
        if flag in values:
            raise ConfigError(f"{flag}: only with --benchmark", field=flag)
    print(models.describe(values.get("name"), size=tuple(values.get("size", (256, 256))), num_classes=values.get("num_classes", 2)))


def cmd_models_benchmark(values: dict[str, Any]) -> None:
    from segray import benchmark as bench
    from segray import models

    name = values.get("name")
    if name is not None:
        try:
            models.spec(name)
        except ValueError as e:
            raise ConfigError(f"name {name!r}: {e}", field="name") from None
    data = values.get("data")
    if data is not None:
        from segray.data import load_dataset_info
        from segray.runtime import init_ray

        load_dataset_info(data)  # a wrong path fails here, before any model is timed
        init_ray()
    size = tuple(values.get("size", (256, 256)))
    frame = bench.benchmark(
        [name] if name else models.available(), size=size, num_classes=values.get("num_classes", 2), data=data,
        epochs=values.get("epochs", 3), repeats=values.get("repeats", 20),
    )
    print(bench.format_table(frame))
    if not bench.gpu_available():
        print("no GPU found: the gpu_ and gpu_fp16_ columns are left out")
    written = bench.write_report(frame, values.get("output", "."))
    print("wrote " + ", ".join(written))


def cmd_demo(values: dict[str, Any]) -> None:
    from segray.demo import run_demo

    run_demo(values.get("dir", "segray-demo"), n=values.get("n", 96), size=tuple(values.get("size", (64, 64))), epochs=values.get("epochs", 8))


# --- parser ------------------------------------------------------------------------


def _subparser(sub, name: str, handler: Handler, help_text: str, config_cls=None) -> argparse.ArgumentParser:
    # SUPPRESS: a flag the user did not give is absent, so --config values and
    # the config's own defaults (shown in --help) fill it, not argparse's.
    p = sub.add_parser(name, help=help_text, argument_default=argparse.SUPPRESS)
    if config_cls is not None:
        p.epilog = "Defaults: " + ", ".join(f"{k}={v}" for k, v in field_defaults(config_cls).items())
    p.add_argument("--config", help="YAML file of config fields (flags override its values)")
    p.add_argument("--verbose", action="store_true", help="show every log line of Ray and TensorFlow")
    p.set_defaults(handler=handler)
    return p


def _layout_flags(p: argparse.ArgumentParser, where: str, model: str, classes: bool = True) -> None:
    """Ingest's layout flags, for predict and evaluate reading a raw folder (images and truth) directly."""
    p.add_argument("--layout", choices=["ids", "palette", "per-class", "voc"], help=f"read {where} as a raw folder of this layout, truth masks included (as ingest reads it)")
    if classes:
        p.add_argument("--classes", help="palette (and ids): classes.json (default INPUT/classes.json)")
    p.add_argument("--class-order", type=_names, help=f"per-class: class folders in id order (default: {model} classes; must match them)")
    p.add_argument("--priority", type=_names, help=f"per-class: overlap priority, first wins (default: {model}; must match it)")
    p.add_argument("--images-dir", help="per-class: folder of images (default images)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segray", description="Distributed semantic segmentation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subparser(sub, "synth", cmd_synth, "write a synthetic dataset of shapes in the ids layout")
    p.add_argument("dst", help="local folder or a bucket URI (s3, gs, az)")
    p.add_argument("--n", type=int, help="number of image/mask pairs (default 100)")
    p.add_argument("--size", type=_size, help="H or HxW (default 128)")
    p.add_argument("--classes", type=int, help="classes including background (default 4)")
    p.add_argument("--seed", type=int, help="default 0")

    p = _subparser(sub, "ingest", cmd_ingest, "check a raw dataset and write Parquet shards + dataset.json", IngestConfig)
    p.add_argument("source", nargs="?", help="raw dataset: local folder or a bucket URI (s3, gs, az)")
    p.add_argument("destination", nargs="?", help="where the ingested dataset goes")
    p.add_argument("--layout", choices=["ids", "palette", "per-class", "voc"], help="voc: PASCAL VOC's JPEGImages/ and SegmentationClass/ (default ids)")
    p.add_argument("--val-fraction", type=float, help="share of images in val: exactly round(F x N), by hash rank (default 0.1)")
    p.add_argument("--val-ids", help="file of image ids, one a line: these are the val split (pins it; --val-fraction is not used)")
    p.add_argument("--split-seed", type=int, help="draw another split of the same size (default 0)")
    p.add_argument("--shard-mb", type=float, help="target shard size in MB of source bytes")
    p.add_argument("--classes", help="classes.json (default SOURCE/classes.json)")
    p.add_argument("--num-classes", type=int, help="ids or voc without classes.json or class_names.txt: declare C classes")
    p.add_argument("--class-order", type=_names, help="per-class: class folders in id order (ids 1..K)")
    p.add_argument("--priority", type=_names, help="per-class: overlap priority, first wins")
    p.add_argument("--images-dir", help="per-class: folder of images (default images)")
    p.add_argument("--overwrite", action="store_true", help="replace DESTINATION if segray ingested it (only the files it wrote)")
    p.add_argument("--max-pixels", type=int, help="set aside images larger than this (by their header) before decoding")

    p = _subparser(sub, "plan", cmd_plan, "fingerprint a dataset and write plan.json: every training choice with its reason", PlanConfig)
    p.add_argument("data", nargs="?", help="an ingested dataset (local or a bucket URI)")
    p.add_argument("--time-budget", type=_duration, help="training time to plan for (90s, 30m, 1.5h; default 30m)")
    p.add_argument("--gpu", action="store_true", help="plan for GPU workers")
    p.add_argument("--output", "--out", help="where plan.json goes (default DATA/plan.json)")
    p.add_argument("--max-images", type=int, help="train images decoded for the fingerprint at most (default 64)")

    p = _subparser(sub, "train", cmd_train, "train a model on an ingested dataset with Ray Train; the dataset's plan fills what no flag sets", TrainConfig)
    p.add_argument("--data", help="ingested dataset (local or a bucket URI); required")
    p.add_argument("--storage", help="where runs live (local or a bucket URI); required")
    p.add_argument("--name", help="run name: results go to STORAGE/NAME; required")
    p.add_argument("--model", help="model name (see `segray models`)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--lr", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--cpus-per-worker", type=int)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction,
                   help="float16 with loss scaling on GPUs, bfloat16 on CPUs with bfloat16 instructions (the plan keeps float32)")
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA")
    p.add_argument("--loss", choices=["ce", "ce+dice"])
    p.add_argument("--dice-weight", type=float, help="weight of the Dice term with --loss ce+dice")
    p.add_argument("--class-weights", type=_class_weights, help="auto, none or w0,w1,...")
    p.add_argument("--size", type=_size, help="resize to H or HxW (default: the dataset's size, else 256)")
    p.add_argument("--crop", type=_size, help="train on random crops of H or HxW")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, help="flips, rotations, scale, brightness (default on)")
    p.add_argument("--augment-strength", type=float, help="scales the augmentation's magnitudes (default 1; 0: flips and rotations only)")
    p.add_argument("--schedule", choices=["cosine", "plateau", "constant", "poly"])
    p.add_argument("--optimizer", choices=["adam", "sgd"])
    p.add_argument("--warmup", type=float, help="share of training with a linear learning-rate warm-up (poly)")
    p.add_argument("--augment-set", type=_names, help="augmentations, comma-separated: " + ",".join(AUGMENTATIONS))
    p.add_argument("--patches-per-image", type=int, help="with --crop: patches cut from each image per epoch")
    p.add_argument("--foreground-oversample", type=float, help="with --crop: share of patches centred on a present class")
    p.add_argument("--oversample-classes", choices=["uniform", "rare"], help="the present class such a patch centres on: each alike, or rarer classes more often")
    p.add_argument("--time-budget", type=_duration, help="stop training cleanly after this long (90s, 30m, 1.5h)")
    p.add_argument("--deep-supervision", action=argparse.BooleanOptionalAction,
                   help="U-Net: also train heads at 1/2 and 1/4 of the size (training only; planned for depth 3 or more)")
    p.add_argument("--patience", type=int, help="early stopping on val mIoU after N epochs without gain (0: off)")
    p.add_argument("--keep-checkpoints", "--keep", type=int, help="checkpoints kept, best by val mIoU")
    p.add_argument("--max-failures", type=int, help="worker failures to recover from")
    p.add_argument("--seed", type=int)
    p.add_argument("--model-options", "--model-option", type=_model_option, action="append", help="KEY=VALUE for the model builder (repeat)")
    p.add_argument("--resume", action="store_true", help="continue the run NAME from its last checkpoint")

    p = _subparser(sub, "tune", cmd_tune, "search hyperparameters on Ray Tune: trials of `segray train`, poor ones stopped by ASHA", TuneConfig)
    p.add_argument("--data", help="ingested dataset (local or a bucket URI); required")
    p.add_argument("--storage", help="where searches live (local or a bucket URI); required")
    p.add_argument("--name", help="search name: results go to STORAGE/NAME; required")
    p.add_argument("--trials", type=int, help="trials sampled from the space (each grid value this many times)")
    p.add_argument("--time-budget", type=_duration, help="stop the search after this long: seconds, or 30m, 2h")
    p.add_argument("--search-space", help="YAML file of the space (default: lr, loss, class weights, model, width, augment strength)")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers of each trial")
    p.add_argument("--cpus-per-worker", type=int)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs hold)")
    p.add_argument("--epochs", type=int, help="epochs of a trial that is never stopped")
    p.add_argument("--grace-epochs", type=int, help="epochs every trial runs before ASHA may stop it")
    p.add_argument("--reduction-factor", type=float, help="ASHA keeps the best 1/F of trials at each rung")
    p.add_argument("--seed", type=int, help="seeds the sampling of the space")
    p.add_argument("--resume", action="store_true", help="continue the search NAME; finished trials are not run again")

    p = _subparser(sub, "predict", cmd_predict, "segment images with a trained model; evaluate where masks exist", PredictConfig)
    p.add_argument("--model", help="a training run (STORAGE/RUN), a search (STORAGE/NAME: its best trial) or a .keras file; required")
    p.add_argument("--input", help="raw layout (images/ [+ masks/]) or an ingested split, local or a bucket URI; required")
    p.add_argument("--output", help="where masks and tables go; required")
    p.add_argument("--split", help="with an ingested dataset as --input: the split (train, val, or all)")
    _layout_flags(p, "--input", "the model's")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="predictor actors")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--tile", type=_size, help="sliding window H or HxW for large images (default: the model's training window, if any)")
    p.add_argument("--overlap", type=float, help="with a window: fraction shared by neighbouring windows")
    p.add_argument("--weighting", choices=["gaussian", "linear"], help="how overlapping windows' logits are blended")
    p.add_argument("--tta", choices=["none", "flip", "flip8"], help="average logits over 4 mirrored views (flip) or 8 with transposes (flip8)")
    p.add_argument("--min-component", type=int, help="set foreground components under N pixels to background (0: off)")
    p.add_argument("--overlays", type=int, help="colour overlays for the first K images")
    p.add_argument("--max-pixels", type=int, help="set aside images larger than this (by their header) before decoding")
    p.add_argument("--backend", choices=["tensorflow", "onnxruntime"], help="run the Keras model, or its ONNX conversion on CPUs")

    p = _subparser(sub, "evaluate", cmd_evaluate, "IoU/Dice tables from existing predicted and true masks", EvaluateConfig)
    p.add_argument("--pred", help="folder of predicted <id>.png class-id masks; required")
    p.add_argument("--truth", help="folder of true <id>.png class-id masks; required")
    p.add_argument("--output", help="where the tables go; required")
    p.add_argument("--classes", help="classes.json (default: class_0.., or the layout's classes)")
    _layout_flags(p, "--truth", "the --pred output's model's", classes=False)

    p = _subparser(sub, "report", cmd_report, "write one self-contained HTML report of a predict output", ReportConfig)
    p.add_argument("out", nargs="?", help="a predict (or evaluate) output folder, local or a bucket URI")
    p.add_argument("--run", help="the training run (STORAGE/RUN) whose curves to show")
    p.add_argument("--output", help="the .html file to write (default report.html)")
    p.add_argument("--worst", type=int, help="image strips per class, worst IoU first (default 12)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if segray wrote it (any other file is refused)")

    p = _subparser(sub, "query", cmd_query, "SQL (DuckDB) over a predict output's tables, or a named question", QueryConfig)
    p.add_argument("out", nargs="?", help="a predict (or evaluate) output folder, local or a bucket URI")
    p.add_argument("sql", nargs="?", help="a query over per_image, per_class, confusion, errors, image_confusion")
    p.add_argument("--worst", metavar="CLASS", help="the --k images of lowest IoU for CLASS (name or id)")
    p.add_argument("--k", type=int, help="images --worst lists (default 10)")
    p.add_argument("--below", nargs=2, metavar=("CLASS", "IOU"), type=str, action=_BelowAction, help="images whose IoU for CLASS is below IOU")
    p.add_argument("--confused", nargs=2, metavar=("A", "B"), help="images with the most pixels of truth A predicted as B")
    p.add_argument("--format", choices=["table", "csv", "json"], help="what to print (default an aligned table)")
    p.add_argument("--output", help="write the result to a .parquet, .csv or .json file instead")
    p.add_argument("--overwrite", action="store_true", help="replace --output if segray wrote it (any other file is refused)")
    p = _subparser(sub, "export", cmd_export, "write a run's model as a SavedModel, ONNX or plain Keras file that loads without segray", ExportConfig)
    p.add_argument("run", nargs="?", help="a training run (STORAGE/RUN), its model/ folder or a .keras file")
    p.add_argument("--format", choices=["savedmodel", "onnx", "keras"])
    p.add_argument("--output", help="a new or empty folder, local or a bucket URI; required")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export a run still training, killed or failed before its last epoch (the card says so)")

    p = _subparser(sub, "serve", cmd_serve, "serve a run's model over HTTP on Ray Serve", ServeConfig)
    p.add_argument("run", nargs="?", help="a training run (STORAGE/RUN), its model/ folder or a .keras file")
    p.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int)
    p.add_argument("--replicas", type=_replicas, help="auto (autoscaling) or a fixed count")
    p.add_argument("--min-replicas", type=int, help="with --replicas auto")
    p.add_argument("--max-replicas", type=int, help="with --replicas auto")
    p.add_argument("--target-ongoing-requests", type=float, help="with --replicas auto: requests per replica to scale at")
    p.add_argument("--max-batch", type=int, help="requests per model call at most (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, help="how long a replica waits for a batch to fill")
    p.add_argument("--backend", choices=["tensorflow", "onnxruntime"])
    p.add_argument("--replica-cpus", type=float, help="CPUs reserved per replica")
    p.add_argument("--max-pixels", type=int, help="refuse larger images (413) from their header")
    p.add_argument("--max-body-mb", type=float,
                   help="refuse larger request bodies (413) before reading them (MiB; default 4 bytes per pixel of --max-pixels + 1)")

    p = _subparser(sub, "models", cmd_models, "list models, show one's parameters and FLOPs, or benchmark speed against accuracy")
    p.add_argument("name", nargs="?")
    p.add_argument("--size", type=_size, help="H or HxW for FLOPs and the benchmark (default 256)")
    p.add_argument("--num-classes", type=int, help="default 2")
    p.add_argument("--benchmark", action="store_true", help="params, GFLOPs, CPU latency p50/p95 and throughput per model (fp16 on a GPU)")
    p.add_argument("--data", help="with --benchmark: an ingested dataset; adds val mIoU after --epochs of training")
    p.add_argument("--epochs", type=int, help="with --data: the training budget of every model (default 3)")
    p.add_argument("--repeats", type=int, help="with --benchmark: timed batch-1 calls (default 20)")
    p.add_argument("--output", help="with --benchmark: folder for speed_accuracy.parquet and .png (default .)")

    p = _subparser(sub, "demo", cmd_demo, "run the whole pipeline on a local synthetic dataset")
    p.add_argument("--dir", help="working folder (default ./segray-demo; an earlier demo's files there are replaced, anything else is refused)")
    p.add_argument("--n", type=int, help="synthetic pairs (default 96)")
    p.add_argument("--size", type=_size, help="image size (default 64)")
    p.add_argument("--epochs", type=int, help="training epochs (default 8)")
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
    given = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "config", "verbose") and v is not None}
    if "model_options" in given:
        given["model_options"] = dict(given["model_options"])
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
