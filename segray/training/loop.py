"""The per-worker training loop that Ray Train runs on every worker.

Keras 3 ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` inside a
``TensorflowTrainer`` (ray issue 47464), so the step is written out: a
``tf.function`` runs ``strategy.run`` on each worker's own batch, the loss is
the weighted pixel sum divided by the weight summed over *all* replicas, and
Keras' optimizer all-reduces (sums) the gradients. Validation confusion
matrices are summed across workers with one collective per epoch, so every
worker computes the same mIoU and takes the same early-stopping decision.

Batches arrive as uint8 images and masks (the pipeline keeps the file's
scale); the step casts and normalises them in its graph (``normalize_tf``),
so the model and its saved form still take normalised float32.
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from segray import storage
from segray.config import TrainConfig
from segray.data import IGNORE_INDEX, DatasetInfo
from segray.runtime import BF16_CPU_FLAGS, cpu_has_bf16, normal_priority
from segray.runs import Preprocessing, load_state, save_state, write_end
from segray.tracking import EpochLogger
from segray.training.artifacts import RunArtifacts
from segray.training.budget import Budget
from segray.training.report import PREVIEW_IMAGES, epoch_line, preview_strips

if TYPE_CHECKING:
    from segray.metrics import InstanceMetrics


# A worker keeps its part of the val split in memory after the first pass when
# it fits this many bytes: the split is the same every epoch (no augmentation),
# and a new streaming pass costs Ray Data's start-up each epoch (seconds on a small split).
VAL_CACHE_BYTES = 512 * 2**20
# The folder of a run where the workers of an instance run exchange their val metric records.
VAL_RECORDS_DIR = "val_records"


def preprocessing_of(cfg: TrainConfig, info: DatasetInfo) -> Preprocessing:
    """What a predictor needs besides the weights: normalisation, size, classes."""
    # Trained on patches of larger images: predict slides a window of the
    # patch's size over each full-size image, as it saw them in training.
    window = tuple(cfg.crop) if cfg.crop and cfg.size and tuple(cfg.crop) != tuple(cfg.size) else None
    return Preprocessing(
        model=cfg.model,
        size=tuple(cfg.size) if cfg.size else None,
        window=window,
        fit="resize",
        mean=tuple(info.mean),
        std=tuple(info.std),
        classes=tuple(c for c in info.classes if c.id != info.ignore_index),
        ignore_index=info.ignore_index,
        priority=tuple(info.priority) if info.priority else None,
    )


def float32_model(cfg: TrainConfig, num_classes: int):
    """The run's model in float32 whatever the training policy: the saved model predicts and exports without mixed precision."""
    from segray.models import build, dtype_policy

    with dtype_policy("float32"):
        return build(cfg.model, num_classes, input_shape=(None, None, 3), **cfg.model_options)


def instance_score(metrics: dict[str, Any]) -> tuple[float, float]:
    """What picks an instance run's best epoch: val mask AP50, then (ties, or no AP50) the lower val loss."""
    ap50, loss = metrics.get("val_ap50", float("nan")), metrics.get("val_loss", float("nan"))
    return (float(ap50) if np.isfinite(ap50) else -np.inf, -float(loss) if np.isfinite(loss) else -np.inf)


def val_dataset_name(rank: int) -> str:
    """The Ray Train dataset that holds worker ``rank``'s part of the val split."""
    return f"val_{rank}"


