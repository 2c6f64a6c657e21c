"""Local paths and URIs (``s3://``, ``gs://``, ...) to one pyarrow filesystem, for reading and writing alike."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import IO
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs

from operators.errors import ConfigError, OutputNotWritable, WriteFailed


def is_uri(location: str) -> bool:
    return "://" in location


def recorded_source(source: str) -> str:
    """The source as rows and exports record it: a local name that is not UTF-8 (a Linux file name may hold
    any bytes; Python lists them as lone surrogates) with those bytes written ``\\xNN``, as Arrow strings,
    XML and the console need UTF-8."""
    return source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


#: What ``flock`` says on a filesystem that has no locks (NFS without its lock daemon, Lustre mounted ``noflock``).
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


def lock_alone(handle: IO | int, what: str) -> None:
    """Take ``handle``'s file for this process alone (``flock``, let go when it is closed or the process ends);
    :class:`BlockingIOError` where another holds it. On a filesystem without locks ``what`` is warned of and goes
    unlocked: such a share had failed the run with a traceback before any work."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in NO_LOCKS:  # BlockingIOError (EAGAIN) among them
            raise
        logging.getLogger(__name__).warning("%s cannot be locked (%s): its filesystem has no locks, so nothing stops "
                                            "a second run there; start one at a time", what, exc.strerror)


@contextmanager
def holding_lock_file(path: str | os.PathLike, what: str) -> Iterator[IO[str]]:
    """The lock file ``path`` (made where missing, with its folder), open for reading and appending and held for this
    process alone (:func:`lock_alone`) while the block runs; :class:`BlockingIOError` where another holds it. A file
    that a run ending took out of its folder as this one opened it is opened again: a lock on it would lock nothing
    another run sees."""
    for _ in range(3):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115 - held for the block
        except FileNotFoundError:  # the folder taken out meanwhile by a run that made it and wrote nothing
            continue
        with handle:
            lock_alone(handle, what)
            if _is_the_file_named(handle, path):
                yield handle
                return
    raise BlockingIOError(errno.EAGAIN, f"other runs kept taking out {path} as this one took it")


def _is_the_file_named(handle: IO, path: str | os.PathLike) -> bool:
    try:
        held, named = os.fstat(handle.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


#: How long a ``gs://`` store is retried before the read or write fails (a URI's ``?retry_limit_seconds=`` wins).
GCS_RETRY_LIMIT_S = 60


def resolve_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``location`` and the path in it: a URI's own filesystem, else the local
    one with the path made absolute. A name that is not UTF-8 (Linux allows any bytes) pyarrow cannot take."""
    if (recorded := recorded_source(location)) != location:
        raise ConfigError(f"{recorded} is not a UTF-8 name, which this tool cannot write to or read from: rename it")
    if is_uri(location):
        scheme, _, rest = location.partition("://")
        uri = location
        if scheme in ("gs", "gcs") and "retry_limit_seconds=" not in rest.partition("?")[2]:
            # Google's client retries an unreachable store for 15 minutes by default, deaf to a stop meanwhile
            uri += f"{'&' if '?' in rest else '?'}retry_limit_seconds={GCS_RETRY_LIMIT_S}"
        try:
            filesystem, path = pafs.FileSystem.from_uri(uri)
        except pa.ArrowInvalid as exc:
            raise ConfigError(f"{location!r} is not a valid URI ({exc}); in a URI, write a space as %20, "
                              "# as %23, % as %25, and [ and ] (in a glob too) as %5B and %5D") from exc
        except OSError as exc:  # an object store that cannot be reached (no network, no such bucket's region)
            raise ConfigError(f"cannot reach {location}: {exc}") from exc
        if not path.strip("/"):
            raise ConfigError(f"{location!r} names no bucket or folder")
        return filesystem, path
    return pafs.LocalFileSystem(), os.path.abspath(location)


@contextmanager
def asking_the_store(location: str, role: str) -> Iterator[None]:
    """Around a command's first request to the object store a URI names (``role``: "the input", "the output"): what
    fails there (no network, a wrong endpoint, refused credentials) is one line before any work (exit 2), where it had
    been a traceback and exit 1, the code of a bug. A local path's errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        if not is_uri(location):
            raise
        raise ConfigError(f"cannot read {role} {location}: {exc}") from exc


def on_disk(path: str | os.PathLike) -> None:
    """Wait until a local file's data (or a folder's entries) are on the disk, not only in the page cache."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_on_disk(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """``os.replace`` of a local file written under a staging name, once its data are on the disk (see
    :func:`move_into_place`)."""
    on_disk(staged)
    os.replace(staged, final)


def move_into_place(filesystem: pafs.FileSystem, staged: str, final: str) -> None:
    """Give a file written under a staging name its published name, on a local disk only once its data are there:
    ext4 and XFS may write a new file's data after its rename, so a power cut could leave a published name on an
    empty file, a Parquet part that stops the next run or an export taken for done. An object store's file is
    whole once its stream is closed."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        on_disk(staged)
    filesystem.move(staged, final)


def make_local_folder(path: str) -> None:
    """Create a local output folder (``inspect``, ``synth``), or say in one line why it cannot be: a URI or no name
    (an ``s3://`` output had been written under ``./s3:/``, an empty one into the working folder), a file in the
    way, a read-only disk."""
    if is_uri(path) or not path.strip():
        raise ConfigError(f"--output {path!r}: this command writes to a local folder; give its path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritable(f"the output {path} cannot be written: {exc}") from exc


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn a failed write into :class:`WriteFailed`, saying when the space ran out and where."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise WriteFailed(f"no space left on the device while writing {what}; documents published so far "
                              "are kept: free space and run the job again to finish the rest") from exc
        raise WriteFailed(f"cannot write {what}: {exc}") from exc


def scratch_space_full(exc: BaseException, doing: str) -> WriteFailed | None:
    """The job's error for the temporary folder out of space (a repaired PDF, a searchable PDF's text layer, a
    document from a URI are made there), which stops the job: it says nothing of the document at hand, and
    recorded against it, it would never be read again. None for any other error."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return WriteFailed(f"no space left in the temporary folder {tempfile.gettempdir()} while {doing}: free space "
                           "there (or set TMPDIR to a larger folder) and run the job again to finish the rest")
    return None
