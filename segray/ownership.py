"""What segray may delete: only files it wrote, listed in its marker.

A folder segray made whole (an ingested dataset, a demo folder) carries
``_segray.json``: the kind of folder and every file segray wrote there.
Replacing such a folder deletes exactly those files. A folder without the
marker, or one holding a file the marker does not list, is refused with the
file named: segray never deletes what it did not write (as object stores and
batch systems refuse to overwrite what they do not own).

A single file segray writes into a folder it does not own (a report, a query
result) carries a sidecar beside it, ``.NAME.segray.json``, holding the
file's SHA-256. An existing file is replaced only when asked to
(``overwrite``) and only when its sidecar says segray wrote exactly its
present bytes: a file segray never wrote, or one changed since, is refused.
Such a file is never written inside a folder segray owns for one job (a
predict output), which holds only what that job wrote.
"""

from __future__ import annotations

import hashlib
import json
import re

from segray import storage
from segray.config import about

MARKER = "_segray.json"
FORMAT = "segray-owned/1"
FILE_FORMAT = "segray-file/1"


def canonical(uri: str) -> str:
    """The form of a URI that identifies it: absolute local paths, no trailing '/'."""
    return storage.canonical(uri)


def inside(uri: str, folder: str) -> bool:
    """True when ``uri`` is ``folder`` or lies under it (by path components, not string prefix)."""
    a, b = canonical(uri), canonical(folder)
    return a == b or a.startswith(b.rstrip("/") + "/")


def refuse_overlap(source: str, source_field: str, destination: str, destination_field: str) -> None:
    """Refuses a destination inside the source or a source inside the destination, before anything is read.

    Raises:
        ValueError: the two overlap; names both.
    """
    if inside(destination, source) or inside(source, destination):
        raise about(
            destination_field,
            ValueError(
                f"{destination_field} {destination} and `{source_field}` {source} overlap: one lies inside the other, "
                f"so writing (or replacing) one would change or delete the other; choose separate folders"
            ),
        )


def claim_folder(folder: str, kind: str, field: str, patterns: list[str], run: dict[str, str] | None = None) -> None:
    """Claims an empty ``folder`` for one run: an exclusive create of its marker.

    Args:
        patterns: regular expressions (full match, paths relative to the
            folder) of the files this run will write: a run that stops before
            ``write_marker`` lists them still leaves a folder segray can replace.
        run: what the run is (an ingest's source), kept in the claim so that a
            later run finding it unfinished can say whose it was.

    Raises:
        FileExistsError: another run claimed it first (its marker is there).
    """
    claim = {"format": FORMAT, "kind": kind, "files": [], "patterns": patterns, "complete": False}
    marker = json.dumps({**claim, **({"run": run} if run else {})}, indent=1)
    if not storage.create_exclusive(storage.join(folder, MARKER), marker.encode("utf-8")):
        raise about(field, FileExistsError(f"{field} {folder} was claimed by another segray run a moment ago; choose another folder"))


def _relative(uri: str, folder: str) -> str:
    return canonical(uri)[len(canonical(folder).rstrip("/")) + 1:]


def files_under(folder: str) -> list[str]:
    """Paths of every file under ``folder``, relative to it."""
    return [_relative(f.uri, folder) for f in storage.list_files(folder)]


def write_marker(folder: str, kind: str) -> None:
    """Records every file now under ``folder`` as segray's (call it when the folder is complete)."""
    files = sorted(f for f in files_under(folder) if f != MARKER)
    marker = {"format": FORMAT, "kind": kind, "files": files, "complete": True}
    storage.write_text(storage.join(folder, MARKER), json.dumps(marker, indent=1))


def read_marker(folder: str, kind: str) -> dict | None:
    """The marker of ``folder`` when it is segray's marker of this kind, else None."""
    uri = storage.join(folder, MARKER)
    if not storage.exists(uri):
        return None
    try:
        marker = json.loads(storage.read_text(uri))
    except json.JSONDecodeError:
        return None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or marker.get("kind") != kind:
        return None
    if not isinstance(marker.get("files"), list) or not all(isinstance(f, str) for f in marker["files"]):
        return None
    return marker


def owned(marker: dict, present: set[str]) -> set[str]:
    """The present files a marker accounts for: those it lists, and (a run that did not finish) its patterns."""
    patterns = [re.compile(p) for p in marker.get("patterns") or [] if isinstance(p, str)]
    files = set(marker["files"])

    def mine(f: str) -> bool:
        return f in files or any(p.fullmatch(f) for p in patterns)

    # A file of ours, or the temporary file that one of ours was being written to.
    return {f for f in present if mine(f) or ((t := storage.TEMPORARY.fullmatch(f)) is not None and mine(t["name"]))}


