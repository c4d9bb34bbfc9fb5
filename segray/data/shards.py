"""A Ray Data source for segray's own Parquet shards.

``ray.data.read_parquet`` in Ray 2.60 (DataSource V2) lists the files and reads
their footers in every execution, with a fresh pool of ``FooterReader`` actors
(32 by default) each time. Ray Train executes a dataset once per epoch, so on a
small cluster every epoch, and every validation pass, paid several seconds of
actor start-up before the first row (7 s for a 19-row split on 2 cores, where
the read itself took 25 ms).

segray already knows its shards (the driver lists them once), so this source
builds the read tasks straight from that list: no listing operator, no footer
actors, the same tasks in every epoch. Each task opens its files inside the
worker from their URIs (so no filesystem object, and no credential, travels
with the task), and can keep only the rows of one hash part of the image ids
before anything is decoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, Callable

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from segray import storage

# Rows per block a read task yields: bounded so a large shard streams.
ROWS_PER_BLOCK = 64

# Encoded bytes a decoding read task takes on (about three default 4 MiB
# shards), and the fewest tasks per CPU. Ray Data dispatches a task when it
# sees the last one finish, on its scheduling tick of up to 0.1 s, so every
# task leaves its core idle for a moment: one task per shard lost about a
# fifth of the cores (benchmarks/input_pipeline.py, 27-row shards). Several
# shards per task cut those gaps; at least TASKS_PER_CPU tasks per core keep
# the last tasks short, so no core waits long for the slowest at the end.
TASK_BYTES = 12 * 2**20
TASKS_PER_CPU = 4

# Decoded blocks a read task may hold that the executor has not taken yet
# (Ray Data's default is 2). Bounds a task's memory to this many blocks of
# pipeline.BATCH_BYTES.
GEN_BUFFER_BLOCKS = 8


def decode_tasks(shards: Sequence[storage.FileEntry], cpus: int) -> int:
    """Read tasks for decoding ``shards`` on ``cpus`` cores: about ``TASK_BYTES`` each, at least ``TASKS_PER_CPU`` per core.

    Never more tasks than shards (a task reads whole shards).
    """
    by_bytes = -(-sum(s.size for s in shards) // TASK_BYTES)
    return max(1, min(len(shards), max(by_bytes, TASKS_PER_CPU * max(1, cpus))))


def stable_hash(text: str) -> int:
    """The same 64-bit hash of an id in every process (Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def in_part(image_ids, index: int, count: int) -> np.ndarray:
    """Boolean mask of the ids whose stable hash modulo ``count`` is ``index``."""
    return np.fromiter((stable_hash(str(i)) % count == index for i in image_ids), bool, len(image_ids))


def _read_shards(
    uris: list[str], columns: list[str], part: tuple[int, int] | None, include_path: bool,
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None, rows_per_block: int = ROWS_PER_BLOCK,
) -> Iterator[Any]:
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor

    for uri in uris:
        fs, path = storage.filesystem(uri)
        try:
            file = pq.ParquetFile(fs.open_input_file(path))
            missing = [c for c in columns if c not in file.schema_arrow.names]
            if missing:
                raise ValueError(f"no column(s) {', '.join(missing)} (columns: {', '.join(file.schema_arrow.names)})")
            for batch in file.iter_batches(batch_size=rows_per_block, columns=columns):
                table = pa.Table.from_batches([batch])
                if part is not None:
                    table = table.filter(pa.array(in_part(table.column("image_id").to_pylist(), *part)))
                if include_path:
                    table = table.append_column("path", pa.array([uri] * table.num_rows, pa.string()))
                if table.num_rows and transform is not None:
                    yield BlockAccessor.batch_to_block(transform({c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in table.column_names}))
                elif table.num_rows:
                    yield table
        except (OSError, ValueError, pa.ArrowException) as e:
            raise type(e)(f"{uri}: cannot read this shard: {e}") from e


class ShardDatasource(Datasource):
    """Rows of a list of Parquet shards, optionally one hash part of them.

    Args:
        shards: the shard files (URIs and sizes, as ``storage.list_files`` gives).
        columns: the columns to read.
        part: (index, count): keep only the rows whose ``image_id`` hashes to
            ``index`` modulo ``count``. The parts of one split cover it exactly
            once, unlike an equal split, which drops the remainder.
        include_path: add a ``path`` column with each row's shard URI.
        transform: applied to each block of rows (numpy columns) inside the
            read task, so decoding runs where the bytes were read: no block of
            encoded rows crosses the object store, and no second operator.
        rows_per_block: rows read (and transformed) at a time.
    """

    def __init__(
        self,
        shards: Sequence[storage.FileEntry],
        columns: Sequence[str],
        part: tuple[int, int] | None = None,
        include_path: bool = False,
        transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        rows_per_block: int = ROWS_PER_BLOCK,
    ):
        if not shards:
            raise ValueError("ShardDatasource needs at least one shard")
        if part is not None and not 0 <= part[0] < part[1]:
            raise ValueError(f"part {part}: expected (index, count) with 0 <= index < count")
        self._shards = list(shards)
        self._columns = list(columns)
        self._part = part
        self._include_path = include_path
        self._transform = transform
        self._rows_per_block = rows_per_block

    def get_name(self) -> str:
        return "SegrayShards"

    def _bytes(self, shards: Sequence[storage.FileEntry]) -> int:
        """Bytes the rows of ``shards`` hold after the part filter (roughly)."""
        size = sum(s.size for s in shards)
        return size // self._part[1] if self._part else size

    def estimate_inmemory_data_size(self) -> int:
        return self._bytes(self._shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        groups = [g for g in np.array_split(np.arange(len(self._shards)), max(1, min(parallelism, len(self._shards)))) if len(g)]
        tasks = []
        for group in groups:
            shards = [self._shards[i] for i in group]
            uris = [s.uri for s in shards]
            metadata = BlockMetadata(
                num_rows=None,
                size_bytes=self._bytes(shards),
                exec_stats=None,
                input_files=tuple(uris),
            )
            read = partial(_read_shards, uris, self._columns, self._part, self._include_path, self._transform, self._rows_per_block)
            tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return tasks


def read_shards(
    shards: Sequence[storage.FileEntry],
    columns: Sequence[str],
    part: tuple[int, int] | None = None,
    include_path: bool = False,
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    rows_per_block: int = ROWS_PER_BLOCK,
    tasks: int | None = None,
):
    """A Ray Dataset of the shards' rows, or of ``transform`` of them (see ``ShardDatasource``).

    ``tasks``: read tasks, each reading a run of whole shards (default with a
    ``transform``: one per shard).
    """
    import ray

    source = ShardDatasource(shards, columns, part=part, include_path=include_path, transform=transform, rows_per_block=rows_per_block)
    if transform is None:
        return ray.data.read_datasource(source)
    # Blocks as the transform made them: Ray's default splits each task's
    # output into blocks of a few rows to reach its target parallelism, which
    # only adds work for the consumer.
    ds = ray.data.read_datasource(source, override_num_blocks=min(len(shards), tasks or len(shards)))
    # A task may run GEN_BUFFER_BLOCKS blocks ahead of the executor. Ray Data's
    # default of 2 paused the decoding whenever the executor, which collects
    # outputs on a tick of 0.1 to 0.2 s, had not yet taken the last two. (No
    # public option sets it; the per-dataset context carries it to the tasks.)
    ds.context._max_num_blocks_in_streaming_gen_buffer = GEN_BUFFER_BLOCKS
    return ds
