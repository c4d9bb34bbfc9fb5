"""What segray may delete: only files it wrote, listed in its marker.

A folder segray made whole (an ingested dataset, a demo folder) carries
``_segray.json``: the kind of folder and every file segray wrote there.
Replacing such a folder deletes exactly those files. A folder without the
marker, or one holding a file the marker does not list, is refused with the
file named: segray never deletes what it did not write (as object stores and
batch systems refuse to overwrite what they do not own).
"""

from __future__ import annotations

import json
import os
import re

from segray import storage
from segray.config import about

MARKER = "_segray.json"
FORMAT = "segray-owned/1"


def canonical(uri: str) -> str:
    """The form of a URI that identifies it: absolute local paths, no trailing '/'."""
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


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
