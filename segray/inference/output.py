"""OUT, the folder predict and evaluate write: its layout, claiming it, finding what is done.

Every path under OUT comes from ``Output``:

    OUT/_run.json           what the results depend on (written first)
    OUT/classes.json        the model's classes
    OUT/masks/<id>.png      predicted class ids
    OUT/overlays/<id>.png   colour overlays of the first K images
    OUT/_parts/<h>.parquet  one record part per batch (what a re-run skips)
    OUT/per_image.parquet, per_class.parquet, confusion.parquet
    OUT/summary.json        scores, counts, the resolved config
    OUT/_errors.parquet     rejected inputs (``segray.data.quarantine``)

``_run.json`` names what the results depend on (the model's weights, the
source, the settings that change a prediction). A later run with the same
ones resumes; any other is refused, so one OUT never mixes the results of two
models or sources.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from segray import storage
from segray.config import about
from segray.data import write_errors
from segray.inference.tables import OK, RECORD_SCHEMA, empty_tables, format_per_class, latest_records, table_schema, write_frame

RUN_FILE = "_run.json"
MASKS, OVERLAYS, PARTS = "masks", "overlays", "_parts"


@dataclass(frozen=True)
class Output:
    """The paths of one OUT folder (a local path or a storage URI)."""

    root: str

    def inside(self, *parts: str) -> str:
        """``OUT/part/...``, refused when the parts would lead out of OUT (``..``, an absolute path).

        Raises:
            ValueError: the path would leave OUT.
        """
        uri = storage.join(self.root, *parts)
        base = self.root.rstrip("/")
        normal = storage.normalize(uri)
        if any(p.startswith("/") or ".." in p.split("/") for p in parts) or not normal.startswith(base + "/"):
            raise ValueError(f"{'/'.join(parts)!r} would be written outside the output folder {self.root}; refused")
        return uri

    def mask(self, image_id: str) -> str:
        return self.inside(MASKS, f"{image_id}.png")

    def overlay(self, image_id: str) -> str:
        return self.inside(OVERLAYS, f"{image_id}.png")

    def part(self, image_ids: list[str]) -> str:
        """The record part of a batch: named by its ids, so a retried task writes the same file."""
        digest = hashlib.sha1("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()[:20]
        return storage.join(self.root, PARTS, f"{digest}.parquet")

    @property
    def masks(self) -> str:
        return storage.join(self.root, MASKS)

    @property
    def parts(self) -> str:
        return storage.join(self.root, PARTS)

    @property
    def run_file(self) -> str:
        return storage.join(self.root, RUN_FILE)

    @property
    def classes(self) -> str:
        return storage.join(self.root, "classes.json")

    @property
    def summary(self) -> str:
        return storage.join(self.root, "summary.json")

    @property
    def errors(self) -> str:
        """``OUT/_errors.parquet``: the rejected inputs (``segray.data.quarantine``)."""
        from segray.data import errors_uri

        return errors_uri(self.root)

    def table(self, name: str) -> str:
        """``per_image``, ``per_class`` or ``confusion``: its Parquet file."""
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r}; OUT holds {', '.join(TABLES)}")
        return storage.join(self.root, f"{name}.parquet")


TABLES = ("per_image", "per_class", "confusion")


@dataclass(frozen=True)
class PredictResult:
    """What ``segray.predict`` and ``segray.evaluate`` return.

    Attributes:
        output_uri: the OUT folder.
        summary: the contents of ``OUT/summary.json``.
        per_class: the ``per_class.parquet`` DataFrame (no rows without truth).
        per_image: the ``per_image.parquet`` DataFrame, one row per image and class.
        confusion: the ``confusion.parquet`` DataFrame, rows truth, ``pred_<id>`` columns.
        errors: ``(uri, reason)`` of the inputs in ``OUT/_errors.parquet``.
    """

    output_uri: str
    summary: dict[str, Any]
    per_class: Any
    per_image: Any
    confusion: Any
    errors: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        """The per-class table, the headline scores and where the results are, for a person."""
        s = self.summary
        lines = [format_per_class(self.per_class)]
        if s.get("miou") is not None:
            lines.append(f"mIoU {s['miou']:.4f}  mean Dice {s['mean_dice']:.4f}  pixel accuracy {s['pixel_accuracy']:.4f}  ({s['images']} images)")
        if s.get("task") == "instance":
            num = lambda v: "-" if v is None or v != v else f"{v:.4f}"  # noqa: E731 - NaN / JSON null
            lines.append(f"mask AP {num(s.get('ap'))}  AP50 {num(s.get('ap50'))}  AP75 {num(s.get('ap75'))}  PQ {num(s.get('pq'))}  ({s.get('objects', 0)} objects)")
            lines.append(f"objects: {self.output_uri} (instances/, instances.parquet)")
        lines.append(f"results: {self.output_uri} (masks/, per_image.parquet, per_class.parquet, confusion.parquet, summary.json)")
        return "\n".join(lines)


def write_results(
    out: Output, frames: dict[str, Any] | None, num_classes: int, summary: dict[str, Any], errors: list[tuple[str, str]]
) -> PredictResult:
    """Writes ``_errors.parquet``, the tables (``frames``; None: no truth, no tables) and, last, ``summary.json``."""
    write_errors(out.root, errors)
    if frames is None:
        frames = empty_tables(num_classes)
    else:
        for name, frame in frames.items():
            write_frame(frame, table_schema(name, num_classes), out.table(name))
    summary = json.loads(json.dumps(summary, default=json_plain))
    storage.write_text(out.summary, json.dumps(summary, indent=2))
    return PredictResult(out.root, summary, frames["per_class"], frames["per_image"], frames["confusion"], errors)


def json_plain(value: Any) -> Any:
    """``json.dumps``' default for a summary: tuples as lists, numpy scalars as Python ones, NaN as null."""
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {value!r}")


