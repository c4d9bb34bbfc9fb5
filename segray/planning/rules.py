"""Fixed rules from a dataset fingerprint and a budget to a training plan (nnU-Net's idea, for segray).

Each rule is a small function that returns its value and a one-line reason.
Where a number comes from, the comment beside it says: a published rule
(nnU-Net, Isensee et al. 2021, "nnU-Net: a self-configuring method ..."), a
measurement on the 2-core development machine (``CPU_TRAIN_FLOPS``), or a
choice made on validation data. None was chosen by looking at a test split.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from segray.planning.fingerprint import Fingerprint

# Training FLOPs per second one CPU core gives a U-Net's train step (forward
# + backward, counted as 3x the forward FLOPs of ``models.summary``):
# 67-79 GFLOP/s measured on this project's development machine (AVX-512,
# TensorFlow 2.21, oneDNN) for U-Nets of width 16-32 on 128-256 px patches.
CPU_TRAIN_FLOPS = 70e9
# Two cores do not train twice as fast (memory bandwidth, the step's serial
# parts); measured 1.4-1.6x for 2 threads, so cores count with this exponent.
CORE_SCALING = 0.6
# A GPU's rate is not measured here (the project has no GPU to measure on):
# a conservative 10 TFLOP/s of effective training throughput.
GPU_TRAIN_FLOPS = 10e12
# nnU-Net's memory target for a configuration (about 8 GB of GPU memory).
GPU_MEMORY_BYTES = 8e9
# Activation memory of a U-Net's train step per pixel and per unit of base
# width (forward activations kept for the backward pass, both directions of
# the skip connections, float32): an estimate from the layer shapes, not a measurement.
BYTES_PER_PIXEL_WIDTH = 120
# Optimizer steps a budget should afford at the least before a model is made
# larger: below about a thousand Adam steps a U-Net is still far from
# converged on the data sets tried (shapes, EPFL val split).
MIN_STEPS = 1000
# Largest CPU patch side: a 256x256 patch of batch 4 is about 1 s per step
# on one core for a width-16 U-Net (measured); larger patches leave too few steps.
CPU_MAX_PATCH = 256
# Smallest patch side worth training on (below it a U-Net sees no context).
MIN_PATCH = 64
DEFAULT_BUDGET_S = 1800.0
# Time lost outside the train steps (start of Ray and workers, validation
# passes, checkpoints): measured 15-25% on EPFL-sized runs of 5-10 minutes.
OVERHEAD = 0.25

# The model the rules plan for; what they need to know of it (its stride, its
# decoder levels, its FLOPs) they ask its registry entry.
PLANNED_MODEL = "unet"

FULL_AUGMENT = ["flip", "rot90", "scale", "rotate", "elastic", "brightness", "contrast", "gamma", "noise", "blur"]
NATURAL_AUGMENT = ["flip", "scale", "rotate", "brightness", "contrast", "gamma", "noise", "blur"]


@dataclass(frozen=True)
class Machine:
    """What the plan fits the run to.

    Attributes:
        nodes: nodes that can take a worker.
        cpus: CPUs per node (the smallest node's).
        gpus: GPUs in all.
    """

    nodes: int
    cpus: int
    gpus: int

    @staticmethod
    def detect() -> Machine:
        """The Ray cluster this process is connected to, else this machine."""
        import ray

        if ray.is_initialized():
            alive = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
            if alive:
                cpus = min(int(n["Resources"]["CPU"]) for n in alive)
                if len(alive) == 1:  # a local Ray with more logical CPUs than cores
                    cpus = min(cpus, os.cpu_count() or cpus)
                gpus = int(sum(n["Resources"].get("GPU", 0) for n in alive))
                return Machine(len(alive), max(1, cpus), gpus)
        return Machine(1, os.cpu_count() or 1, 0)


Choice = tuple[Any, str]


def _multiple(side: int, m: int) -> int:
    return max(m, (side // m) * m)


def unet_depth(patch: list[int]) -> Choice:
    # nnU-Net pools until the bottleneck is 4-8 px; 16 px here keeps the
    # deepest, widest level cheap on CPU; at most 5 poolings.
    side = min(patch)
    depth = int(max(2, min(5, math.floor(math.log2(max(side, 4) / 16)))))
    return depth, f"pools until the bottleneck is at least 16 px of a {patch[0]}x{patch[1]} patch (at most 5)"


def train_flops(patch: list[int], width: int, depth: int, num_classes: int) -> float:
    """FLOPs of one patch's train step (3x the forward), from the model's layers."""
    from segray.models import flops_per_image

    return 3.0 * flops_per_image(PLANNED_MODEL, tuple(patch), num_classes, depth=depth, width=width)


def step_rate(machine: Machine, gpu: bool, cpus_per_worker: int, workers: int) -> float:
    """Training FLOPs per second of the whole run."""
    if gpu:
        return GPU_TRAIN_FLOPS * workers
    return CPU_TRAIN_FLOPS * cpus_per_worker**CORE_SCALING * workers


def workers_rule(machine: Machine, gpu: bool) -> tuple[Choice, Choice]:
    from segray.runtime import DATA_PIPELINE_CPUS

    if gpu:
        gpus = max(1, machine.gpus)
        cpus = max(1, min(4, machine.cpus * machine.nodes // gpus - DATA_PIPELINE_CPUS))
        return (gpus, "one worker per GPU"), (cpus, f"up to 4 CPUs per GPU worker for its input, {DATA_PIPELINE_CPUS} left for the data pipeline")
    # One worker per node: TensorFlow's threads share a node's cores without
    # an all-reduce of every gradient between processes on the same machine.
    cpus = max(1, machine.cpus - (DATA_PIPELINE_CPUS if machine.nodes > 1 else 0))
    why = (f"all {machine.cpus} cores of each node as TensorFlow threads; the data pipeline's tasks run beside them at low priority "
           f"with {DATA_PIPELINE_CPUS} logical CPU of their own (they need about 1% of a core per patch here, measured)")
    return (machine.nodes, "one worker per node: threads share a node's cores, processes would all-reduce every gradient"), (cpus, why)


def patch_rule(fp: Fingerprint, gpu: bool, num_classes: int, multiple: int | None = None) -> Choice:
    """nnU-Net: start from the median image size, shrink the larger side until the step fits (memory on GPU, time on CPU).

    ``multiple``: what the sides are rounded to; None: the planned model's at its default options.
    """
    h, w = fp.median_size
    cap = CPU_MAX_PATCH if not gpu else 2048
    ph, pw = min(h, cap), min(w, cap)
    while gpu and ph * pw * 32 * 2 * BYTES_PER_PIXEL_WIDTH > GPU_MEMORY_BYTES and max(ph, pw) > MIN_PATCH:
        if ph >= pw:
            ph //= 2
        else:
            pw //= 2
    # Sides divisible by the model's stride (a smaller image is padded up to it).
    m = multiple or _planned().multiple()
    ph, pw = max(_multiple(ph, m), min(MIN_PATCH, _multiple(h, m))), max(_multiple(pw, m), min(MIN_PATCH, _multiple(w, m)))
    sized = [c for c in fp.classes[1:] if c.object_size_p90 > 0]
    largest = max(sized, key=lambda c: c.object_size_p90) if sized else None
    objects = f"; largest objects: {largest.name}, 90th percentile {largest.object_size_p90:.0f} px a side" if largest else ""
    if gpu:
        why = f"median image {h}x{w}, shrunk until a batch of 2 at width 32 fits {GPU_MEMORY_BYTES / 1e9:.0f} GB (nnU-Net)"
    elif (ph, pw) == (h, w):
        why = f"the whole median image {h}x{w} (at most {CPU_MAX_PATCH} px a side on CPU)"
    else:
        why = f"median image {h}x{w} capped at {CPU_MAX_PATCH} px a side: a larger CPU step leaves too few steps in the budget"
    return [ph, pw], why + objects


def batch_rule(fp: Fingerprint, patch: list[int], gpu: bool) -> Choice:
    if not gpu:
        return 4, "4 patches: the smallest batch whose batch Dice is stable; on CPU more patches per step only cost time"
    pixels = fp.train_images * fp.median_size[0] * fp.median_size[1]
    fit = int(GPU_MEMORY_BYTES // (patch[0] * patch[1] * 32 * BYTES_PER_PIXEL_WIDTH))
    limit = max(2, int(0.05 * pixels / (patch[0] * patch[1])))
    batch = max(2, min(fit, limit, 64))
    return batch, f"as many patches as fit {GPU_MEMORY_BYTES / 1e9:.0f} GB, at least 2, at most 5% of the train pixels per step (nnU-Net)"


def width_rule(patch: list[int], depth: int, batch: int, budget_s: float, rate: float, num_classes: int, gpu: bool) -> tuple[Choice, float]:
    """The widest U-Net (32, 16 or 8 base filters) whose budget affords ``MIN_STEPS`` steps; returns it and the steps it affords."""
    usable = budget_s * (1 - OVERHEAD)
    if gpu:
        steps = usable * rate / (batch * train_flops(patch, 32, depth, num_classes))
        return (32, "32 base filters, doubling per level (nnU-Net)"), steps
    for width in (32, 16, 8):
        steps = usable * rate / (batch * train_flops(patch, width, depth, num_classes))
        if steps >= MIN_STEPS:
            return (width, f"the widest U-Net (of 32, 16, 8) whose budget affords {MIN_STEPS} steps: about {steps:.0f}"), steps
    return (8, f"8 base filters, the smallest; the budget affords only about {steps:.0f} steps (fewer than {MIN_STEPS})"), steps


def oversample_rule(fp: Fingerprint) -> Choice:
    # nnU-Net draws a third of each batch centred on foreground; rarer
    # foreground classes get more (chosen on the EPFL val split's PSD and axon).
    foreground = [c for c in fp.classes[1:] if c.frequency > 0]
    rarest = min(foreground, key=lambda c: c.frequency) if foreground else None
    if rarest is None:
        return 0.0, "no foreground class in the train sample"
    if rarest.frequency < 0.001:
        share = 0.66
    elif rarest.frequency < 0.01:
        share = 0.5
    else:
        share = 0.33
    return share, f"share of patches centred on a pixel of a random present class; rarest class {rarest.name} is {rarest.frequency:.2%} of pixels (nnU-Net 0.33, more below 1% and 0.1%)"


def is_grey(fp: Fingerprint) -> bool:
    p = fp.percentiles
    return all(abs(p[0][i] - p[c][i]) <= 1.0 for c in range(1, len(p)) for i in range(3))


def augment_rule(fp: Fingerprint) -> Choice:
    if is_grey(fp):
        return list(FULL_AUGMENT), "grey images (microscopy-like, no up or down): every flip and 90-degree rotation, scale, rotation, elastic, intensity, noise, blur"
    return list(NATURAL_AUGMENT), "colour images (natural-like: a sky stays up): horizontal flips, scale, small rotations, intensity, noise, blur; no elastic"


def patches_rule(fp: Fingerprint, patch: list[int]) -> Choice:
    h, w = fp.median_size
    n = max(1, round(h * w / (patch[0] * patch[1])))
    return n, f"an epoch covers each image's area about once ({h}x{w} / {patch[0]}x{patch[1]}): validation every epoch stays a small share of the time"


def class_weights_rule(fp: Fingerprint) -> Choice:
    # nnU-Net weights none. On the EPFL val split (10-minute runs) the inverse
    # square root weights took PSD (0.4% of pixels) from IoU 0.00 to 0.20 and
    # val mIoU from 0.487 to 0.498; so below 1% a class gets them.
    seen = [c for c in fp.classes if c.frequency > 0]
    rarest = min(seen, key=lambda c: c.frequency) if seen else None
    if rarest is not None and rarest.frequency < 0.01:
        return "auto", f"inverse square root of frequency: {rarest.name} is {rarest.frequency:.2%} of pixels (below 1%: chosen on val data)"
    return "none", "no class below 1% of pixels: soft Dice over present classes and oversampling balance them (nnU-Net weights none)"


def _planned():
    from segray.models import spec

    return spec(PLANNED_MODEL)


def deep_supervision_rule(options: dict[str, Any]) -> Choice:
    """nnU-Net's deep supervision whenever the planned model has the lower decoder levels it trains heads on."""
    from segray.models import DEEP_SUPERVISION_LEVELS

    levels = _planned().supervised_levels(**options)
    if levels < DEEP_SUPERVISION_LEVELS:
        shown = ", ".join(f"{k}={v}" for k, v in options.items())
        return False, (f"off: {PLANNED_MODEL} with {shown} has {levels} lower decoder level(s), "
                       f"fewer than the {DEEP_SUPERVISION_LEVELS} lower decoder levels it supervises")
    return True, ("heads at 1/2 and 1/4 of the size, for training only (nnU-Net); chosen on val data: "
                  "EPFL val mIoU 0.674 with it, 0.622 without (30 minutes, 2 cores, one run each)")


def mixed_precision_rule(gpu: bool) -> Choice:
    if gpu:
        # Not measured on a GPU here: --mixed-precision gives float16 with loss scaling.
        return False, "float32 (float16 with loss scaling is --mixed-precision; not measured on a GPU by this project)"
    # Chosen on val data: on EPFL (2 cores with AVX-512 BF16) bfloat16 trained
    # 1.30x the images per second (49 epochs in 30 minutes against 38) but
    # reached val mIoU 0.664 against float32's 0.674 (one run each): no gain to plan it for.
    return False, ("float32: bfloat16 (--mixed-precision, on CPUs with bfloat16 instructions) trains 1.30x faster but gave "
                   "no better val mIoU in the same budget (EPFL 30 min: 0.664 against 0.674)")


def plan_choices(fp: Fingerprint, num_classes: int, budget_s: float | None, gpu: bool, machine: Machine) -> dict[str, Choice]:
    """Every plan choice, in table order; keys are TrainConfig fields or plan-only entries (``normalization``, ``validation``)."""
    budget = budget_s if budget_s else DEFAULT_BUDGET_S
    (workers, w_why), (cpus, c_why) = workers_rule(machine, gpu)
    patch, patch_why = patch_rule(fp, gpu, num_classes)
    depth, depth_why = unet_depth(patch)
    # The depth may need a larger stride than the patch was rounded to (5 poolings: 32).
    m = _planned().multiple(depth=depth)
    patch = [_multiple(side, m) for side in patch]
    batch, batch_why = batch_rule(fp, patch, gpu)
    (width, width_why), steps = width_rule(patch, depth, batch, budget, step_rate(machine, gpu, cpus, workers), num_classes, gpu)
    ppi, ppi_why = patches_rule(fp, patch)
    steps_per_epoch = max(1, fp.train_images * ppi // (batch * workers))
    epochs = max(1, math.ceil(2 * steps / steps_per_epoch))
    size = list(fp.median_size)
    size_why = "every image has this size" if fp.min_size == fp.max_size else f"the median size: images vary ({fp.min_size} .. {fp.max_size}) and are resized to it (nnU-Net resamples to the median spacing)"
    choices: dict[str, Choice] = {
        "model": (PLANNED_MODEL, "U-Net: the architecture nnU-Net finds best on most data sets"),
        "model_options": ({"depth": depth, "width": width}, f"depth: {depth_why}; width: {width_why}"),
        "deep_supervision": deep_supervision_rule({"depth": depth, "width": width}),
        "size": (size, size_why),
        "crop": (patch, patch_why),
        "patches_per_image": (ppi, ppi_why),
        "batch_size": (batch, batch_why),
        "normalization": ("zscore", "z-score per channel with the train split's mean and std (nnU-Net: every modality but CT)"),
        "loss": ("ce+dice", "cross-entropy plus soft Dice over the batch and its present classes (nnU-Net)"),
        "dice_weight": (1.0, "CE and Dice weigh the same (nnU-Net)"),
        "class_weights": class_weights_rule(fp),
        "foreground_oversample": oversample_rule(fp),
        "augment": (True, "spatial and intensity augmentation on the data workers (cheaper than the step: measured)"),
        "augment_set": augment_rule(fp),
        "augment_strength": (1.0, "nnU-Net's magnitudes: scale 0.7-1.4, rotation up to 180 degrees (microscopy) or 15, gamma 0.7-1.5"),
        "optimizer": ("adam", "Adam: converges in the thousands of steps a budget affords; nnU-Net's SGD (momentum 0.99) needs 250k"),
        "lr": (2e-3, "Adam at 2e-3 behind a warm-up (between Keras' 1e-3 and the 3e-3 of benchmarks/train_epfl.py)"),
        "schedule": ("poly", "poly decay (1 - progress)^0.9 (nnU-Net), progress by step or by the time budget, whichever is further"),
        "warmup": (0.05, "linear warm-up over the first 5% of training: Adam's first steps on BatchNorm statistics are noisy"),
        "time_budget": (float(budget), "given with --time-budget" if budget_s else f"default budget {DEFAULT_BUDGET_S / 60:.0f} minutes (no --time-budget given)"),
        "epochs": (epochs, f"a cap, about twice the {steps:.0f} steps the budget affords at the calibrated rate; the time budget stops training"),
        "validation": ("every epoch", "val mIoU after each epoch picks the kept model (an epoch is one cover of the train images)"),
        "patience": (0, "no early stopping: the poly schedule ends at the budget"),
        "workers": (workers, w_why),
        "cpus_per_worker": (cpus, c_why),
        "gpu": (gpu, "--gpu given" if gpu else "CPU training (no --gpu)"),
        "mixed_precision": mixed_precision_rule(gpu),
    }
    return choices
