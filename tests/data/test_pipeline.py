"""The training input pipeline and its transforms."""

from __future__ import annotations

import numpy as np
import pytest

from segray.config import IngestConfig
from segray.data import ingest, read_split, synthesize
from segray.data.info import IGNORE_INDEX
from segray.data.transforms import augment, fit, normalize, random_crop


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("pipe")
    synthesize(str(root / "raw"), n=20, size=(48, 64), num_classes=4, seed=5, show_progress=False)
    return ingest(IngestConfig(source=str(root / "raw"), destination=str(root / "ds"), val_fraction=0.25))


def test_read_split_decodes_and_normalises(dataset):
    rows = read_split(dataset.dst, "train").take_all()
    assert len(rows) == dataset.info.splits["train"]
    images = np.stack([r["image"] for r in rows])
    masks = np.stack([r["mask"] for r in rows])
    # uint8 up to the worker; the training step normalises in its graph.
    assert images.dtype == np.uint8 and images.shape[1:] == (48, 64, 3)
    assert masks.dtype == np.uint8 and masks.shape[1:] == (48, 64)
    # Normalised with the train statistics: mean ~0 and std ~1 per channel.
    normalised = normalize(images, dataset.info.mean, dataset.info.std)
    np.testing.assert_allclose(normalised.reshape(-1, 3).mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(normalised.reshape(-1, 3).std(0), 1, atol=1e-3)
    assert set(np.unique(masks)) <= {0, 1, 2, 3}


def test_read_split_fits_crops_and_augments(dataset):
    rows = read_split(dataset.dst, "val", size=(32, 32), crop=(16, 24), augment=True, seed=1).take_all()
    assert len(rows) == dataset.info.splits["val"]
    for r in rows:
        assert r["image"].shape == (16, 24, 3) and r["mask"].shape == (16, 24)
        assert np.isfinite(r["image"]).all()


def test_missing_split_and_non_dataset_fail_clearly(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="split 'test' has no shards"):
        read_split(dataset.dst, "test")
    with pytest.raises(FileNotFoundError, match="not an ingested dataset"):
        read_split(str(tmp_path), "train")


def _coded_pair(h=24, w=24):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, (h, w)).astype(np.uint8)
    # The image carries its own labels in channel 0, so any geometric
    # mismatch between image and mask shows.
    image = np.stack([mask * 50.0, rng.uniform(0, 255, (h, w)), np.full((h, w), 7.0)], -1).astype(np.float32)
    return image, mask


@pytest.mark.parametrize("shape", [(24, 24), (16, 28)])
def test_augment_keeps_image_and_mask_aligned(shape):
    image, mask = _coded_pair(*shape)
    for seed in range(20):
        img, msk = augment(image, mask, np.random.default_rng(seed), scale_range=(1.0, 1.0), brightness=0, contrast=0)
        assert msk.shape == shape and img.shape == shape + (3,)
        np.testing.assert_array_equal(img[..., 0], msk * 50.0)


def test_augment_strength_zero_keeps_flips_and_rotations_only():
    image, mask = _coded_pair()
    for seed in range(10):
        full = augment(image, mask, np.random.default_rng(seed), scale_range=(1.0, 1.0), brightness=0, contrast=0)
        zero = augment(image, mask, np.random.default_rng(seed), strength=0.0)
        np.testing.assert_array_equal(zero[0], full[0])
        np.testing.assert_array_equal(zero[1], full[1])


def test_augment_is_seeded():
    image, mask = _coded_pair()
    a = augment(image, mask, np.random.default_rng(3))
    b = augment(image, mask, np.random.default_rng(3))
    c = augment(image, mask, np.random.default_rng(4))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_fit_pad_marks_padding_as_ignore():
    image, mask = _coded_pair(10, 12)
    img, msk = fit(image, mask, (16, 16), mode="pad")
    assert img.shape == (16, 16, 3)
    np.testing.assert_array_equal(msk[:10, :12], mask)
    assert (msk[10:] == IGNORE_INDEX).all() and (msk[:, 12:] == IGNORE_INDEX).all()
    crop_img, crop_msk = random_crop(image, mask, (20, 20), np.random.default_rng(0))
    assert crop_img.shape == (20, 20, 3) and (crop_msk == IGNORE_INDEX).any()


def test_parts_cover_the_split_exactly_once(dataset):
    whole = sorted(r["image_id"] for r in read_split(dataset.dst, "val").take_all())
    parts = [sorted(r["image_id"] for r in read_split(dataset.dst, "val", part=(k, 3)).take_all()) for k in range(3)]
    assert sorted(i for p in parts for i in p) == whole
    assert all(not set(a) & set(b) for a in parts for b in parts if a is not b)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, ray_cluster):
    """Small shards (--shard-mb 0.01): several per split, so parts and read tasks span files."""
    root = tmp_path_factory.mktemp("shards")
    synthesize(str(root / "raw"), n=30, size=(32, 32), num_classes=3, seed=2, show_progress=False)
    return ingest(IngestConfig(source=str(root / "raw"), destination=str(root / "ds"), val_fraction=0.0, shard_mb=0.01))


