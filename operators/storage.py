"""Local paths and URIs (``s3://``, ``gs://``, ...) to one pyarrow filesystem, for reading and writing alike."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs

from operators.errors import ConfigError, OutputNotWritable


def is_uri(location: str) -> bool:
    return "://" in location


def resolve_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``location`` and the path in it: a URI's own filesystem, else the local
    one with the path made absolute."""
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except pa.ArrowInvalid as exc:
            raise ConfigError(f"{location!r} is not a valid URI ({exc}); in a URI, write a space as %20, "
                              "# as %23 and % as %25") from exc
    return pafs.LocalFileSystem(), os.path.abspath(location)


def make_local_folder(path: str | os.PathLike) -> None:
    """Create a local output folder, or say in one line why it cannot be (a file in the way, a read-only disk)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritable(f"the output {path} cannot be written: {exc}") from exc
