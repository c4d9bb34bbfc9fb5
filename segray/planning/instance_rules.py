"""Fixed rules for an instance dataset: anchors, RoI and mask sizes, detection limit, from its object statistics.

The statistics are ``dataset.json``'s ``objects`` (``segray.data.instance_ingest``):
object sides (sqrt of the area, px) and aspects (box height / width) of the
train split. Images are trained at the planned ``size`` (the median image
size), so objects keep about the sides ingest measured. Where a number
comes from, the comment beside it says: Mask R-CNN (He et al. 2017) with
FPN (Lin et al. 2017), COCO's evaluation rules, or a stated choice.
"""

from __future__ import annotations

import math
from typing import Any

from segray.planning.fingerprint import Fingerprint
from segray.planning.rules import DEFAULT_BUDGET_S, Choice, Machine, is_grey, workers_rule

PLANNED_MODEL = "maskrcnn"
# FPN levels P2..P6 and their strides; one anchor size per level, doubling (FPN).
STRIDES = (4, 8, 16, 32, 64)
# Mask R-CNN's smallest anchor (P2), and the smallest this plan goes to:
# twice the stride of P2, so an anchor still spans more than one feature cell.
BASE_ANCHOR = 32
MIN_BASE_ANCHOR = 8
RATIOS = [0.5, 1.0, 2.0]  # Mask R-CNN's (ratio = box height / width here)
ROI_SIZE = 7  # RoIAlign output of the box head (Mask R-CNN)
MASK_SIZES = (14, 28)  # Mask R-CNN's mask head predicts 28x28; 14 where objects are smaller than that
DETECTIONS = 100  # COCO's AP and AR@100 count at most 100 detections per image
CPU_MAX_SIDE = 512  # larger images are cropped on CPU: a Mask R-CNN step grows with the pixels


def anchor_rule(objects: dict[str, Any]) -> Choice:
    side = objects["all"]["side"]
    p5, p95 = side["p5"], side["p95"]
    base = int(min(BASE_ANCHOR, max(MIN_BASE_ANCHOR, 2 ** round(math.log2(max(p5, 1.0))))))
    sizes = [base * 2**k for k in range(len(STRIDES))]
    covered = "covers" if p95 <= sizes[-1] * 1.5 else "below"
    return sizes, (f"one size per FPN level P2-P6 (strides {', '.join(map(str, STRIDES))}), doubling; the smallest is the power of 2 nearest "
                   f"the 5th percentile of object sides ({p5:.1f} px), within {MIN_BASE_ANCHOR} (2x the P2 stride) .. {BASE_ANCHOR} (Mask R-CNN's); "
                   f"the largest, {sizes[-1]} px, {covered} the 95th percentile ({p95:.1f} px)")


def ratio_rule(objects: dict[str, Any]) -> Choice:
    aspect = objects["all"]["aspect"]
    lo, hi = aspect["p5"], aspect["p95"]
    ratios = list(RATIOS)
    if lo < 0.35:
        ratios.insert(0, 0.25)
    if hi > 2.83:
        ratios.append(4.0)
    extra = "" if ratios == RATIOS else "; extended to 1:4 / 4:1 for the elongated objects beyond 1:2.83"
    return ratios, f"box height / width: Mask R-CNN's 0.5, 1, 2 cover the 5th-95th percentile of object aspects ({lo:.2f} .. {hi:.2f}){extra}"


def mask_rule(objects: dict[str, Any]) -> Choice:
    p90 = objects["all"]["side"]["p90"]
    if p90 > MASK_SIZES[1]:
        return MASK_SIZES[1], f"Mask R-CNN's 28x28 masks: 90% of objects are up to {p90:.1f} px a side, more than 28"
    return MASK_SIZES[0], f"14x14 masks: 90% of objects are at most {p90:.1f} px a side, so a 28x28 mask would only upsample them"


def roi_rule(objects: dict[str, Any]) -> Choice:
    p50 = objects["all"]["side"]["p50"]
    return ROI_SIZE, f"7x7 RoIAlign for the box head (Mask R-CNN); the median object ({p50:.1f} px a side) spans {p50 / STRIDES[0]:.1f} cells of P2"


def detections_rule(objects: dict[str, Any]) -> Choice:
    most = int(objects["per_image"]["max"])
    limit = max(DETECTIONS, int(math.ceil(1.5 * most / 10.0)) * 10)
    why = f"COCO's AP and AR@100 count 100 detections an image" if limit == DETECTIONS else f"1.5x the most objects in one train image ({most}), rounded up to 10"
    return limit, f"{why}; the most objects in one train image: {most}, mean {objects['per_image']['mean']:.1f}"


def instance_plan_choices(fp: Fingerprint, objects: dict[str, Any], budget_s: float | None, gpu: bool, machine: Machine) -> dict[str, Choice]:
    """Every choice of an instance plan, in table order (``model_options`` entries are merged by ``Plan.train_values``)."""
    budget = budget_s if budget_s else DEFAULT_BUDGET_S
    (workers, w_why), (cpus, c_why) = workers_rule(machine, gpu)
    h, w = fp.median_size
    size_why = "every image has this size" if fp.min_size == fp.max_size else f"the median size: images vary ({fp.min_size} .. {fp.max_size}) and are resized to it"
    cap = 1024 if gpu else CPU_MAX_SIDE
    if max(h, w) > cap:
        crop: list[int] | None = [min(h, cap), min(w, cap)]
        crop_why = f"random {crop[0]}x{crop[1]} windows of the {h}x{w} images (at most {cap} px a side {'on a GPU' if gpu else 'on CPU'}); objects cut by a window keep their visible part"
    else:
        crop, crop_why = None, f"whole {h}x{w} images (at most {cap} px a side {'on a GPU' if gpu else 'on CPU'})"
    if is_grey(fp):
        augment_set, aug_why = ["flip", "rot90", "scale", "brightness", "contrast"], "grey images (microscopy-like): flips, 90-degree turns, scale, intensity; the id map moves with the image"
    else:
        augment_set, aug_why = ["flip", "scale", "brightness", "contrast"], "colour images (natural-like: a sky stays up): horizontal flips, scale, intensity; the id map moves with the image"
    return {
        "model": (PLANNED_MODEL, "instance dataset: Mask R-CNN (ResNet-FPN backbone, RPN, box, class and mask heads)"),
        "anchor_sizes": anchor_rule(objects),
        "anchor_ratios": ratio_rule(objects),
        "roi_size": roi_rule(objects),
        "mask_size": mask_rule(objects),
        "max_detections": detections_rule(objects),
        "size": ([h, w], size_why),
        "crop": (crop, crop_why),
        "batch_size": (4 if gpu else 2, "4 images per GPU worker" if gpu else "2 images per step: a Mask R-CNN step on CPU costs seconds, more images only cost time"),
        "augment": (True, "spatial and intensity augmentation on the data workers"),
        "augment_set": (augment_set, aug_why),
        "time_budget": (float(budget), "given with --time-budget" if budget_s else f"default budget {DEFAULT_BUDGET_S / 60:.0f} minutes (no --time-budget given)"),
        "epochs": (1000, "a cap: the time budget stops training"),
        "validation": ("every epoch", "val metrics after each epoch pick the kept model"),
        "workers": (workers, w_why),
        "cpus_per_worker": (cpus, c_why),
        "gpu": (gpu, "--gpu given" if gpu else "CPU training (no --gpu)"),
        "mixed_precision": (False, "float32 (float16 with loss scaling is --mixed-precision; not measured for Mask R-CNN here)"),
    }
