"""URIs -> filesystems: the one module that knows the stores segray talks to.

Every path segray takes is a local path or a URI of one of ``BACKENDS``:

- ``s3://bucket/prefix``: endpoint and credentials from the standard AWS
  variables and profiles (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_PROFILE``, instance profiles ...): AWS, MinIO or a local endpoint.
- ``gs://bucket/prefix``: Google Cloud Storage through gcsfs, with Google's
  default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's login,
  the metadata server); ``STORAGE_EMULATOR_HOST`` points it at an emulator.
- ``az://container/prefix``: Azure Blob Storage through adlfs, with
  ``AZURE_STORAGE_CONNECTION_STRING`` or ``AZURE_STORAGE_ACCOUNT_NAME`` and
  its key, SAS token or service principal (else Azure's default credential).

Callers pass URIs and never branch on a scheme: a new store is one entry in
``BACKENDS``. Nothing here ever formats a credential into a message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

SEPARATOR = "://"


def has_scheme(text: str) -> bool:
    """True when ``text`` looks like a URI (``scheme://...``), whether or not segray has a backend for it."""
    return SEPARATOR in text


def is_local(uri: str) -> bool:
    """True for a local path, False for a URI of an object store."""
    return not has_scheme(uri)


def is_absolute(name: str) -> bool:
    """True for a URI or an absolute local path: a name that means the same from any folder."""
    return has_scheme(name) or name.startswith("/")


def _split(uri: str) -> tuple[str, str]:
    """(scheme with its '://', the rest); ('', uri) for a local path."""
    if not has_scheme(uri):
        return "", uri
    scheme, rest = uri.split(SEPARATOR, 1)
    return scheme + SEPARATOR, rest


def absolute(uri: str) -> str:
    """A local path made absolute (so Ray workers, whatever their folder, find it); a URI as it is."""
    return uri if has_scheme(uri) else os.path.abspath(os.path.expanduser(uri))


def canonical(uri: str) -> str:
    """The form of a URI that identifies it: absolute local paths, no trailing '/'."""
    return uri.rstrip("/") if has_scheme(uri) else os.path.abspath(os.path.expanduser(uri))


def parent(uri: str) -> str:
    """The folder (or prefix) holding ``uri``."""
    scheme, rest = _split(uri)
    if scheme:
        return scheme + posixpath.dirname(rest.rstrip("/"))
    return os.path.dirname(uri.rstrip(os.sep))


def normalize(uri: str) -> str:
    """``uri`` with '.', '..' and doubled separators resolved (its scheme kept)."""
    scheme, rest = _split(uri)
    return scheme + posixpath.normpath(rest) if scheme else os.path.normpath(uri)


# KEY@ or KEY:SECRET@ before the bucket: credentials someone put in a URI. A
# secret may hold '/', so any '@' after a ':' counts (bucket names hold neither).
_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)(?:[^/\s@]*|[^\s@]*:[^\s@]*)@", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with any credentials written into a ``s3://KEY:SECRET@bucket`` URI (any scheme) replaced by ``***``."""
    return _USERINFO.sub(r"\1***@", text)


def check_uri(uri: str) -> None:
    """Refuses credentials in a URI (they would end up in logs, configs and outputs).

    Raises:
        ValueError: the URI holds ``KEY:SECRET@`` before the bucket; the message redacts them.
    """
    if _USERINFO.match(uri):
        backend = BACKENDS.get(_split(uri)[0])
        where = backend.credentials if backend else "the store's standard environment variables"
        raise ValueError(f"{redact(uri)}: credentials do not belong in a URI; give them through {where}")


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


def _s3() -> pafs.FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=_endpoint(),
        region=_region(),
        # Custom endpoints (MinIO, moto, Ceph) serve buckets by path.
        force_virtual_addressing=False,
        # 500s, 503 SlowDown, resets and timeouts are retried with the SDK's
        # exponential backoff; what still fails is retried by ``retrying``.
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS),
    )


def _gcs() -> pafs.FileSystem:
    # The plain client: gcsfs' default class first asks each bucket over gRPC
    # whether it is zonal, which an emulator (and most buckets) never answers.
    try:
        from gcsfs.core import GCSFileSystem
    except ImportError:
        raise ImportError("gs:// URIs need gcsfs: pip install 'segray[gcs]'") from None

    # gcsfs reads STORAGE_EMULATOR_HOST itself; an emulator takes no credentials.
    token = "anon" if os.environ.get("STORAGE_EMULATOR_HOST") else None
    # No listings cache: other processes (Ray workers, another run) write the same bucket.
    return pafs.PyFileSystem(pafs.FSSpecHandler(GCSFileSystem(token=token, use_listings_cache=False)))


def _azure() -> pafs.FileSystem:
    try:
        from adlfs import AzureBlobFileSystem
    except ImportError:
        raise ImportError("az:// URIs need adlfs: pip install 'segray[azure]'") from None

    # adlfs reads AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_NAME with
    # AZURE_STORAGE_ACCOUNT_KEY / _SAS_TOKEN / _CLIENT_ID, _CLIENT_SECRET, _TENANT_ID.
    return pafs.PyFileSystem(pafs.FSSpecHandler(AzureBlobFileSystem(use_listings_cache=False)))


