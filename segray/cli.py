"""The ``segray`` command: one entry point, one subcommand per job.

Each subcommand parses its flags, calls one segray function and prints where
the results went. Errors that the user can fix end with a one-line message
and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence

from segray.config import ConfigError, parse_size


class UsageError(Exception):
    """A problem with the command line or its inputs that the user can fix."""


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _print_dataset(info, dst: str) -> None:
    print(f"dataset: {dst}")
    print(f"  layout {info.layout}, {info.num_classes} classes, size {'x'.join(map(str, info.size)) if info.size else 'varies'}")
    print(f"  splits: " + ", ".join(f"{k} {v}" for k, v in info.splits.items()) + f"; rejected inputs: {info.errors}")
    print(f"  mean {[round(x, 2) for x in info.mean]}  std {[round(x, 2) for x in info.std]}")
    print("  pixel frequency (train):")
    width = max(len(n) for n in info.pixel_frequency)
    for name, freq in info.pixel_frequency.items():
        bar = "#" * int(round(freq * 40))
        print(f"    {name:<{width}}  {freq:7.2%}  {bar}")
    if info.priority:
        print(f"  overlap priority (first wins): {', '.join(info.priority)}")


# --- subcommands -------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> None:
    from segray.data import synthesize

    synthesize(args.dst, n=args.n, size=args.size, num_classes=args.classes, seed=args.seed)
    print(f"wrote {args.n} image/mask pairs ({args.size[0]}x{args.size[1]}, {args.classes} classes) to {args.dst}")


def cmd_ingest(args: argparse.Namespace) -> None:
    from segray import storage
    from segray.data import ingest
    from segray.runtime import init_ray

    init_ray()
    result = ingest(
        args.src,
        args.dst,
        layout=args.layout,
        val_fraction=args.val_fraction,
        shard_mb=args.shard_mb,
        classes_file=args.classes,
        num_classes=args.num_classes,
        class_order=args.class_order,
        priority=args.priority,
        images_dir=args.images_dir,
        overwrite=args.overwrite,
        command="segray " + shlex.join(sys.argv[1:]),
    )
    _print_dataset(result.info, args.dst)
    if result.errors:
        print(f"{len(result.errors)} input(s) rejected, reasons in {storage.join(args.dst, '_errors.parquet')}; first ones:")
        for _, reason in result.errors[:5]:
            print(f"  {reason}")


def _class_weights(text: str) -> str | list[float]:
    if text in ("auto", "none"):
        return text
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--class-weights {text!r}: expected auto, none or w0,w1,...") from None


def _model_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--model-option {text!r}: expected KEY=VALUE, e.g. depth=3")
    import yaml

    return key, yaml.safe_load(value)


def train_config(args: argparse.Namespace):
    from segray.train import TrainConfig

    return TrainConfig(
        data=args.data,
        storage=args.storage,
        name=args.name,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        workers=args.workers,
        gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        mixed_precision=args.mixed_precision,
        xla=args.xla,
        loss=args.loss,
        class_weights=args.class_weights,
        size=list(args.size) if args.size else None,
        crop=list(args.crop) if args.crop else None,
        augment=not args.no_augment,
        schedule=args.schedule,
        patience=args.patience,
        keep_checkpoints=args.keep,
        max_failures=args.max_failures,
        seed=args.seed,
        resume=args.resume,
        model_options=dict(args.model_option or []),
    )


def cmd_train(args: argparse.Namespace) -> None:
    from segray.runtime import init_ray
    from segray.train import resolve, train

    cfg = train_config(args)
    resolve(cfg)  # every flag is checked before Ray starts
    init_ray()
    result = train(cfg)
    h = result.history
    print(f"trained {cfg.model} for {len(h)} epoch(s); best val mIoU {result.best['val_miou']:.4f} at epoch {int(result.best['epoch']) + 1}")
    print(h[["epoch", "train_loss", "val_loss", "val_pixel_accuracy", "val_miou", "val_mean_dice", "seconds"]].to_string(index=False))
    print(f"run: {result.run_uri} (model/model.keras, history.parquet, curves.png, config.json, tensorboard/)")


def _print_prediction(result) -> None:
    from segray.inference import format_per_class

    s = result.summary
    print(format_per_class(result.per_class))
    if s.get("miou") is not None:
        print(f"mIoU {s['miou']:.4f}  mean Dice {s['mean_dice']:.4f}  pixel accuracy {s['pixel_accuracy']:.4f}  ({s['images']} images)")
    print(f"results: {result.output} (masks/, per_image.parquet, per_class.parquet, confusion.parquet, summary.json)")


def cmd_predict(args: argparse.Namespace) -> None:
    from segray.inference import PredictConfig, predict
    from segray.runtime import init_ray

    cfg = PredictConfig(
        model=args.model,
        input=args.input,
        output=args.output,
        batch_size=args.batch_size,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        tile=list(args.tile) if args.tile else None,
        overlap=args.overlap,
        overlays=args.overlays,
        split=args.split,
    )
    init_ray()
    _print_prediction(predict(cfg))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from segray.inference import evaluate
    from segray.runtime import init_ray

    init_ray()
    _print_prediction(evaluate(args.pred, args.truth, args.output, classes=args.classes))


def cmd_models(args: argparse.Namespace) -> None:
    from segray import models

    print(models.describe(args.name, size=args.size, num_classes=args.num_classes))


def cmd_demo(args: argparse.Namespace) -> None:
    from segray.demo import run_demo

    run_demo(args.dir, n=args.n, size=args.size, overwrite=True)


# --- parser ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segray", description="Distributed semantic segmentation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic dataset of shapes in the ids layout")
    p.add_argument("dst", help="local folder or s3://bucket/prefix")
    p.add_argument("--n", type=int, default=100, help="number of image/mask pairs (default 100)")
    p.add_argument("--size", type=_size, default=(128, 128), help="H or HxW (default 128)")
    p.add_argument("--classes", type=int, default=4, help="classes including background (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="check a raw dataset and write Parquet shards + dataset.json")
    p.add_argument("src", help="raw dataset: local folder or s3://bucket/prefix")
    p.add_argument("dst", help="where the ingested dataset goes")
    p.add_argument("--layout", choices=["ids", "palette", "per-class"], default="ids")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--shard-mb", type=float, default=128.0, help="target shard size in MB of source bytes")
    p.add_argument("--classes", default=None, help="classes.json (default SRC/classes.json)")
    p.add_argument("--num-classes", type=int, default=None, help="ids layout without classes.json: declare C classes")
    p.add_argument("--class-order", type=_names, default=None, help="per-class: class folders in id order (ids 1..K)")
    p.add_argument("--priority", type=_names, default=None, help="per-class: overlap priority, first wins")
    p.add_argument("--images-dir", default="images", help="per-class: folder of images (default images)")
    p.add_argument("--overwrite", action="store_true", help="replace DST whole if it holds files")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="train a model on an ingested dataset with Ray Train")
    p.add_argument("--data", required=True, help="ingested dataset (local or s3://)")
    p.add_argument("--model", default="unet", help="model name (see `segray models`)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--mixed-precision", action="store_true", help="mixed_float16 with loss scaling (GPUs)")
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA")
    p.add_argument("--loss", choices=["ce", "ce+dice"], default="ce")
    p.add_argument("--class-weights", type=_class_weights, default="none", help="auto, none or w0,w1,...")
    p.add_argument("--size", type=_size, default=None, help="resize to H or HxW (default: the dataset's size, else 256)")
    p.add_argument("--crop", type=_size, default=None, help="train on random crops of H or HxW")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--schedule", choices=["cosine", "plateau", "constant"], default="cosine")
    p.add_argument("--patience", type=int, default=0, help="early stopping on val mIoU after N epochs without gain (0: off)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept, best by val mIoU")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-option", type=_model_option, action="append", help="KEY=VALUE passed to the model builder")
    p.add_argument("--storage", required=True, help="where runs live (local or s3://)")
    p.add_argument("--name", required=True, help="run name: results go to STORAGE/NAME")
    p.add_argument("--resume", action="store_true", help="continue the run NAME from its last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment images with a trained model; evaluate where masks exist")
    p.add_argument("--model", required=True, help="a training run (STORAGE/RUN) or a .keras file")
    p.add_argument("--input", required=True, help="raw layout (images/ [+ masks/]) or an ingested split, local or s3://")
    p.add_argument("--output", required=True, help="where masks and tables go")
    p.add_argument("--split", default=None, help="with an ingested dataset as --input: the split (e.g. val)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="predictor actors")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--tile", type=_size, default=None, help="sliding window H or HxW for large images")
    p.add_argument("--overlap", type=float, default=0.25, help="with --tile: fraction shared by neighbouring windows")
    p.add_argument("--overlays", type=int, default=8, help="colour overlays for the first K images")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="IoU/Dice tables from existing predicted and true masks")
    p.add_argument("--pred", required=True, help="folder of predicted <id>.png class-id masks")
    p.add_argument("--truth", required=True, help="folder of true <id>.png class-id masks")
    p.add_argument("--classes", default=None, help="classes.json (default: class_0..)")
    p.add_argument("--output", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", help="list models, or show one's parameters and FLOPs")
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--size", type=_size, default=(256, 256), help="H or HxW for FLOPs (default 256)")
    p.add_argument("--num-classes", type=int, default=2)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="run the whole pipeline on a local synthetic dataset")
    p.add_argument("--dir", default="segray-demo", help="working folder (default ./segray-demo, replaced)")
    p.add_argument("--n", type=int, default=96, help="synthetic pairs (default 96)")
    p.add_argument("--size", type=_size, default=(64, 64), help="image size (default 64)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    from segray.data import IngestError

    try:
        func(args)
    except (UsageError, ConfigError, IngestError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"segray {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
