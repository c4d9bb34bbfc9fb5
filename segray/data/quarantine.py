"""``_errors.parquet``: the inputs a job rejected, one row per file with the reason.

Ingest, predict and evaluate all write it with ``write_errors``: one schema
(``uri``, ``reason``), rows sorted and without repeats, so the same inputs
give the same table whichever job rejected them.
"""

from __future__ import annotations

import pyarrow as pa

from segray import storage

ERRORS_FILE = "_errors.parquet"
ERRORS_SCHEMA = pa.schema([("uri", pa.string()), ("reason", pa.string())])


def errors_uri(folder: str) -> str:
    return storage.join(folder, ERRORS_FILE)


def write_errors(folder: str, errors: list[tuple[str, str]]) -> str:
    """Writes ``FOLDER/_errors.parquet`` from ``(uri, reason)`` pairs; returns its URI."""
    rows = [{"uri": u, "reason": r} for u, r in sorted(set(errors))]
    uri = errors_uri(folder)
    storage.write_parquet(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), uri)
    return uri