def clear_owned(folder: str, kind: str, field: str, required: tuple[str, ...] = ()) -> int:
    """Deletes the files segray wrote in ``folder`` (its marker's list) and the marker; returns how many.

    Args:
        folder: the folder to empty.
        kind: the marker's kind that makes it replaceable (``dataset``, ``demo``).
        field: the config field that named the folder, for messages.
        required: files that must be there too (a dataset's ``dataset.json``).

    Raises:
        FileExistsError: no marker of this kind, a required file missing, or a
            file there that segray did not write; nothing is deleted then.
    """
    present = set(files_under(folder))
    marker = read_marker(folder, kind)
    if marker is None:
        example = sorted(present)[0] if present else MARKER
        raise about(
            field,
            FileExistsError(
                f"{field} {folder} holds files that segray did not write as a {kind} (no {MARKER} marker of a {kind}; "
                f"e.g. {storage.join(folder, example)}); nothing was deleted: choose an empty or new folder, or move those files yourself"
            ),
        )
    missing = [r for r in required if r not in present] if marker.get("complete") else []
    if missing:
        raise about(
            field,
            FileExistsError(
                f"{field} {folder} is a finished {kind} by its {MARKER} but {', '.join(missing)} is missing; "
                "nothing was deleted: move the folder aside or delete it yourself"
            ),
        )
    mine = owned(marker, present)
    foreign = sorted(present - mine - {MARKER})
    if foreign:
        shown = ", ".join(storage.join(folder, f) for f in foreign[:3])
        raise about(
            field,
            FileExistsError(
                f"{field} {folder} holds {len(foreign)} file(s) segray did not write ({shown}); "
                f"nothing was deleted: move them, or choose another folder"
            ),
        )
    # The files that make the folder what it is go last: a delete that stops
    # half-way leaves a folder that is still recognised and can be replaced.
    order = sorted(mine & present, key=lambda f: (f in required, f))
    for name in order:
        storage.delete_file(storage.join(folder, name))
    storage.delete_file(storage.join(folder, MARKER))
    return len(order)


def sidecar(uri: str) -> str:
    """The sidecar of a single file segray writes: ``DIR/.NAME.segray.json``."""
    uri = canonical(uri)
    return storage.join(storage.parent(uri), f".{storage.basename(uri)}.segray.json")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wrote_file(uri: str) -> dict | None:
    """The sidecar of ``uri`` when segray wrote exactly the bytes it holds now, else None."""
    if not storage.exists(sidecar(uri)):
        return None
    try:
        record = json.loads(storage.read_text(sidecar(uri)))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") != FILE_FORMAT or not isinstance(record.get("sha256"), str):
        return None
    return record if _digest(storage.read_bytes(uri)) == record["sha256"] else None


def _ancestors(uri: str) -> list[str]:
    """The folders above ``uri``, nearest first (up to the bucket or the root)."""
    out, path = [], canonical(uri)
    while (up := storage.parent(path)) not in (path, "") and not up.endswith(storage.SEPARATOR):
        out.append(up)
        path = up
    return out


def check_new_file(uri: str, field: str, overwrite: bool, kind: str, folders: dict[str, str]) -> None:
    """Refuses to write the single file ``uri`` where it would replace or intrude on what segray did not write.

    Args:
        uri: the file about to be written.
        field: the config field that named it, for messages.
        overwrite: whether a file segray wrote before may be replaced.
        kind: what the file is (``report``, ``query result``), for messages.
        folders: marker file name -> what a folder holding it is: ``uri``
            may lie in no such folder, at any depth.

    Raises:
        ValueError: ``uri`` lies inside such a folder, or is a folder.
        FileExistsError: ``uri`` exists and segray did not write it (or it
            changed since), or it did and ``overwrite`` is off.
    """
    for folder in _ancestors(uri):
        for marker, what in folders.items():
            if storage.exists(storage.join(folder, marker)):
                raise about(
                    field,
                    ValueError(
                        f"{field} {uri} lies inside {what} {folder} (it holds {marker}), which holds only what its job wrote; "
                        f"nothing was written: choose a path outside {folder}"
                    ),
                )
    if not storage.exists(uri):
        return
    if storage.is_dir(uri):
        raise about(field, ValueError(f"{field} {uri} is a folder; expected the path of a file to write"))
    record = wrote_file(uri)
    if record is None:
        raise about(
            field,
            FileExistsError(
                f"{field} {uri} exists and segray did not write it (no {storage.basename(sidecar(uri))} beside it, "
                "or the file changed since); nothing was written: choose another path, or move that file yourself"
            ),
        )
    if not overwrite:
        raise about(
            field,
            FileExistsError(f"{field} {uri} exists (a {record.get('kind', kind)} segray wrote); nothing was written: set `overwrite` to replace it"),
        )


def write_owned_file(uri: str, data: bytes, kind: str) -> None:
    """Writes ``data`` to ``uri``, then its sidecar (a crash between leaves a file that is refused, never one wrongly replaced)."""
    storage.write_bytes(uri, data)
    record = {"format": FILE_FORMAT, "kind": kind, "file": storage.basename(uri.rstrip("/")), "bytes": len(data), "sha256": _digest(data)}
    storage.write_text(sidecar(uri), json.dumps(record, indent=1))
