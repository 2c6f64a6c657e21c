"""Ingest: expand inputs to files, then triage each file cheaply before any heavy work.

Triage (OCRmyPDF style) reads the bytes once for the ``doc_id`` (sha256), sniffs the real format
from magic bytes, and asks ``pdfinfo`` / Pillow for the page count, encryption and page sizes, so a
bad file fails here with a precise error instead of deep inside rendering.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import pikepdf
import pyarrow.fs as pafs
from PIL import Image

from operators.settings import RasterizeConfig
from operators.storage import is_uri, resolve_filesystem
from operators.errors import (
    CorruptFile,
    DocumentError,
    EmptyFile,
    EncryptedFile,
    NoInputError,
    PageTooLarge,
    RenderTimeout,
    UnreadableFile,
    UnsupportedFormat,
)

SUPPORTED_SUFFIXES = (".pdf", ".tif", ".tiff", ".png", ".jpg", ".jpeg")
DocumentKind = Literal["pdf", "tiff", "png", "jpeg"]
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class DocumentPlan:
    """The outcome of triage: either pages to render or the reason there are none."""

    doc_id: str
    source: str
    kind: DocumentKind | None
    num_pages: int
    error: DocumentError | None = None
    repaired: bool = False  # poppler could not read it; render the copy pikepdf (qpdf) repairs


def _with_scheme(location: str, path: str) -> str:
    return f"{location.split('://', 1)[0]}://{path}" if is_uri(location) else path


def _supported(path: str) -> bool:
    return path.lower().endswith(SUPPORTED_SUFFIXES)


def _expand_one(item: str) -> list[str]:
    if not is_uri(item) and _GLOB_CHARS.search(item):
        matches = sorted(glob.glob(item, recursive=True))
        return [os.path.abspath(m) for m in matches if os.path.isfile(m) and _supported(m)]
    filesystem, path = resolve_filesystem(item)
    if _GLOB_CHARS.search(path):
        root = path[: _GLOB_CHARS.search(path).start()].rsplit("/", 1)[0] or "/"
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        return sorted(_with_scheme(item, i.path) for i in infos
                      if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path) and _supported(i.path))
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory and not is_uri(item):
        # os.walk, unlike pyarrow, lists broken links: they become `unreadable` rows, not silence
        return sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                      for name in names if _supported(name))
    if info.type == pafs.FileType.Directory:
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(_with_scheme(item, i.path) for i in infos
                      if i.type == pafs.FileType.File and _supported(i.path))
    if info.type == pafs.FileType.NotFound:
        return []
    # A file named explicitly is taken whatever its suffix: triage decides what it is.
    return [_with_scheme(item, path)]


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (recursive) and globs, local or pyarrow-filesystem URIs, in a stable order.

    An input that matches nothing is an error naming it, so a typo never yields an empty job.
    """
    sources: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        matched = _expand_one(item)
        if not matched:
            raise NoInputError(f"input {item!r} matches no PDF, TIFF, PNG or JPEG file")
        for source in matched:
            if source not in seen:
                seen.add(source)
                sources.append(source)
    return sources


_CHUNK = 1 << 20


def _chunks(source: str) -> Iterator[bytes]:
    """The file's bytes a megabyte at a time, so a huge scan never sits in memory whole."""
    filesystem, path = resolve_filesystem(source)
    try:
        with filesystem.open_input_stream(path) as stream:
            while chunk := stream.read(_CHUNK):
                yield chunk
    except OSError as exc:
        raise UnreadableFile(f"cannot read {source}: {exc}") from exc


def fingerprint(source: str) -> tuple[str, bytes, int]:
    """sha256 of the file's bytes (the doc_id), its first 1 KiB for sniffing, and its size."""
    digest, head, size = hashlib.sha256(), b"", 0
    for chunk in _chunks(source):
        digest.update(chunk)
        if len(head) < 1024:
            head += chunk[: 1024 - len(head)]
        size += len(chunk)
    return digest.hexdigest(), head, size


def sniff_kind(head: bytes) -> DocumentKind:
    """The real format from magic bytes; the file name is not trusted."""
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if b"%PDF-" in head[:1024]:
        return "pdf"
    raise UnsupportedFormat("not a PDF, TIFF, PNG or JPEG file (checked the magic bytes)")


_PAGES = re.compile(r"^Pages:\s+(\d+)", re.MULTILINE)
_PAGE_SIZE = re.compile(r"^Page\s+\d+ size:\s+([\d.]+) x ([\d.]+) pts", re.MULTILINE)


