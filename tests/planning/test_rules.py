"""The plan's rules on synthetic fingerprints: no dataset, no Ray."""

from __future__ import annotations

import pytest

from segray.planning.fingerprint import ClassFingerprint, Fingerprint
from segray.planning.plan import Plan, PlanChoice
from segray.planning.rules import BYTES_PER_PIXEL_WIDTH, GPU_MEMORY_BYTES, Machine, oversample_rule, patch_rule, plan_choices

TWO_CORES = Machine(nodes=1, cpus=2, gpus=0)


def fp(frequencies: list[float], size: tuple[int, int] = (256, 256), images: int = 40, grey: bool = True) -> Fingerprint:
    classes = [ClassFingerprint(name=f"c{i}", frequency=f, images=1.0 if f else 0.0, object_size=10.0, object_size_p90=20.0)
               for i, f in enumerate(frequencies)]
    shift = 0.0 if grey else 30.0
    return Fingerprint(
        train_images=images, sampled_images=images, median_size=list(size), min_size=list(size), max_size=list(size), channels=3,
        percentiles=[[10.0 + i * shift, 100.0, 250.0 - i * shift] for i in range(3)], mean=[100.0] * 3, std=[40.0] * 3, classes=classes,
    )


def plan_of(fingerprint: Fingerprint, choices: dict) -> Plan:
    """A 10-minute CPU plan for ``/d`` made of ``plan_choices``' output."""
    return Plan(data="/d", time_budget=600.0, gpu=False, fingerprint=fingerprint,
                choices={k: PlanChoice(value=v, reason=why) for k, (v, why) in choices.items()})


@pytest.mark.parametrize("rare, expected_at_least", [(0.1, 0.33), (0.005, 0.5), (0.0005, 0.66)])
def test_rarer_classes_raise_foreground_oversampling(rare, expected_at_least):
    common = oversample_rule(fp([0.6, 0.2, 0.2]))[0]
    share, reason = oversample_rule(fp([0.8 - rare, 0.2, rare]))
    assert share >= expected_at_least and share >= common
    assert "c2" in reason  # names the rarest class
    assert plan_choices(fp([0.8 - rare, 0.2, rare]), 3, 600.0, False, TWO_CORES)["class_weights"][0] == ("auto" if rare < 0.01 else "none")
    # Monotone: the rarer the rarest class, the larger the share.
    assert oversample_rule(fp([0.79, 0.2, 0.0001]))[0] > oversample_rule(fp([0.7, 0.2, 0.1]))[0]


def test_bigger_images_give_bigger_patches_within_memory():
    for gpu in (False, True):
        small, _ = patch_rule(fp([0.5, 0.5], size=(96, 128)), gpu, 2)
        big, _ = patch_rule(fp([0.5, 0.5], size=(2048, 3072)), gpu, 2)
        assert small == [96, 128], small  # a small image is one whole patch
        assert big[0] * big[1] > small[0] * small[1]
        assert big[0] <= 2048 and big[1] <= 3072
        if gpu:  # a batch of 2 at width 32 fits the memory target
            assert big[0] * big[1] * 32 * 2 * BYTES_PER_PIXEL_WIDTH <= GPU_MEMORY_BYTES
    assert patch_rule(fp([0.5, 0.5], size=(2048, 3072)), True, 2)[0] > patch_rule(fp([0.5, 0.5], size=(2048, 3072)), False, 2)[0]


def test_every_choice_has_a_reason_and_a_longer_budget_affords_a_larger_model():
    short = plan_choices(fp([0.7, 0.25, 0.05], size=(512, 512)), 3, 120.0, False, TWO_CORES)
    long = plan_choices(fp([0.7, 0.25, 0.05], size=(512, 512)), 3, 7200.0, False, TWO_CORES)
    assert all(isinstance(why, str) and why for _, why in short.values())
    assert long["model_options"][0]["width"] > short["model_options"][0]["width"]
    assert short["time_budget"][0] == 120.0 and short["workers"][0] == 1 and short["cpus_per_worker"][0] == 2
    # Colour images keep their up and down: no 90-degree turns, no elastic.
    colour = plan_choices(fp([0.7, 0.3], grey=False), 2, 600.0, False, TWO_CORES)["augment_set"][0]
    assert "rot90" not in colour and "elastic" not in colour and "flip" in colour
    assert "rot90" in short["augment_set"][0]