def epoch_metrics(prefix: str, loss_sum: float, weight_sum: float, cm: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Loss, pixel accuracy, mIoU, mean Dice and per-class IoU from summed quantities."""
    from segray.metrics import iou, summary

    s = summary(cm)
    out = {
        f"{prefix}_loss": float(loss_sum / weight_sum) if weight_sum else float("nan"),
        f"{prefix}_pixel_accuracy": float(s["pixel_accuracy"]),
        f"{prefix}_miou": float(s["miou"]),
        f"{prefix}_mean_dice": float(s["mean_dice"]),
    }
    if prefix == "val":
        for name, value in zip(class_names, iou(cm)):
            out[f"val_iou_{name}"] = float(value)
    return out


class WorkerLoop:
    """One worker's side of a data-parallel run: model, optimizer, steps, epochs."""

    def __init__(self, cfg: TrainConfig, info: DatasetInfo, world_size: int):
        import keras
        import tensorflow as tf

        from segray import models
        from segray.training.losses import TrainingLoss, class_weights_from_frequency
        from segray.training.schedule import Optimization

        self.cfg, self.info = cfg, info
        self.kept: tuple[np.ndarray, np.ndarray] | None = None  # validation images for TensorBoard (rank 0)
        if not cfg.gpu:
            normal_priority()
            try:
                tf.config.threading.set_intra_op_parallelism_threads(cfg.cpus_per_worker)
                tf.config.threading.set_inter_op_parallelism_threads(max(1, cfg.cpus_per_worker))
            except RuntimeError:
                # TensorFlow already started in this process (a notebook, a test):
                # its thread pools are fixed and the loop runs with them.
                pass
        keras.utils.set_random_seed(cfg.seed)
        # Mixed precision: float16 with loss scaling on GPUs; bfloat16 on CPUs
        # that compute it natively (it keeps float32's range: no loss scaling).
        self.policy = "float32"
        if cfg.mixed_precision:
            if cfg.gpu:
                self.policy = "mixed_float16"
            elif cpu_has_bf16():
                self.policy = "mixed_bfloat16"
            else:
                print(f"mixed_precision: this node's CPU has no bfloat16 instructions ({' or '.join(BF16_CPU_FLAGS)}); "
                      "training in float32 instead", file=sys.__stderr__, flush=True)
        self.loss_scaling = self.policy == "mixed_float16"
        keras.mixed_precision.set_global_policy(self.policy)
        self.num_classes = info.num_classes
        self.world_size = world_size
        patches = cfg.patches_per_image if cfg.crop else 1
        self.steps_per_epoch = max(1, (info.splits["train"] * patches // world_size) // cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.steps_done = 0
        # Its clock starts here; its collective (the mean of the workers' clocks) is built below.
        self.budget = Budget(cfg.time_budget, world_size, lambda v: self.global_sum(v))
        # This worker's val batches after one streamed pass, if they fit VAL_CACHE_BYTES; False: too big.
        self.val_batches: list[dict[str, np.ndarray]] | bool | None = None
        # One worker has nobody to all-reduce with: the default strategy runs the
        # same step without MWMS's collective ops on every gradient.
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy() if world_size > 1 else tf.distribute.get_strategy()
        entry = models.spec(cfg.model)
        self.task = entry.task  # "semantic" or "instance": which batches, steps and metrics
        with self.strategy.scope():
            self.model = models.build(cfg.model, self.num_classes, input_shape=(None, None, 3), **cfg.model_options)
            # What the optimizer trains: the model, or the model plus its deep
            # supervision heads (outputs at full size, 1/2, 1/4), as its registry entry builds them.
            self.net = self.model
            levels = models.DEEP_SUPERVISION_LEVELS if cfg.deep_supervision else 0
            if levels:
                self.net = entry.deep_supervision(self.model, self.num_classes, levels)
            self.optimization = Optimization(cfg, self.total_steps, self.net.trainable_variables, self.loss_scaling)
            self.optimizer = self.optimization.optimizer
        if entry.task == "instance":
            # Objects, not pixels: the model's own loss on the instance batch
            # (image, instances, classes), with the step shape of the semantic one.
            self.class_weights = None
            self.loss = entry.instance_loss(self.model)
            self.train_step = tf.function(self._distributed_instances(self._replica_train_instances), reduce_retracing=True)
            self.eval_step = tf.function(self._distributed_instances(self._replica_eval_instances), reduce_retracing=True)
        else:
            if cfg.class_weights == "auto":
                weights = class_weights_from_frequency([info.pixel_frequency[n] for n in info.class_names])
            elif cfg.class_weights == "none":
                weights = None
            else:
                weights = np.asarray(cfg.class_weights, np.float32)
            self.class_weights = None if weights is None else tf.constant(weights, tf.float32)
            self.loss = TrainingLoss(self.num_classes, self.class_weights, cfg.loss, cfg.dice_weight, levels, IGNORE_INDEX)
            self.train_step = tf.function(self._distributed(self._replica_train), jit_compile=cfg.xla, reduce_retracing=True)
            self.eval_step = tf.function(self._distributed(self._replica_eval), reduce_retracing=True)
        self._all_sum = tf.function(
            lambda v: self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(tf.identity, args=(v,)), axis=None)
        )

    @property
    def out_of_time(self) -> bool:
        """Whether a step was refused for the time budget (the epoch ended early)."""
        return self.budget.exhausted_in_step

    def before_step(self) -> bool:
        """Sets a poly schedule's learning rate; False when ``time_budget`` says to stop (every worker agrees)."""
        budget, optimization = self.budget, self.optimization
        if not budget.limited and not optimization.per_step:
            return True
        # The clock's collective runs on every worker or on none.
        elapsed = budget.elapsed() if budget.limited or self.world_size == 1 else 0.0
        if budget.limited and self.steps_done > 0 and budget.exhausted(elapsed):
            budget.exhausted_in_step = True
            return False
        optimization.before_step(optimization.progress(self.steps_done, budget.share(elapsed)))
        return True

    def _distributed(self, replica_fn):
        return lambda images, masks: self.strategy.run(replica_fn, args=(images, masks))

    def _distributed_instances(self, replica_fn):
        return lambda images, instances, classes: self.strategy.run(replica_fn, args=(images, instances, classes))

    def _replica_train_instances(self, images, instances, classes):
        """One instance step: ``(loss summed over this replica's images, images)``, the semantic step's (sum, weight) pair."""
        import tensorflow as tf

        images = self.model_input(images)
        with tf.GradientTape() as tape:
            loss, parts = self.loss(images, instances, classes, training=True)
            scaled = self.optimization.scale_loss(loss)
        grads = tape.gradient(scaled, self.net.trainable_variables)
        self.optimization.apply(grads, self.net.trainable_variables)
        return tf.add_n(list(parts.values())), tf.cast(tf.shape(images)[0], tf.float32)

    def _replica_eval_instances(self, images, instances, classes):
        import tensorflow as tf

        # The terms alone: the loss's all-reduce of the global batch is a collective, and the
        # workers' val parts differ in batches (every image once), so no collective may run per batch.
        terms = self.loss.image_terms(self.model_input(images), instances, classes, training=False)
        return tf.add_n([tf.reduce_sum(v) for v in terms.values()]), tf.cast(tf.shape(images)[0], tf.float32)

    def model_input(self, images):
        """Pipeline images (uint8, or float32 0..255) -> the model's normalised float32, in-graph."""
        from segray.data import normalize_tf

        return normalize_tf(images, self.info.mean, self.info.std)

    def _replica_train(self, images, masks):
        import tensorflow as tf

        from segray.metrics import tf_confusion_matrix

        images, masks = self.model_input(images), tf.cast(masks, tf.int32)
        with tf.GradientTape() as tape:
            loss, loss_sum, weight_sum, logits = self.loss(masks, self.net(images, training=True))
            scaled = self.optimization.scale_loss(loss)
        grads = tape.gradient(scaled, self.net.trainable_variables)
        self.optimization.apply(grads, self.net.trainable_variables)
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return loss_sum, weight_sum, tf_confusion_matrix(masks, predicted, self.num_classes, IGNORE_INDEX)

    def _replica_eval(self, images, masks):
        import tensorflow as tf

        from segray.metrics import tf_confusion_matrix
        from segray.training.losses import masked_cross_entropy

        images, masks = self.model_input(images), tf.cast(masks, tf.int32)
        logits = self.model(images, training=False)
        loss_sum, weight_sum = masked_cross_entropy(masks, logits, self.class_weights, IGNORE_INDEX)
        predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
        return loss_sum, weight_sum, tf_confusion_matrix(masks, predicted, self.num_classes, IGNORE_INDEX)

    def global_sum(self, values: np.ndarray) -> np.ndarray:
        """Sums a float64 vector over all workers (a collective: every worker must call it)."""
        import tensorflow as tf

        # float64 holds integer counts exactly up to 2**53.
        return self._all_sum(tf.constant(np.asarray(values, np.float64))).numpy()

    def _batches(self, shard, drop_last: bool = True):
        return shard.iter_batches(batch_size=self.cfg.batch_size, drop_last=drop_last, batch_format="numpy", prefetch_batches=2)

    def _val_batches(self, shard):
        """This worker's val batches: streamed the first time, kept in memory after it if they fit VAL_CACHE_BYTES."""
        if isinstance(self.val_batches, list):
            yield from self.val_batches
            return
        kept: list[dict[str, np.ndarray]] | None = [] if self.val_batches is None else None
        size = 0
        columns = ("image", "mask") if self.task != "instance" else ("image_id", "image", "instances", "classes")
        for batch in self._batches(shard, drop_last=False):
            if kept is not None:
                size += sum(batch[c].nbytes for c in columns)
                if size <= VAL_CACHE_BYTES:
                    kept.append({c: np.array(batch[c]) for c in columns})
                else:
                    kept = None  # too big to keep: streamed every epoch
            yield batch
        self.val_batches = kept if kept is not None else False

    def run_epoch(self, shard, train: bool, keep_preview: bool = False) -> tuple[float, float, np.ndarray, int, float]:
        """One pass over this worker's shard; returns global (loss_sum, weight_sum, cm, images, seconds).

        Training batches drop the remainder so that every worker runs the same
        number of collective steps (the shards are split equally).
        ``keep_preview``: keep the first few images and masks of the pass (once)
        for ``preview``.
        """
        import tensorflow as tf

        C = self.num_classes
        step = self.train_step if train else self.eval_step
        loss_sum, weight_sum, cm, images = 0.0, 0.0, np.zeros((C, C), np.int64), 0
        t0 = time.time()
        for batch in self._batches(shard) if train else self._val_batches(shard):
            if train and not self.before_step():
                break
            if keep_preview and self.kept is None:
                self.kept = (np.array(batch["image"][:PREVIEW_IMAGES]), np.array(batch["mask"][:PREVIEW_IMAGES]))
            ls, ws, c = step(tf.constant(batch["image"]), tf.constant(batch["mask"]))
            loss_sum += float(ls)
            weight_sum += float(ws)
            cm += c.numpy()
            images += len(batch["image"])
            if train:
                self.steps_done += 1
        seconds = time.time() - t0
        total = self.global_sum(np.concatenate([[loss_sum, weight_sum, images, seconds], cm.ravel()]))
        seconds = float(total[3]) / self.world_size  # the same on every worker
        if not train:
            self.budget.reserve = seconds  # room the time budget keeps for the next validation pass
        return float(total[0]), float(total[1]), np.rint(total[4:]).astype(np.int64).reshape(C, C), int(total[2]), seconds

    def run_instance_epoch(self, shard, train: bool, records_uri: str | None = None) -> tuple[float, float, int, float, InstanceMetrics | None]:
        """One pass of an instance run over this worker's shard; returns global (loss_sum, images, images, seconds, metrics).

        The loss sum is the Mask R-CNN terms summed, per image, over every
        worker's images. Validation with ``records_uri`` (a folder of the run)
        also predicts every val image (``predict_instances``) and scores it
        against its truth; each worker writes its metric records there and
        reads every worker's back after the collective, so every worker has
        the same AP50 (the same best-model and early-stopping decisions).
        """
        import tensorflow as tf

        from segray.metrics import InstanceMetrics
        from segray.models import predict_instances

        step = self.train_step if train else self.eval_step
        metrics = InstanceMetrics(self.num_classes) if records_uri and not train else None
        loss_sum, weight_sum, images = 0.0, 0.0, 0
        t0 = time.time()
        for batch in self._batches(shard) if train else self._val_batches(shard):
            if train and not self.before_step():
                break
            ls, ws = step(tf.constant(batch["image"]), tf.constant(batch["instances"]), tf.constant(batch["classes"]))
            loss_sum += float(ls)
            weight_sum += float(ws)
            images += len(batch["image"])
            if train:
                self.steps_done += 1
            elif metrics is not None:
                found = predict_instances(self.model, self.model_input(tf.constant(batch["image"])))
                for i, image_id in enumerate(batch["image_id"]):
                    truth = batch["instances"][i]
                    metrics.add(str(image_id), truth, batch["classes"][i][: int(truth.max())], found[i]["instances"],
                                found[i]["classes"], found[i]["scores"])
        seconds = time.time() - t0
        total = self.global_sum(np.array([loss_sum, weight_sum, images, seconds]))
        seconds = float(total[3]) / self.world_size
        if not train:
            self.budget.reserve = seconds
        if metrics is not None and self.world_size > 1:
            metrics = self._merged_records(metrics, records_uri)
        return float(total[0]), float(total[1]), int(total[2]), seconds, metrics

    def _merged_records(self, metrics, records_uri: str):
        """Every worker's val metric records: written to ``records_uri`` by each, read back by each after a collective."""
        import io

        import pyarrow.parquet as pq

        from segray import storage
        from segray.metrics import InstanceMetrics

        import ray.train

        rank = ray.train.get_context().get_world_rank()
        buf = io.BytesIO()
        pq.write_table(metrics.to_arrow(), buf)
        storage.write_bytes(storage.join(records_uri, f"{rank}.parquet"), buf.getvalue())
        self.global_sum(np.zeros(1))  # a barrier: every worker's file is written
        parts = [InstanceMetrics.from_arrow(pq.read_table(io.BytesIO(storage.read_bytes(storage.join(records_uri, f"{r}.parquet")))), self.num_classes)
                 for r in range(self.world_size)]
        # The next write of these files comes after the next train pass's collective: every worker has read them by then.
        return InstanceMetrics.merged(parts)

    def instance_metrics(self, train_shard, val_shard, records_uri: str) -> tuple[dict[str, float], int, float]:
        """An instance epoch: train, then validate; returns (history columns, train images, train seconds)."""
        loss_sum, weight_sum, images, train_seconds, _ = self.run_instance_epoch(train_shard, train=True)
        val_sum, val_weight, _, _, metrics = self.run_instance_epoch(val_shard, train=False, records_uri=records_uri)
        summary = metrics.summary() if metrics is not None else {}
        out = {
            "train_loss": loss_sum / weight_sum if weight_sum else float("nan"),
            "val_loss": val_sum / val_weight if val_weight else float("nan"),
        }
        for key in ("ap50", "ap", "ap75", "pq"):
            out[f"val_{key}"] = float(summary.get(key, float("nan")))
        return out, images, train_seconds

    def preview(self) -> np.ndarray | None:
        """image | truth | prediction of the kept validation images with the current weights (rank 0 only)."""
        import tensorflow as tf

        if self.kept is None:
            return None
        images, masks = self.kept
        normalised = self.model_input(tf.constant(images))
        pred = tf.argmax(self.model(normalised, training=False), axis=-1).numpy()
        colours = [c.color for c in self.info.classes if c.id != self.info.ignore_index]
        return preview_strips(normalised.numpy(), masks, pred, self.info.mean, self.info.std, colours)

    def learning_rate(self) -> float:
        return self.optimization.learning_rate()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: {"config": TrainConfig dict, "dataset_info": json, "run_uri"}."""
    import ray.train

    cfg = TrainConfig.from_dict(loop_config["config"])
    info = DatasetInfo.from_json(loop_config["dataset_info"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    worker = WorkerLoop(cfg, info, ctx.get_world_size())
    instance = worker.task == "instance"
    # Where an instance run's workers leave their val metric records for each other (more than one worker).
    records_uri = storage.join(loop_config["run_uri"], VAL_RECORDS_DIR)

    start_epoch, history, best, stale = 0, [], -1.0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_state(directory, worker.net, worker.optimizer)
        start_epoch, history, best, stale = state["epoch"] + 1, state["history"], state["best"], state["stale"]
        worker.optimization.restore(state)

    artifacts = RunArtifacts(loop_config["run_uri"]) if rank == 0 else None
    tracker = EpochLogger(loop_config["run_uri"], loop_config["mlflow"]) if rank == 0 and loop_config.get("mlflow") else None
    export_model = None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard(val_dataset_name(rank))

    stopped = "epochs"  # why the loop ends (ended.json): all epochs, unless a break says otherwise
    for epoch in range(start_epoch, cfg.epochs):
        if worker.budget.limited and epoch > start_epoch and worker.budget.exhausted():
            if rank == 0:
                print(f"time budget {cfg.time_budget:g} s reached after {epoch} epoch(s); the best model is kept", file=sys.__stdout__, flush=True)
            stopped = "time_budget"
            break
        t0 = time.time()
        if instance:
            metrics, images, train_seconds = worker.instance_metrics(train_shard, val_shard, records_uri)
        else:
            loss_sum, weight_sum, cm, images, train_seconds = worker.run_epoch(train_shard, train=True)
            metrics = epoch_metrics("train", loss_sum, weight_sum, cm, info.class_names)
            metrics.update(epoch_metrics("val", *worker.run_epoch(val_shard, train=False, keep_preview=rank == 0)[:3], info.class_names))
        ended_at = time.time()
        metrics.update(epoch=epoch, lr=worker.learning_rate(), seconds=ended_at - t0, ended_at=ended_at,
                       train_images_per_s=images / max(train_seconds, 1e-9))
        history.append(metrics)
        if instance:
            # best: [AP50, -val loss] of the best epoch so far (a JSON list in the checkpoint's state).
            score = instance_score(metrics)
            improved = best == -1.0 or score > tuple(best)
            if improved:
                best, stale = list(score), 0
            else:
                stale += 1
                worker.optimization.after_epoch(stale)
        else:
            val_miou = metrics["val_miou"] if np.isfinite(metrics["val_miou"]) else 0.0
            improved = val_miou > best
            if improved:
                best, stale = val_miou, 0
            else:
                stale += 1
                worker.optimization.after_epoch(stale)

        if rank == 0:
            # To the process's own stdout: Ray Train V2 patches print() to log
            # the line and also tee it to the wrapped stdout, which showed it twice.
            print(epoch_line(metrics, cfg.epochs), file=sys.__stdout__, flush=True)
        state = {"epoch": epoch, "history": history, "best": best, "stale": stale, "lr": metrics["lr"]}
        if rank == 0:
            artifacts.write_epoch(history, worker.preview())
            if tracker is not None:
                tracker.log(metrics)
            if improved:
                if export_model is None:
                    export_model = float32_model(cfg, info.num_classes)
                artifacts.write_best_model(export_model, worker.model.get_weights(), epoch, metrics, preprocessing_of(cfg, info))
            if epoch == cfg.epochs - 1:
                # Before the last report: a search's scheduler stops the trial from outside
                # when it sees that report, and the workers may not get past it.
                write_end(loop_config["run_uri"], len(history), cfg.epochs, "epochs")
            with tempfile.TemporaryDirectory() as tmp:
                save_state(tmp, worker.net, worker.optimizer, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        if cfg.patience and stale >= cfg.patience:
            stopped = "patience"
            break
        if worker.out_of_time:
            if rank == 0:
                print(f"time budget {cfg.time_budget:g} s reached after {epoch + 1} epoch(s); the best model is kept", file=sys.__stdout__, flush=True)
            stopped = "time_budget"
            break
    if instance and worker.world_size > 1:
        worker.global_sum(np.zeros(1))  # every worker has read the last records
        if rank == 0 and storage.exists(records_uri):
            for entry in storage.list_files(records_uri):
                storage.delete_file(entry.uri)
    if rank == 0:
        # Last: a run without it is still training or was killed (`segray export` refuses it).
        write_end(loop_config["run_uri"], len(history), cfg.epochs, stopped)