def claim(out: Output, identity: dict[str, Any], field_name: str = "output") -> None:
    """Writes ``OUT/_run.json`` or checks that the one there matches ``identity``.

    Raises:
        FileExistsError: OUT holds results of another model, source or
            settings, or files that are not segray results.
    """
    path = out.run_file
    text = json.dumps(identity, indent=2, sort_keys=True)
    if not storage.exists(path):
        # limit 2: a run that claimed OUT a moment ago has left its _run.json there.
        if any(not storage.basename(f.uri).startswith(RUN_FILE) for f in storage.list_files(out.root, limit=2)):
            raise about(
                field_name,
                FileExistsError(f"{field_name} {out.root} holds files but no {RUN_FILE}: it is not a segray results folder; choose an empty or new `{field_name}`"),
            )
        # Exclusive: of two runs claiming one OUT at once, one creates the file and
        # the other finds it below and is refused unless it is the same run.
        if storage.create_exclusive(path, text.encode("utf-8")):
            return
    try:
        old = json.loads(storage.read_text(path))
    except json.JSONDecodeError:
        raise about(field_name, FileExistsError(f"{field_name} {out.root}: {path} is not valid JSON; choose another `{field_name}` or delete it")) from None
    if old != identity:
        diff = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {identity.get(k)!r} now" for k in diff[:4])
        raise about(
            field_name,
            FileExistsError(f"{field_name} {out.root} holds results of another run ({shown}); choose another `{field_name}`, or delete it to start over"),
        )


def read_parts(out: Output, columns: list[str] | None = None) -> pa.Table:
    """Every record written under ``OUT/_parts`` (empty table when none)."""
    import pyarrow.parquet as pq

    files = [f.uri for f in storage.list_files(out.parts) if f.uri.endswith(".parquet")]
    schema = RECORD_SCHEMA if columns is None else pa.schema([RECORD_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    fs, _ = storage.filesystem(out.root)
    paths = [storage.filesystem(f)[1] for f in files]
    return pq.read_table(paths, filesystem=fs, schema=schema, columns=columns)


def written_masks(out: Output) -> set[str]:
    """Ids whose mask file is in place."""
    root = out.masks
    prefix = storage.filesystem(root)[1].rstrip("/") + "/"
    ids = set()
    for f in storage.list_files(root):
        path = storage.filesystem(f.uri)[1]
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
        if rel.endswith(".png"):
            ids.add(rel[: -len(".png")].replace("\\", "/"))
    return ids


def completed(out: Output) -> set[str]:
    """Ids with an ``ok`` record and a mask: what a re-run skips. Errors are tried again."""
    import pyarrow.compute as pc

    records = read_parts(out, ["image_id", "status"])
    ok = set(records.filter(pc.equal(records["status"], OK))["image_id"].to_pylist())
    return ok & written_masks(out) if ok else set()


def merged_records(out: Output, ids: list[str]) -> pa.Table:
    """One record per id of this source (``latest_records``), sorted by id."""
    records = latest_records(read_parts(out))
    if records.num_rows:
        import pyarrow.compute as pc

        records = records.filter(pc.is_in(records["image_id"], pa.array(ids, pa.string())))
    return records.sort_by("image_id")


def remove_temporaries(out: Output) -> int:
    """Deletes the temporary files of writes a crash interrupted (local OUT only; object stores' uploads leave none)."""
    if not storage.is_local(out.root):
        return 0
    stale = [f.uri for f in storage.list_files(out.root) if storage.TEMPORARY.fullmatch(f.uri)]
    for uri in stale:
        storage.delete_file(uri)
    return len(stale)