def test_deep_supervision_follows_the_depth_and_a_given_model_drops_it():
    from segray.planning.apply import config_from

    deep = plan_choices(fp([0.7, 0.3], size=(512, 512)), 2, 600.0, False, TWO_CORES)
    assert deep["model_options"][0]["depth"] >= 3 and deep["deep_supervision"][0] is True
    shallow = plan_choices(fp([0.7, 0.3], size=(32, 32)), 2, 600.0, False, TWO_CORES)
    assert shallow["model_options"][0]["depth"] < 3 and shallow["deep_supervision"][0] is False
    assert "fewer than the 2 lower decoder levels" in shallow["deep_supervision"][1]
    # A given model (or model_options) drops the planned heads rather than refuse the run.
    plan = plan_of(fp([0.7, 0.3], size=(512, 512)), deep)
    assert config_from({"data": "/d", "storage": "/s", "name": "n"}, (plan, "/d/plan.json")).deep_supervision is True
    given = config_from({"data": "/d", "storage": "/s", "name": "n", "model": "segnet"}, (plan, "/d/plan.json"))
    assert given.model == "segnet" and given.deep_supervision is False


def test_the_plan_trains_in_float32_and_reads_which_cpus_compute_bfloat16(tmp_path):
    from segray.runtime import cpu_has_bf16

    data = fp([0.7, 0.3], size=(768, 1024))
    cpu = plan_choices(data, 2, 1800.0, False, TWO_CORES)["mixed_precision"]
    gpu = plan_choices(data, 2, 1800.0, True, Machine(nodes=1, cpus=8, gpus=1))["mixed_precision"]
    # bfloat16 was faster on EPFL but not better on val in the same budget: the reason says so.
    assert cpu[0] is False and "no better val mIoU" in cpu[1]
    assert gpu[0] is False and "--mixed-precision" in gpu[1]
    # Which CPUs --mixed-precision trains in bfloat16 on, from a cpuinfo file's flags.
    for flags, expected in [("fpu avx2 avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx2 avx512f avx512bw", False)]:
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
        assert cpu_has_bf16(str(info)) is expected, flags
    assert cpu_has_bf16(str(tmp_path / "absent")) is False


def test_a_planned_boolean_is_turned_off_by_its_no_flag_and_recorded():
    from segray.cli import build_parser, values_of
    from segray.planning.apply import config_from

    choices = plan_choices(fp([0.7, 0.3], size=(512, 512)), 2, 600.0, False, TWO_CORES)
    plan = plan_of(fp([0.7, 0.3], size=(512, 512)), choices)
    args = build_parser().parse_args(["train", "--data", "/d", "--storage", "/s", "--name", "n", "--no-deep-supervision", "--mixed-precision"])
    values = values_of(args)
    assert values["deep_supervision"] is False and values["mixed_precision"] is True
    cfg = config_from(values, (plan, "/d/plan.json"))
    assert cfg.deep_supervision is False and cfg.mixed_precision is True
    assert cfg.plan["overridden"]["deep_supervision"] == {"plan": True, "given": False}
    assert cfg.plan["overridden"]["mixed_precision"] == {"plan": False, "given": True}


def test_a_resumed_run_keeps_its_own_config_over_the_plan(tmp_path):
    """Resume is training's (segray.training.config_from); planning.config_from applies a plan only."""
    from segray.config import TrainConfig
    from segray.planning import config_from as planned
    from segray.training import config_from
    from segray.runs import write_config
    from segray.tuning import trial_config

    choices = plan_choices(fp([0.7, 0.3], size=(512, 512)), 2, 600.0, False, TWO_CORES)
    plan = (plan_of(fp([0.7, 0.3], size=(512, 512)), choices), "/d/plan.json")
    started = TrainConfig(data="/d", storage=str(tmp_path), name="r", model="segnet", epochs=7, lr=0.005)
    write_config(str(tmp_path / "r"), started.to_dict(), {}, exclusive=True)
    given = {"data": "/d", "storage": str(tmp_path), "name": "r", "resume": True}
    for cfg in (config_from(given), config_from(given, plan), trial_config(given, {}, plan)):
        assert (cfg.model, cfg.epochs, cfg.lr, cfg.resume, cfg.plan) == ("segnet", 7, 0.005, True, started.plan)
    # A run that does not exist yet starts from the given values alone, as before.
    fresh = config_from({**given, "name": "new"}, plan)
    assert fresh.resume and fresh.plan == started.plan and fresh.model == TrainConfig(data="/d", storage="/s", name="n").model
    # The plan alone (no resume branch there) fills the planned fields.
    assert planned({**given, "name": "new"}, plan).plan["source"] == "/d/plan.json"
