"""Local paths and URIs (``s3://``, ``gs://``, ...) to one pyarrow filesystem, for reading and writing alike."""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location


def resolve_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``location`` and the path in it: a URI's own filesystem, else the local
    one with the path made absolute."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)