@dataclass(frozen=True)
class Backend:
    """One object store: what its URIs look like, how to reach it, how to claim a key.

    Attributes:
        scheme: the URI's scheme with its separator (``s3://``).
        form: a URI of this store, for messages (``s3://bucket/prefix``).
        credentials: where credentials go instead of a URI, for messages.
        connect: a filesystem set up from the environment.
        create_exclusive: ``(uri, path, data) -> bool``, the store's conditional
            create (see ``create_exclusive``).
    """

    scheme: str
    form: str
    credentials: str
    connect: Callable[[], pafs.FileSystem]
    create_exclusive: Callable[[str, str, bytes], bool]


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Returns the pyarrow filesystem for ``uri`` and the path inside it.

    The pair is what Ray Data's readers and writers take
    (``read_parquet(path, filesystem=fs)``).
    """
    scheme, rest = _split(uri)
    if not scheme:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    backend = BACKENDS.get(scheme)
    if backend is None:
        forms = ", ".join(b.form for b in BACKENDS.values())
        raise ValueError(f"{redact(uri)!r}: unsupported scheme {scheme[:-len(SEPARATOR)]!r}; expected a local path, {forms}")
    check_uri(uri)
    path = rest.strip("/")
    if not path:
        raise ValueError(f"{uri!r} names no bucket: expected {backend.form}")
    return backend.connect(), path


def fsspec_filesystem(uri: str):
    """The fsspec filesystem for ``uri`` and the path inside it, for libraries that take one (zarr's ``FsspecStore``).

    s3:// gets an asynchronous s3fs client set up from the same environment
    as ``filesystem`` (endpoint, region); gs:// and az:// the fsspec
    filesystem ``filesystem`` wraps; a local path fsspec's local filesystem.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.S3FileSystem):
        import s3fs

        client = {"region_name": _region(), **({"endpoint_url": _endpoint()} if _endpoint() else {})}
        return s3fs.S3FileSystem(asynchronous=True, client_kwargs=client, use_listings_cache=False), path
    if isinstance(fs, pafs.PyFileSystem):
        return fs.handler.fs, path
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), path


def join(uri: str, *parts: str) -> str:
    """Joins path parts onto a URI with '/' (also for local paths)."""
    scheme, rest = _split(uri)
    if scheme:
        return scheme + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


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
    if not isinstance(fs, pafs.LocalFileSystem) and info.type == pafs.FileType.NotFound:
        # Object stores have no directories: a prefix "exists" when something lies under it.
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
    scheme = _split(uri)[0]
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    for attempt in range(3):
        try:
            infos = retrying(f"listing {uri}", lambda: fs.get_file_info(selector))
            break
        except (FileNotFoundError, NotADirectoryError):
            # A file or folder vanished while it was being listed (another
            # writer's temporary file renamed into place), or appeared between
            # fsspec's "is it a folder" and "does it exist": list again.
            if attempt == 2:
                raise
    for info in infos:
        if info.type == pafs.FileType.File:
            yield FileEntry(scheme + info.path, info.size or 0)


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
    an object store's upload is atomic by itself (the key appears when it completes).
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


def upload_file(local: str, uri: str) -> None:
    """Streams the local file ``local`` to ``uri`` on its store (one upload: whole or not at all), without reading it into memory."""
    fs, path = filesystem(uri)
    retrying(f"upload {redact(uri)}", lambda: pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(),
                                                              destination_filesystem=fs))


def create_exclusive(uri: str, data: bytes) -> bool:
    """Writes ``data`` to ``uri`` only if nothing is there; True if this call created it.

    Of two processes racing for the same URI exactly one wins: locally a
    hard link of a complete temporary file (``link`` fails on an existing
    name), on an object store its conditional create (``Backend.create_exclusive``):
    S3's PUT with ``If-None-Match: *`` (412 when the key exists), GCS's upload
    with ``ifGenerationMatch=0``, Azure's commit with ``If-None-Match: *``.
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
    return BACKENDS[_split(uri)[0]].create_exclusive(uri, path, data)


def _s3_create_exclusive(uri: str, path: str, data: bytes) -> bool:
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


def _fsspec_create_exclusive(uri: str, path: str, data: bytes) -> bool:
    """The conditional create of an fsspec store: gcsfs uploads with ``ifGenerationMatch=0``,
    adlfs with ``If-None-Match: *``; both raise FileExistsError on the store's 412."""
    fs = filesystem(uri)[0].handler.fs
    tries = {"n": 0}

    def put() -> bool:
        tries["n"] += 1
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            # As on S3: a retried upload can find what its own lost first try created.
            return tries["n"] > 1 and read_bytes(uri) == data
        return True

    return retrying(f"claiming {uri}", put)


BACKENDS: dict[str, Backend] = {
    b.scheme: b
    for b in (
        Backend(
            "s3://", "s3://bucket/prefix", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the node's instance profile",
            _s3, _s3_create_exclusive,
        ),
        Backend(
            "gs://", "gs://bucket/prefix", "GOOGLE_APPLICATION_CREDENTIALS, gcloud's login, or the node's service account",
            _gcs, _fsspec_create_exclusive,
        ),
        Backend(
            "az://", "az://container/prefix",
            "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, "
            "or a service principal or managed identity",
            _azure, _fsspec_create_exclusive,
        ),
    )
}


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json_or_none(uri: str) -> Any:
    """The JSON value in ``uri``, or None when there is no such file.

    Raises:
        ValueError: the file is not valid JSON, naming it.
    """
    if not exists(uri):
        return None
    try:
        return json.loads(read_text(uri))
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON ({e})") from None


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def write_parquet(table, uri: str, **kwargs) -> None:
    """Writes a pyarrow Table to ``uri`` as Parquet; no reader ever sees a partial file.

    Streamed, never held whole in memory: locally to a temporary name renamed
    into place, on an object store as one upload (a multipart upload, or a
    list of blocks, appears only when it completes).
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
