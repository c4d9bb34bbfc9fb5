"""URIs -> filesystems.

Every path segray takes is either a local path or ``s3://bucket/prefix``.
Endpoint and credentials come from the standard AWS variables and profiles
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance
profiles ...), so the same command works against AWS, MinIO or a local
endpoint. Nothing here ever formats a credential into a message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

S3_SCHEME = "s3://"


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


# KEY@ or KEY:SECRET@ before the bucket: credentials someone put in a URI. A
# secret may hold '/', so any '@' after a ':' counts (bucket names hold neither).
_USERINFO = re.compile(r"(s3://)(?:[^/\s@]*|[^\s@]*:[^\s@]*)@", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with any credentials written into an ``s3://KEY:SECRET@bucket`` URI replaced by ``***``."""
    return _USERINFO.sub(r"\1***@", text)


def check_uri(uri: str) -> None:
    """Refuses credentials in a URI (they would end up in logs, configs and outputs).

    Raises:
        ValueError: the URI holds ``KEY:SECRET@`` before the bucket; the message redacts them.
    """
    if _USERINFO.match(uri):
        raise ValueError(
            f"{redact(uri)}: credentials do not belong in a URI; give them through AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the node's instance profile"
        )


ATTEMPTS = 6  # tries of one storage call on transient errors (the S3 SDKs' own, then ours)
BACKOFF_S = 0.2  # first wait; doubled on each retry, with jitter
TIMEOUT_S = 5  # seconds without a byte from the store before boto3 retries (pyarrow's SDK: 3; boto3's own: 60)
_TRANSIENT = re.compile(
    r"slow[ _]?down|internal[ _]?(error|failure)|service[ _]?unavailable|http status 5\d\d|\b50[0-4]\b|request[ _]?time[ _]?out"
    r"|timed? ?out|timeout|connection (was )?(reset|refused|aborted|closed)|network[ _]connection|response stream"
    r"|broken pipe|curl|temporar|throttl|reduce your request rate|incomplete ?read|unexpected eof|remote end closed",
    re.IGNORECASE,
)
log = logging.getLogger("segray.storage")


def transient(error: BaseException) -> str | None:
    """The class of a transient storage error (worth retrying), or None for one that will not heal.

    A missing key, a refused permission or a bad request fail the same way
    every time and are never retried; a 500, a 503 SlowDown, a reset
    connection or a timeout usually pass on the next try.
    """
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return None
    text = f"{type(error).__name__}: {error}"
    match = _TRANSIENT.search(text)
    # An I/O error, or botocore's ClientError / ConnectionError (not OSErrors): never a ValueError or the like.
    storage_error = isinstance(error, (OSError, ConnectionError, TimeoutError, EOFError)) or "ClientError" in text or "Connection" in type(error).__name__
    if match is None or not storage_error:
        return None
    word = match.group(0).lower()
    if "slow" in word or "503" in word or "unavailable" in word or "throttl" in word or "reduce" in word:
        return "503"
    if "500" in word or "internal" in word or "status 5" in word:
        return "500"
    if "time" in word:
        return "timeout"
    return "connection"


