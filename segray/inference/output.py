"""OUT: claiming it for one run, finding what is done, merging the parts.

``_run.json`` is written before anything else and names what the results
depend on (the model's weights, the source, the settings that change a
prediction). A later run with the same ones resumes; any other is refused, so
one OUT never mixes the results of two models or sources.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

import pyarrow as pa

from segray import storage
from segray.inference.tables import OK, RECORD_SCHEMA, latest_records
from segray.inference.writer import MASKS, PARTS

RUN_FILE = "_run.json"


def claim(out: str, identity: dict[str, Any], flag: str = "--output") -> None:
    """Writes ``OUT/_run.json`` or checks that the one there matches ``identity``.

    Raises:
        FileExistsError: OUT holds results of another model, source or
            settings, or files that are not segray results.
    """
    path = storage.join(out, RUN_FILE)
    if storage.exists(path):
        try:
            old = json.loads(storage.read_text(path))
        except json.JSONDecodeError:
            raise FileExistsError(f"{flag} {out}: {path} is not valid JSON; choose another {flag} or delete it") from None
        if old != identity:
            diff = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {identity.get(k)!r} now" for k in diff[:4])
            raise FileExistsError(
                f"{flag} {out} holds results of another run ({shown}); "
                f"choose another {flag}, or delete it to start over"
            )
        return
    if storage.list_files(out, limit=1):
        raise FileExistsError(f"{flag} {out} holds files but no {RUN_FILE}: it is not a segray results folder; choose an empty or new {flag}")
    storage.write_text(path, json.dumps(identity, indent=2, sort_keys=True))


def read_parts(out: str, columns: list[str] | None = None) -> pa.Table:
    """Every record written under ``OUT/_parts`` (empty table when none)."""
    import pyarrow.parquet as pq

    files = [f.uri for f in storage.list_files(storage.join(out, PARTS)) if f.uri.endswith(".parquet")]
    schema = RECORD_SCHEMA if columns is None else pa.schema([RECORD_SCHEMA.field(c) for c in columns])
    if not files:
        return schema.empty_table()
    fs, _ = storage.filesystem(out)
    paths = [storage.filesystem(f)[1] for f in files]
    return pq.read_table(paths, filesystem=fs, schema=schema, columns=columns)


def written_masks(out: str) -> set[str]:
    """Ids whose mask file is in place."""
    root = storage.join(out, MASKS)
    prefix = storage.filesystem(root)[1].rstrip("/") + "/"
    ids = set()
    for f in storage.list_files(root):
        path = storage.filesystem(f.uri)[1]
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)
        if rel.endswith(".png"):
            ids.add(rel[: -len(".png")].replace("\\", "/"))
    return ids


def completed(out: str) -> set[str]:
    """Ids with an ``ok`` record and a mask: what a re-run skips. Errors are tried again."""
    import pyarrow.compute as pc

    records = read_parts(out, ["image_id", "status"])
    ok = set(records.filter(pc.equal(records["status"], OK))["image_id"].to_pylist())
    return ok & written_masks(out) if ok else set()


def merged_records(out: str, ids: list[str]) -> pa.Table:
    """One record per id of this source (``latest_records``), sorted by id."""
    records = latest_records(read_parts(out))
    if records.num_rows:
        import pyarrow.compute as pc

        records = records.filter(pc.is_in(records["image_id"], pa.array(ids, pa.string())))
    return records.sort_by("image_id")


_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}$")


def remove_temporaries(out: str) -> int:
    """Deletes the temporary files of writes a crash interrupted (local OUT only; S3 PUTs leave none)."""
    if storage.is_s3(out):
        return 0
    stale = [f.uri for f in storage.list_files(out) if _TEMPORARY.search(f.uri)]
    for uri in stale:
        storage.delete_file(uri)
    return len(stale)