def pdf_info(path: str, config: RasterizeConfig) -> dict[str, str | int | list]:
    """Page count, encryption and page sizes from ``pdfinfo``, killed after the configured timeout."""
    command = ["pdfinfo", "-f", "1", "-l", "-1", path]
    try:
        result = subprocess.run(command, capture_output=True, timeout=config.pdfinfo_timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RenderTimeout(f"pdfinfo took longer than {config.pdfinfo_timeout_s:g} s") from exc
    stdout = result.stdout.decode("utf-8", "replace")
    stderr = result.stderr.decode("utf-8", "replace").strip()
    if result.returncode != 0:
        if "password" in stderr.lower():
            raise EncryptedFile("the PDF is encrypted with a user password")
        raise CorruptFile(f"pdfinfo could not read the PDF: {stderr.splitlines()[-1] if stderr else 'no detail'}")
    pages = _PAGES.search(stdout)
    if pages is None:
        raise CorruptFile("pdfinfo reported no page count")
    sizes = [(float(w), float(h)) for w, h in _PAGE_SIZE.findall(stdout)]
    return {"pages": int(pages.group(1)), "sizes": sizes}


def _check_pixels(width: float, height: float, page: int, config: RasterizeConfig, dpi: int) -> None:
    pixels = width * height
    if pixels > config.max_page_pixels:
        raise PageTooLarge(
            f"page {page} would be {width:.0f}x{height:.0f} px at {dpi} dpi, over the limit of "
            f"{config.max_page_pixels} pixels (rasterize.max_page_pixels)"
        )


def page_tree_count(path: str) -> int | None:
    """Pages in the PDF's page tree as qpdf walks it (the declared /Count can lie); None if qpdf
    cannot open the file either."""
    try:
        with pikepdf.open(path) as pdf:
            return len(pdf.pages)
    except pikepdf.PasswordError as exc:
        raise EncryptedFile("the PDF is encrypted with a user password") from exc
    except pikepdf.PdfError:
        return None


@contextmanager
def repaired_pdf(path: str) -> Iterator[str]:
    """A copy of a damaged PDF rewritten by qpdf, which rebuilds broken cross-reference data."""
    with tempfile.NamedTemporaryFile(prefix="trocr-pipeline-repaired-", suffix=".pdf") as handle:
        try:
            with pikepdf.open(path) as pdf:
                pdf.save(handle.name)
        except pikepdf.PdfError as exc:
            raise CorruptFile(f"the PDF is damaged and qpdf could not repair it: {exc}") from exc
        yield handle.name


def triage_pdf(path: str, config: RasterizeConfig) -> tuple[int, bool]:
    """Page count and whether rendering needs the repaired copy; page sizes checked on the way."""
    pages_in_tree = page_tree_count(path)
    try:
        info, repaired = pdf_info(path, config), False
    except CorruptFile:
        if pages_in_tree is None:
            raise
        with repaired_pdf(path) as fixed:
            info, repaired = pdf_info(fixed, config), True
    pages = pages_in_tree if pages_in_tree is not None else int(info["pages"])
    if pages < 1:
        raise CorruptFile("the PDF has no pages")
    for number, (w_pt, h_pt) in enumerate(info["sizes"], start=1):
        _check_pixels(w_pt / 72 * config.dpi, h_pt / 72 * config.dpi, number, config, config.dpi)
    return pages, repaired


def triage_image(path: str, config: RasterizeConfig) -> int:
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            for index in range(frames):
                image.seek(index)
                _check_pixels(image.width, image.height, index + 1, config, config.dpi)
            return frames
    except Image.DecompressionBombError as exc:
        raise PageTooLarge(f"decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptFile(f"the image cannot be decoded: {exc}") from exc


@contextmanager
def local_path(source: str) -> Iterator[str]:
    """A local path for poppler/Pillow: the file itself when local, else a temporary copy."""
    if not is_uri(source):
        yield source
        return
    with tempfile.NamedTemporaryFile(prefix="trocr-pipeline-", suffix=Path(source).suffix) as handle:
        for chunk in _chunks(source):
            handle.write(chunk)
        handle.flush()
        yield handle.name


def triage(source: str, config: RasterizeConfig) -> DocumentPlan:
    """Never raises for a bad document: the error is recorded in the plan."""
    doc_id = hashlib.sha256(source.encode()).hexdigest()  # replaced by the content hash once read
    kind: DocumentKind | None = None
    try:
        doc_id, head, size = fingerprint(source)
        if size == 0:
            raise EmptyFile("the file is empty (0 bytes)")
        kind = sniff_kind(head)
        with local_path(source) as path:
            if kind == "pdf":
                num_pages, repaired = triage_pdf(path, config)
            else:
                num_pages, repaired = triage_image(path, config), False
        return DocumentPlan(doc_id=doc_id, source=source, kind=kind, num_pages=num_pages, repaired=repaired)
    except DocumentError as error:
        return DocumentPlan(doc_id=doc_id, source=source, kind=kind, num_pages=0, error=error)
