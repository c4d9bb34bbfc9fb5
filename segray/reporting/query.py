"""SQL over the tables of a predict (or evaluate) output, and the named questions.

The tables are read with pyarrow through ``segray.storage`` (local or a storage URI)
and registered with an in-memory DuckDB as views, so a query works offline and
on any S3 endpoint without DuckDB's own httpfs extension. A view is read only
when a query names it. The connection may not touch files or the network:
a query reads the output's tables and nothing else (see ``sandboxed_connection``).

Views:

- ``per_image``: one row per image and class (``tp``, ``fp``, ``fn``,
  ``support``, ``iou``, ``dice``; NaN where the class is in neither truth nor
  prediction);
- ``per_class``: the scores of the summed confusion matrix;
- ``confusion``: the summed matrix, rows truth, ``pred_<id>`` columns;
- ``errors``: the rejected inputs (``uri``, ``reason``);
- ``image_confusion``: one row per image and non-zero cell of its own
  confusion matrix (``truth_id``, ``pred_id``, ``pixels``), predict outputs only;
- ``instances``: one row per predicted object (``instances.parquet``), predict
  outputs of an instance model and instance evaluate outputs only;
- ``instance_images``: one row per scored image of those outputs, with its
  object counts and panoptic quality (``instance_images.parquet``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from segray import storage
from segray.data import IGNORE_INDEX, ClassInfo, default_color
from segray.inference import INSTANCE_IMAGES_FILE, INSTANCE_IMAGES_SCHEMA, INSTANCES_FILE, RUN_FILE, TABLES, Output

VIEWS = (*TABLES, "errors", "image_confusion", "instances", "instance_images")
PREDICT_FORMAT, EVALUATE_FORMAT = "segray-predict/", "segray-evaluate/"


@dataclass(frozen=True)
class OutputInfo:
    """What an output folder says about itself.

    Attributes:
        output: the output folder's paths (``uri``: its root).
        kind: ``predict`` or ``evaluate``.
        summary: ``summary.json``.
        classes: the classes, with their colours (``classes.json``; an
            evaluate output without one: ``class_k`` in the default colours).
    """

    output: Output
    kind: str
    summary: dict[str, Any]
    classes: list[ClassInfo]

    @property
    def uri(self) -> str:
        return self.output.root

    @property
    def has_truth(self) -> bool:
        return bool(self.summary.get("has_truth", True))


def _read_json(uri: str) -> Any:
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON ({e})") from None


def open_output(out: str) -> OutputInfo:
    """Checks that ``out`` is a finished predict or evaluate output and reads its summary and classes.

    Raises:
        FileNotFoundError: ``out`` does not exist.
        ValueError: ``out`` is not a segray output, or its predict has not finished.
    """
    from segray.data import load_classes

    layout = Output(out)
    if not storage.exists(layout.run_file):
        if not storage.exists(out) and not storage.is_dir(out):
            raise FileNotFoundError(f"{out}: no such output folder")
        raise ValueError(f"{out} is not a predict or evaluate output: it holds no {RUN_FILE}")
    run = _read_json(layout.run_file)
    fmt = str(run.get("format", "")) if isinstance(run, dict) else ""
    if fmt.startswith(PREDICT_FORMAT):
        kind = "predict"
    elif fmt.startswith(EVALUATE_FORMAT):
        kind = "evaluate"
    else:
        raise ValueError(f"{layout.run_file}: format {fmt!r} is not a segray predict or evaluate output")
    if not storage.exists(layout.summary):
        raise ValueError(f"{out}: no summary.json: the {kind} that writes this output has not finished; run it again to complete it")
    summary = _read_json(layout.summary)
    if storage.exists(layout.classes):
        classes = [c for c in load_classes(layout.classes) if c.id != IGNORE_INDEX]
    else:
        names = summary.get("class_names") or run.get("classes") or []
        classes = [ClassInfo(k, str(n), tuple(default_color(k))) for k, n in enumerate(names)]
    return OutputInfo(layout, kind, summary, classes)


def sandboxed_connection():
    """An in-memory DuckDB connection that can reach no file, folder, extension or network.

    ``enable_external_access`` off is not enough on its own: DuckDB still
    allows its temporary folder (``.tmp`` in the working directory by
    default) and ``<cwd>/:memory:.wal`` and its siblings, where a query could
    COPY, ATTACH and read. So, before any query runs: no temporary folder
    (nothing spills to disk; the tables are in memory already), empty
    ``allowed_directories`` and ``allowed_paths``, external access off, and
    the configuration locked, so a query cannot undo any of it.
    """
    import duckdb

    # Allowed lists can only be emptied while external access is on, so it is turned off after them.
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False, "temp_directory": ""})
    try:
        for statement in (
            "SET allowed_directories = []",
            "SET allowed_paths = []",
            "SET enable_external_access = false",
            "SET lock_configuration = true",
        ):
            con.execute(statement)
    except BaseException:
        con.close()
        raise
    return con


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class OutputTables:
    """An output's tables as DuckDB views, each read the first time a query names it.

    Args:
        out: the output folder (local or a storage URI).
    """

    def __init__(self, out: str):
        import duckdb

        self.info = open_output(out)
        self.layout = self.info.output
        self._duckdb = duckdb
        self._con = sandboxed_connection()
        self._tables: dict[str, pa.Table] = {}

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.info.classes]

    def table(self, name: str) -> pa.Table:
        """The view ``name`` as an Arrow table (read once).

        Raises:
            FileNotFoundError: its file is missing from the output; names the file.
            ValueError: ``name`` is not one of the views.
        """
        if name not in VIEWS:
            raise ValueError(f"unknown table {name!r}; the output's tables are {', '.join(VIEWS)}")
        if name not in self._tables:
            self._tables[name] = self._read(name)
            self._con.register(name, self._tables[name])
        return self._tables[name]

    def _read(self, name: str) -> pa.Table:
        from segray.inference import table_schema

        if name == "image_confusion":
            return self._image_confusion()
        if name == "instances":
            uri = storage.join(self.layout.root, INSTANCES_FILE)
            if not storage.exists(uri):
                raise FileNotFoundError(f"table instances: {uri} is missing; predict writes it for an instance model (maskrcnn) only")
            return storage.read_parquet(uri)
        if name == "instance_images":
            uri = storage.join(self.layout.root, INSTANCE_IMAGES_FILE)
            if not storage.exists(uri):
                if self.info.summary.get("task") == "instance" and not self.info.has_truth:
                    return INSTANCE_IMAGES_SCHEMA.empty_table()
                raise FileNotFoundError(f"table instance_images: {uri} is missing; an instance predict or evaluate with truth writes it")
            return storage.read_parquet(uri)
        uri = self.layout.errors if name == "errors" else self.layout.table(name)
        if not storage.exists(uri):
            if name in TABLES and not self.info.has_truth:
                # A predict without truth masks scores nothing: its tables are empty, not lost.
                return table_schema(name, len(self.info.classes)).empty_table()
            raise FileNotFoundError(f"table {name}: {uri} is missing from the output (deleted, or the {self.info.kind} did not finish)")
        try:
            return storage.read_parquet(uri)
        except (OSError, pa.ArrowInvalid) as e:
            raise ValueError(f"table {name}: {uri} is not a readable Parquet file ({_one_line(e)})") from None

    def _image_confusion(self) -> pa.Table:
        import pyarrow.compute as pc

        from segray.inference import OK, latest_records, read_parts, record_cells

        if self.info.kind != "predict":
            raise ValueError(
                f"table image_confusion: {self.info.uri} is an {self.info.kind} output, which keeps no per-image confusion; "
                "it needs a predict output"
            )
        records = latest_records(read_parts(self.layout, ["image_id", "status", "has_truth", "cm_cells", "cm_counts", "run"]))
        if records.num_rows:
            records = records.filter(pc.and_(pc.equal(records["status"], OK), records["has_truth"]))
        cells = record_cells(records)
        names = np.asarray(self.class_names + [""] * 256, dtype=object)
        return pa.table(
            {
                "image_id": records["image_id"].take(pa.array(cells.owner)) if records.num_rows else pa.array([], pa.string()),
                "truth_id": pa.array(cells.truth.astype(np.int32)),
                "truth_name": pa.array(names[cells.truth].tolist(), pa.string()),
                "pred_id": pa.array(cells.pred.astype(np.int32)),
                "pred_name": pa.array(names[cells.pred].tolist(), pa.string()),
                "pixels": pa.array(cells.pixels),
            }
        )

    def sql(self, text: str) -> pd.DataFrame:
        """Runs one DuckDB query; returns its rows (an empty frame for a statement without rows).

        Raises:
            ValueError: the SQL fails; the message is DuckDB's first line.
            FileNotFoundError: a table the query names is missing from the output.
        """
        try:
            names = self._con.get_table_names(text)
        except self._duckdb.Error as e:
            raise ValueError(f"SQL error: {_one_line(e)}") from None
        for name in sorted(n.lower() for n in names):
            if name in VIEWS:
                self.table(name)
        try:
            relation = self._con.sql(text)
        except self._duckdb.Error as e:
            raise ValueError(f"SQL error: {_one_line(e)}") from None
        if relation is None:
            return pd.DataFrame()
        try:
            return relation.to_arrow_table().to_pandas()
        except self._duckdb.Error as e:
            raise ValueError(f"SQL error: {_one_line(e)}") from None

    def resolve_class(self, value: str | int) -> ClassInfo:
        """A class by name or id.

        Raises:
            ValueError: no such class; names the known ones.
        """
        text = str(value).strip()
        for c in self.info.classes:
            if c.name == text:
                return c
        if text.isdigit() and int(text) < len(self.info.classes):
            return self.info.classes[int(text)]
        known = ", ".join(f"{c.id} {c.name}" for c in self.info.classes)
        raise ValueError(f"class {text!r} is not a class of {self.info.uri} (classes: {known})")


_PER_IMAGE_COLUMNS = "image_id, class_id, class_name, iou, dice, tp, fp, fn, support"


def worst(tables: OutputTables, cls: str | int, k: int = 10) -> pd.DataFrame:
    """The ``k`` images of lowest IoU for ``cls`` among those where it is scored (in truth or prediction).

    Ties are broken by image id, so the answer is the same on every run.
    """
    c = tables.resolve_class(cls)
    return tables.sql(
        f"SELECT {_PER_IMAGE_COLUMNS} FROM per_image WHERE class_id = {int(c.id)} AND NOT isnan(iou) ORDER BY iou, image_id LIMIT {int(k)}"
    )


def below(tables: OutputTables, cls: str | int, threshold: float) -> pd.DataFrame:
    """The images whose IoU for ``cls`` is below ``threshold``, lowest first."""
    c = tables.resolve_class(cls)
    return tables.sql(
        f"SELECT {_PER_IMAGE_COLUMNS} FROM per_image WHERE class_id = {int(c.id)} AND iou < {float(threshold)!r} ORDER BY iou, image_id"
    )


def confused(tables: OutputTables, truth: str | int, predicted: str | int) -> pd.DataFrame:
    """The images with truth ``truth`` pixels predicted as ``predicted``, most such pixels first.

    Columns: ``image_id``, ``truth``, ``predicted``, ``pixels`` (truth pixels
    predicted as the other class), ``truth_pixels`` (the image's pixels of
    ``truth``) and ``share`` (their ratio).
    """
    a, b = tables.resolve_class(truth), tables.resolve_class(predicted)
    if a.id == b.id:
        raise ValueError(f"confused: expected two different classes, got {a.name!r} twice")
    return tables.sql(
        "SELECT c.image_id, c.truth_name AS truth, c.pred_name AS predicted, c.pixels, p.support AS truth_pixels, "
        "c.pixels / p.support AS share "
        "FROM image_confusion c JOIN per_image p ON p.image_id = c.image_id AND p.class_id = c.truth_id "
        f"WHERE c.truth_id = {int(a.id)} AND c.pred_id = {int(b.id)} AND c.pixels > 0 ORDER BY c.pixels DESC, c.image_id"
    )


def iou_histogram(tables: OutputTables, bins: int = 20) -> pd.DataFrame:
    """Per class, how many images fall in each of ``bins`` equal IoU bins over [0, 1] (scored images only).

    Columns: ``class_id``, ``bin`` (0 .. bins-1; IoU 1.0 is in the last), ``images``.
    """
    return tables.sql(
        f"SELECT class_id, CAST(least(floor(iou * {int(bins)}), {int(bins) - 1}) AS INTEGER) AS bin, count(*) AS images "
        "FROM per_image WHERE NOT isnan(iou) GROUP BY ALL ORDER BY class_id, bin"
    )


def format_text(frame: pd.DataFrame) -> str:
    """An aligned text table (NaN as ``-``, floats to 4 decimals)."""
    if frame.empty:
        return "(no rows)" if len(frame.columns) == 0 else " ".join(frame.columns) + "\n(no rows)"
    return frame.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}")


# A report or a query result is never written inside these folders (at any depth).
OUTPUT_FOLDERS = {RUN_FILE: "the predict or evaluate output"}


def check_output_file(uri: str, overwrite: bool, kind: str) -> None:
    """Refuses ``uri`` (the ``output`` field) inside an output folder, or an existing file segray did not write.

    An existing file segray wrote (its sidecar holds its hash) is replaced
    only with ``overwrite``; see ``segray.ownership.check_new_file``.
    """
    from segray.ownership import check_new_file

    check_new_file(uri, "output", overwrite, kind, OUTPUT_FOLDERS)


def result_bytes(frame: pd.DataFrame, uri: str) -> bytes:
    """A query result as the file ``uri`` names by its extension: ``.parquet``, ``.csv`` or ``.json`` (one array of objects)."""
    import pyarrow.parquet as pq

    lower = uri.lower()
    if lower.endswith(".parquet"):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
        return sink.getvalue().to_pybytes()
    if lower.endswith(".csv"):
        return frame.to_csv(index=False).encode("utf-8")
    if lower.endswith(".json"):
        return to_json(frame).encode("utf-8")
    raise ValueError(f"{uri}: expected a file ending in .parquet, .csv or .json")


def write_result(frame: pd.DataFrame, uri: str, overwrite: bool = False) -> None:
    """Writes a query result to ``uri`` (checked by ``check_output_file`` first), with its sidecar."""
    from segray.ownership import write_owned_file

    data = result_bytes(frame, uri)
    check_output_file(uri, overwrite, "query result")
    write_owned_file(uri, data, "query result")


def to_json(frame: pd.DataFrame) -> str:
    """One JSON array of row objects; NaN becomes null."""
    return frame.to_json(orient="records", indent=None, double_precision=15) + "\n"
