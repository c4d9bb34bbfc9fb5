"""The instance plan's rules, on object statistics made by ingest's own ``ObjectStats`` from synthetic objects (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segray.data import ObjectLabels
from segray.data.instance_ingest import ObjectStats
from segray.planning.fingerprint import ClassFingerprint, Fingerprint
from segray.planning.instance_rules import anchor_rule, detections_rule, instance_plan_choices, mask_rule, ratio_rule
from segray.planning.plan import Plan, PlanChoice
from segray.planning.rules import Machine

TWO_CORES = Machine(nodes=1, cpus=2, gpus=0)


def objects_of(sides: list[tuple[int, int]], per_image: int = 4, size: int = 256) -> dict:
    """``dataset.json``'s objects for images holding ``per_image`` boxes of each (height, width) in ``sides``."""
    stats = ObjectStats(num_classes=2)
    for start in range(0, len(sides), per_image):
        ids = np.zeros((size, size), np.uint16)
        x = 0
        for k, (h, w) in enumerate(sides[start: start + per_image], start=1):
            ids[0:h, x: x + w] = k
            x += w
        n = int(ids.max())
        stats.add("train", ObjectLabels(ids, np.ones(n, np.int32)))
    return stats.summary(["background", "object"], ["train"], 256)


def fingerprint(objects: dict) -> Fingerprint:
    return Fingerprint(train_images=10, sampled_images=10, median_size=[256, 256], min_size=[256, 256], max_size=[256, 256], channels=3,
                       percentiles=[[10.0, 100.0, 250.0]] * 3, mean=[100.0] * 3, std=[40.0] * 3,
                       classes=[ClassFingerprint("background", 0.9, 1.0, 0, 0), ClassFingerprint("object", 0.1, 1.0, 10, 20)], objects=objects)


def test_anchor_sizes_follow_the_object_sizes():
    small = objects_of([(8, 8), (10, 10), (12, 12), (9, 11)] * 5)
    large = objects_of([(40, 40), (50, 50), (60, 60), (45, 55)] * 5)
    small_sizes, why = anchor_rule(small)
    large_sizes, _ = anchor_rule(large)
    assert small_sizes == [8, 16, 32, 64, 128] and large_sizes == [32, 64, 128, 256, 512]
    assert "5th percentile of object sides" in why
    # Statistics round-trip through dataset.json's JSON unchanged.
    assert anchor_rule(json.loads(json.dumps(small)))[0] == small_sizes
    # Medium objects land between the two.
    assert anchor_rule(objects_of([(16, 16), (18, 18), (20, 20), (17, 19)] * 5))[0][0] == 16


def test_mask_size_ratios_and_detection_limit_respond_to_the_objects():
    small = objects_of([(8, 8), (10, 10)] * 10)
    large = objects_of([(40, 40), (60, 60)] * 10)
    assert mask_rule(small)[0] == 14 and mask_rule(large)[0] == 28
    assert ratio_rule(large)[0] == [0.5, 1.0, 2.0]
    elongated = objects_of([(5, 40), (40, 5), (6, 36), (36, 6)] * 5)
    assert ratio_rule(elongated)[0] == [0.25, 0.5, 1.0, 2.0, 4.0]
    crowded = objects_of([(3, 1)] * 300, per_image=150)
    assert detections_rule(small)[0] == 100 and detections_rule(crowded)[0] == 230
    assert "150" in detections_rule(crowded)[1]


def test_the_instance_plan_validates_and_puts_model_options_together():
    objects = objects_of([(8, 8), (10, 10), (12, 12)] * 5)
    choices = instance_plan_choices(fingerprint(objects), objects, 600.0, False, TWO_CORES)
    plan = Plan(data="/d", time_budget=600.0, gpu=False, fingerprint=fingerprint(objects),
                choices={k: PlanChoice(value=v, reason=why) for k, (v, why) in choices.items()})
    again = Plan.from_json(plan.to_json(), "plan.json")
    values = again.train_values()
    assert values["model"] == "maskrcnn"
    assert values["model_options"] == {"anchor_sizes": [8, 16, 32, 64, 128], "anchor_ratios": [0.5, 1.0, 2.0], "roi_size": 7,
                                       "mask_size": 14, "max_detections": 100}
    assert all(c.reason for c in again.choices.values())
    assert again.fingerprint.objects["count"] == 15
    with pytest.raises(Exception, match="anchor_size"):
        Plan.from_dict({**plan.to_dict(), "choices": {"anchor_size": {"value": 1, "reason": "typo"}}})