def test_shard_source_reads_every_row_once_across_files_and_parts(many_shards):
    from segray import storage
    from segray.data.shards import read_shards

    shards = [f for f in storage.list_files(f"{many_shards.dst}/train") if f.uri.endswith(".parquet")]
    assert len(shards) >= 3, shards
    rows = read_shards(shards, ["image_id"], include_path=True).take_all()
    assert len(rows) == 30 and len({r["image_id"] for r in rows}) == 30
    assert {r["path"] for r in rows} == {s.uri for s in shards}
    parts = [{r["image_id"] for r in read_shards(shards, ["image_id"], part=(k, 4)).take_all()} for k in range(4)]
    assert sum(len(p) for p in parts) == 30 and set().union(*parts) == {r["image_id"] for r in rows}


def test_shard_source_starts_no_actors_and_names_a_bad_shard(many_shards, tmp_path):
    import ray

    from segray import storage
    from segray.data.shards import read_shards

    from ray._private import state  # GCS actor table (dead ones too); the state API needs a dashboard

    def actors() -> dict[str, str]:
        return {actor_id: a["ActorClassName"] for actor_id, a in state.actors().items()}

    shards = [f for f in storage.list_files(f"{many_shards.dst}/train") if f.uri.endswith(".parquet")]
    before = actors()
    read_shards(shards, ["image_id", "image"]).take_all()
    # Ray 2.60's read_parquet starts 32 FooterReader actors per execution; this
    # source none (Ray Data's own "_"-prefixed singletons aside).
    started = [name for actor_id, name in actors().items() if actor_id not in before and not name.startswith("_")]
    assert not started, started
    ray.data.read_parquet(shards[0].uri).take_all()
    assert "FooterReader" in actors().values(), "the check above could not see actors: it would prove nothing"

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    entries = shards[:1] + [storage.FileEntry(str(bad), bad.stat().st_size)]
    with pytest.raises(Exception, match="bad.parquet: cannot read this shard"):
        read_shards(entries, ["image_id"]).take_all()
    with pytest.raises(Exception, match="no column"):
        read_shards(shards, ["image_id", "nope"]).take_all()


def test_read_split_from_s3(s3, tmp_path, ray_cluster):
    raw = tmp_path / "raw"
    synthesize(str(raw), n=12, size=(32, 32), num_classes=3, seed=1, show_progress=False)
    dst = f"{s3.bucket()}/ds"
    ingest(IngestConfig(source=str(raw), destination=dst, val_fraction=0.25, shard_mb=0.01))
    rows = read_split(dst, "train").take_all() + read_split(dst, "val").take_all()
    assert len({r["image_id"] for r in rows}) == 12
    assert rows[0]["image"].shape == (32, 32, 3) and rows[0]["image"].dtype == np.uint8


def test_decode_tasks_take_several_shards_but_keep_every_core_busy():
    from segray import storage
    from segray.data.shards import TASK_BYTES, TASKS_PER_CPU, decode_tasks

    def shards(n, size):
        return [storage.FileEntry(f"s{i}.parquet", size) for i in range(n)]

    # 36 shards of 4 MiB on 2 cores: about TASK_BYTES (3 shards) per task.
    assert decode_tasks(shards(36, 4 * 2**20), 2) == 36 * 4 * 2**20 // TASK_BYTES == 12
    # Small shards: still TASKS_PER_CPU tasks per core, so the last ones are short.
    assert decode_tasks(shards(40, 2**10), 2) == 2 * TASKS_PER_CPU
    # Never more tasks than shards, and at least one.
    assert decode_tasks(shards(3, 2**10), 8) == 3
    assert decode_tasks(shards(1, 10 * TASK_BYTES), 2) == 1


def test_read_tasks_pass_blocks_on_as_the_transform_makes_them(many_shards):
    """Blocks reach the consumer at the decode batch size, not gathered into one per read task."""
    from segray import storage
    from segray.data.pipeline import DecodeBatch, PipelineConfig
    from segray.data.shards import read_shards

    rows = [[m.num_rows for m in b.metadata] for b in read_split(many_shards.dst, "train", batch_size=2).iter_internal_ref_bundles()]
    sizes = [n for bundle in rows for n in bundle]
    assert sum(sizes) == 30
    # 10 shards of 3 rows: decode batches of 2 and 1 rows. Ray Data's default
    # shaping would have sent one block of 3 per task.
    assert max(sizes) <= 2, rows
    # Several shards per task still read every row once.
    shards = [f for f in storage.list_files(f"{many_shards.dst}/train") if f.uri.endswith(".parquet")]
    decode = DecodeBatch(PipelineConfig(size=(32, 32)))
    ids = [r["image_id"] for r in read_shards(shards, ["image_id", "image", "mask"], transform=decode, rows_per_block=2, tasks=3).take_all()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 30