def retrying(what: str, call, attempts: int = ATTEMPTS):
    """``call()``, retried on transient errors (``transient``) with exponential backoff and jitter.

    Deterministic errors are raised at once; a transient one still there
    after ``attempts`` tries is raised with the count in its message.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - sorted by ``transient`` below
            kind = transient(e)
            if kind is None:
                raise
            if attempt == attempts:
                raise OSError(f"{what}: failed {attempts} times on transient storage errors ({kind}); last: {redact(str(e))}") from e
            log.info("%s: transient storage error (%s), try %d of %d: %s", what, kind, attempt, attempts, redact(str(e))[:200])
            time.sleep(BACKOFF_S * 2 ** (attempt - 1) * (0.5 + random.random()))


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Returns the pyarrow filesystem for ``uri`` and the path inside it.

    The pair is what Ray Data's readers and writers take
    (``read_parquet(path, filesystem=fs)``).
    """
    if is_s3(uri):
        check_uri(uri)
        path = uri[len(S3_SCHEME):].strip("/")
        if not path:
            raise ValueError(f"{uri!r} names no bucket: expected s3://bucket/prefix")
        endpoint = _endpoint()
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint,
            region=_region(),
            # Custom endpoints (MinIO, moto, Ceph) serve buckets by path.
            force_virtual_addressing=False,
            # 500s, 503 SlowDown, resets and timeouts are retried with the SDK's
            # exponential backoff; what still fails is retried by ``retrying``.
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS),
        )
        return fs, path
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"{uri!r}: unsupported scheme {scheme!r}; expected a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Joins path parts onto a URI with '/' (also for local paths)."""
    if is_s3(uri):
        return S3_SCHEME + posixpath.join(uri[len(S3_SCHEME):].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def display(fs: pafs.FileSystem, path: str) -> str:
    """The URI a user would type for ``path`` on ``fs`` (for messages)."""
    return S3_SCHEME + path if isinstance(fs, pafs.S3FileSystem) else path


def _info(fs: pafs.FileSystem, path: str, uri: str):
    return fs.get_file_info(path) if isinstance(fs, pafs.LocalFileSystem) else retrying(f"looking up {uri}", lambda: fs.get_file_info(path))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _info(fs, path, uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.Directory:
        return True
    if isinstance(fs, pafs.S3FileSystem) and info.type == pafs.FileType.NotFound:
        # S3 has no directories: a prefix "exists" when something lies under it.
        return bool(list_files(uri, limit=1))
    return False


@dataclass(frozen=True, slots=True)
class FileEntry:
    uri: str
    size: int


def iter_files(uri: str, recursive: bool = True, skipped: list[tuple[str, str]] | None = None) -> Iterator[FileEntry]:
    """Files under ``uri`` (a directory or prefix), in no set order; nothing if absent.

    Locally, symbolic links are not followed out of ``uri``: a linked folder
    is not entered (links can loop, or lead anywhere on the machine) and a
    linked file counts only when its target lies under ``uri``. What is left
    out that way is added to ``skipped`` as ``(uri, reason)`` when given.
    A generator, so that a caller indexing millions of files never holds
    the whole listing as objects.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield from _walk_local(path, recursive, skipped)
        return
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    for attempt in range(3):
        try:
            infos = retrying(f"listing {uri}", lambda: fs.get_file_info(selector))
            break
        except FileNotFoundError:
            # A file or folder vanished while it was being listed (another
            # writer's temporary file renamed into place): list again.
            if attempt == 2:
                raise
    for info in infos:
        if info.type == pafs.FileType.File:
            yield FileEntry(display(fs, info.path), info.size or 0)


def list_files(uri: str, recursive: bool = True, limit: int | None = None, skipped: list[tuple[str, str]] | None = None) -> list[FileEntry]:
    """Files under ``uri`` sorted by URI (the first ``limit`` found, when given); see ``iter_files``."""
    out = []
    for entry in iter_files(uri, recursive, skipped):
        out.append(entry)
        if limit is not None and len(out) >= limit:
            break
    out.sort(key=lambda e: e.uri)
    return out


def _walk_local(root: str, recursive: bool, skipped: list[tuple[str, str]] | None) -> Iterator[FileEntry]:
    real_root = os.path.realpath(root)

    def skip(path: str, reason: str) -> None:
        if skipped is not None:
            skipped.append((path, f"{path}: {reason}"))

    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs:
            link = os.path.join(folder, name)
            if os.path.islink(link):
                skip(link, f"a symbolic link to a folder ({os.readlink(link)}) is not followed: links can loop or leave {root}")
        if not recursive:
            dirs[:] = []
        for name in files:
            path = os.path.join(folder, name)
            try:
                if os.path.islink(path):
                    target = os.path.realpath(path)
                    if os.path.commonpath([target, real_root]) != real_root:
                        skip(path, f"a symbolic link to {target}, outside {root}, is not followed")
                        continue
                size = os.stat(path).st_size
            except (FileNotFoundError, ValueError):
                continue  # gone while listed (a temporary file renamed into place), or a dangling link
            yield FileEntry(path, size)


def list_dirs(uri: str) -> list[str]:
    """Immediate sub-directories of ``uri`` (names only), sorted."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    return sorted(posixpath.basename(i.path) for i in fs.get_file_info(selector) if i.type == pafs.FileType.Directory)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return read() if isinstance(fs, pafs.LocalFileSystem) else retrying(f"reading {uri}", read)


# Local writes go to PATH.tmp-<uuid hex> first and are renamed into place; a
# process killed in between leaves that file (segray.ownership counts it as PATH's).
TEMPORARY = re.compile(r"(?P<name>.+)\.tmp-[0-9a-f]{32}")


def temporary_path(path: str) -> str:
    """A fresh temporary name beside ``path``, of the form ``TEMPORARY`` matches."""
    return f"{path}.tmp-{uuid.uuid4().hex}"


@contextlib.contextmanager
def _local_write(uri: str, tmp: str) -> Iterator[None]:
    """Around a write to ``tmp``: a failed one leaves no temporary file, and its error names ``uri``.

    A full disk's error names no file (``[Errno 28] No space left on device``).
    """
    try:
        yield
    except OSError as e:
        if e.errno and not e.filename:
            raise OSError(e.errno, os.strerror(e.errno), uri) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    """Writes ``data`` so that no reader ever sees a partial file at ``uri``.

    Locally the bytes go to a temporary name first and are renamed into place;
    an S3 PUT is atomic by itself.
    """
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = temporary_path(path)
        with _local_write(uri, tmp):
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)
    else:

        def put() -> None:
            with fs.open_output_stream(path) as f:
                f.write(data)

        retrying(f"writing {uri}", put)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Writes ``data`` to ``uri`` only if nothing is there; True if this call created it.

    Of two processes racing for the same URI exactly one wins: locally a
    hard link of a complete temporary file (``link`` fails on an existing
    name), on S3 a conditional PUT (``If-None-Match: *``), which S3 and
    compatible stores answer with 412 when the key exists.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = temporary_path(path)
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # No hard links here (a bucket mounted with FUSE, SMB, exFAT): an
            # exclusive create is as exclusive, only not atomic in its content.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            os.unlink(tmp)
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    # Path-style, as pyarrow is set up above: custom endpoints serve buckets by path.
    client = boto3.client(
        "s3",
        endpoint_url=_endpoint(),
        region_name=_region(),
        config=Config(
            s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": ATTEMPTS},
            connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S,
        ),
    )
    tries = {"n": 0}
    # Marks this call's PUT: two claims may hold the same bytes (the same marker).
    nonce = uuid.uuid4().hex

    def put() -> bool:
        tries["n"] += 1
        try:
            response = client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*", Metadata={"segray-claim": nonce})
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise
            retried = tries["n"] > 1 or e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
            # A retried PUT can find the object its own lost first try created:
            # then the object carries this call's nonce.
            return retried and client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("segray-claim") == nonce
        return response is not None

    return retrying(f"claiming {uri}", put)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def write_parquet(table, uri: str, **kwargs) -> None:
    """Writes a pyarrow Table to ``uri`` as Parquet; no reader ever sees a partial file.

    Streamed, never held whole in memory: locally to a temporary name renamed
    into place, on S3 as one upload (a multipart upload appears only when it
    completes).
    """
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = temporary_path(path)
        with _local_write(uri, tmp):
            pq.write_table(table, tmp, **kwargs)
            os.replace(tmp, path)
    else:
        retrying(f"writing {uri}", lambda: pq.write_table(table, path, filesystem=fs, **kwargs))


def read_parquet(uri: str, **kwargs):
    """Reads one Parquet file or a folder of them into a pyarrow Table."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, **kwargs)
