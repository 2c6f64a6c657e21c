"""Ingest: expand inputs to files, then triage each file cheaply before any heavy work.

Triage (OCRmyPDF style) reads the bytes once for the ``doc_id`` (sha256), sniffs the real format
from magic bytes, and asks ``pdfinfo`` / Pillow for the page count, encryption and page sizes, so a
bad file fails here with a precise error instead of deep inside rendering.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import re
import stat
import subprocess
import tempfile
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence
from urllib.parse import quote

import pikepdf
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from operators.settings import RasterizeConfig
from operators.storage import asking_the_store, is_uri, recorded_source, resolve_filesystem, scratch_space_full
from operators.errors import (
    ConfigError,
    CorruptFile,
    DocumentError,
    EmptyFile,
    EncryptedFile,
    InternalError,
    NoInputError,
    NoPages,
    PageTooLarge,
    RenderTimeout,
    SourceChanged,
    UnreadableFile,
    UnsupportedFormat,
)

SUPPORTED_SUFFIXES = (".pdf", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".j2k", ".jpx", ".jpf",
                      ".bmp", ".webp", ".gif")
DocumentKind = Literal["pdf", "tiff", "png", "jpeg", "jp2", "bmp", "webp", "gif"]
_GLOB_CHARS = re.compile(r"[*?\[]")
#: Pillow's own limit on an image's pixels, which :func:`allow_pixels` raises to the configured one.
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
#: What operating systems leave in folders (macOS resource forks and folder settings, Windows
#: thumbnail caches): never a document, whatever its suffix.
_OS_JUNK = re.compile(r"^(\._.+|\.DS_Store|Thumbs\.db|desktop\.ini)$", re.IGNORECASE)


@dataclass(frozen=True)
class DocumentPlan:
    """The outcome of triage: either pages to render or the reason there are none."""

    doc_id: str
    source: str
    kind: DocumentKind | None
    num_pages: int
    error: DocumentError | None = None
    repaired: bool = False  # poppler could not read it; render the copy pikepdf (qpdf) repairs
    page_rotations: tuple[int, ...] = ()  # a PDF's /Rotate per page, which poppler applies when rendering
    page_units: tuple[float, ...] = ()  # a PDF's /UserUnit per page (72nds of an inch), which poppler ignores
    oversized_pages: tuple[tuple[int, str], ...] = ()  # (page, why) of pages over rasterize.max_page_pixels
    duplicate_of: str | None = None  # doc_id of the document with the same bytes that holds the pages
    stamp: tuple[int, int] | None = None  # the file's size and modification time (ns) when its doc_id was taken


@dataclass(frozen=True)
class KnownDocument:
    """A source's document as the output holds it: what a rerun takes without reading the file again while its
    size and modification time are those it had (as rsync trusts them)."""

    doc_id: str
    num_pages: int
    stamp: tuple[int, int]

    def plan(self, source: str) -> DocumentPlan:
        """Its plan, taken as the output holds it (its file unread)."""
        return DocumentPlan(doc_id=self.doc_id, source=source, kind=None, num_pages=self.num_pages, stamp=self.stamp)


@dataclass
class FoundInputs:
    """The documents the inputs name, and what was left out of folders and globs, counted by suffix."""

    sources: list[str] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)
    recent: list[str] = field(default_factory=list)  # documents left for a later run: modified too lately


def with_scheme(location: str, path: str) -> str:
    """A path found in a URI's filesystem as a URI again, percent-encoded so that ``#``, ``%`` and
    spaces in names survive the next parse: the one form of a store's files (and of the output's folders,
    :func:`operators.write.output_folders`, that they are compared with)."""
    return f"{location.split('://', 1)[0]}://{quote(path)}" if is_uri(location) else path


def _left_out_as(name: str) -> str | None:
    """None for a file to read as a document, else the key it is counted under in the summary."""
    if _OS_JUNK.match(name):
        return "._*" if name.startswith("._") else name
    if name.lower().endswith(SUPPORTED_SUFFIXES):
        return None
    return os.path.splitext(name)[1].lower() or "(no suffix)"


#: The ``left_out`` key of files in the job's own output folders.
IN_THE_OUTPUT = "in the output folder"


def _sort_out(paths: Iterable[str], left_out: Counter, output_folders: Sequence[str],
              unlisted: Sequence[str] = ()) -> list[str]:
    """The paths that are documents, with the folders that could not be listed (to be reported), sorted; the
    others counted in ``left_out``: by suffix, or as :data:`IN_THE_OUTPUT` when in one of the job's
    ``output_folders`` (an output inside an input folder: a second run would read the first run's searchable
    PDFs and page images as new documents)."""
    inside = _inside_test(output_folders)
    kept = [folder for folder in unlisted if not inside(folder)]
    for path in paths:
        key = IN_THE_OUTPUT if inside(path) else _left_out_as(path.rsplit("/", 1)[-1])
        if key is None:
            kept.append(path)
        else:
            left_out[recorded_source(key)] += 1  # a suffix may hold bytes that are not UTF-8
    return sorted(kept)


def _walk(folder: str, seen: set[tuple[int, int]]) -> tuple[list[str], list[str]]:
    """Every file under ``folder``, into linked folders too, each folder once across the calls that share
    ``seen`` (a link to a folder above it would loop), a real folder before a link to it; and the folders that
    cannot be listed (no permission). os.walk, unlike pyarrow, lists broken links and link loops: they, and
    the folders not listed, become `unreadable` rows, not silence."""
    paths: list[str] = []
    unlisted: list[str] = []
    for root, folders, names in os.walk(folder, followlinks=True, onerror=lambda exc: unlisted.append(exc.filename)):
        try:
            status = os.stat(root)
        except OSError:
            continue
        if (status.st_dev, status.st_ino) in seen:
            folders.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        folders.sort(key=lambda name: os.path.islink(os.path.join(root, name)))
        paths.extend(os.path.join(root, name) for name in names)
    return paths, unlisted


def _glob(pattern: str) -> Iterator[str]:
    """``glob.glob(pattern, recursive=True)``, but a ``**`` never follows a link back into a folder it came
    through: Python's glob goes round such a loop until the path is too long, and with two loops that takes
    exponential time (the job never starts). Linked folders are still searched, as :func:`_walk` searches
    them; names starting with a dot match only a pattern part that does."""
    parts = pattern.split(os.sep)
    if os.path.isabs(pattern):
        return _glob_in(os.sep, parts[1:], frozenset())
    # a relative "**" matches the current folder too, which glob leaves out (it would be walked whole)
    return (os.path.relpath(path) for path in _glob_in(os.curdir, parts, frozenset())
            if os.path.normpath(path) != os.curdir)


def _glob_in(folder: str, parts: list[str], above: frozenset[tuple[int, int]]) -> Iterator[str]:
    if not parts:
        yield folder
        return
    part, rest = parts[0], parts[1:]
    if not _GLOB_CHARS.search(part):
        path = os.path.join(folder, part)
        if (os.path.isdir(path) if rest else os.path.lexists(path)):
            yield from _glob_in(path, rest, above)
        return
    if part == "**":
        yield from _glob_in(folder, rest, above)  # before listing: a folder that may be entered, not listed
        try:
            names, status = sorted(os.listdir(folder)), os.stat(folder)
        except OSError:  # reported as not listed (:func:`_walk`)
            yield folder
            return
        inside = above | {(status.st_dev, status.st_ino)}
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                status = os.stat(path)
            except OSError:  # a broken link: a name to report as unreadable, like a file
                status = None
            if status is None or not stat.S_ISDIR(status.st_mode):
                if not rest:  # a last "**" matches files too
                    yield path
            elif (status.st_dev, status.st_ino) not in inside:  # else a link round a loop
                yield from _glob_in(path, parts, inside)
        return
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # reported as not listed (:func:`_walk`)
        yield folder
        return
    for name in fnmatch.filter(names, part):
        path = os.path.join(folder, name)
        if (name.startswith(".") and not part.startswith(".")) or (rest and not os.path.isdir(path)):
            continue
        yield from _glob_in(path, rest, above)


def _matches_glob(parts: Sequence[str], names: Sequence[str]) -> bool:
    """Whether a glob's parts match a listed file's path (its names below the glob's fixed start) as :func:`_glob`
    matches a local one: ``*``, ``?`` and ``[...]`` within one name, ``**`` through any number of folders, a name
    starting with a dot only where the part does, and a folder matched taken whole. A URI's glob had been matched
    against the whole path, its ``*`` running on through ``/`` into every subfolder."""
    if not parts:
        return True  # inside a folder the glob matched
    if not names:  # a file where the glob goes on into a folder
        return False
    part, name = parts[0], names[0]
    if part == "":  # after a trailing "/": what went before matched a folder
        return True
    if part == "**":
        return _matches_glob(parts[1:], names) or (not name.startswith(".") and _matches_glob(parts, names[1:]))
    return (fnmatch.fnmatchcase(name, part) and not (name.startswith(".") and not part.startswith("."))
            and _matches_glob(parts[1:], names[1:]))


def _inside_test(folders: Sequence[str]) -> Callable[[str], bool]:
    """Whether a path lies under one of ``folders``: a local folder as given or with its links resolved, and
    the paths as listed or with their folder's links resolved, once per folder (not per file: archives list
    millions). An input reached through a link (a linked input folder, a link in it to the output) had read the
    job's own exports as new documents."""
    uris = tuple(folder.rstrip("/") + "/" for folder in folders if is_uri(folder))
    local = tuple({os.path.join(resolve(folder), "") for folder in folders if not is_uri(folder)
                   for resolve in (os.path.abspath, os.path.realpath)})
    real_folders: dict[str, str] = {}

    def inside(path: str) -> bool:
        if is_uri(path):
            return f"{path}/".startswith(uris)  # the lock file itself too
        parent, name = os.path.split(os.path.abspath(path))
        if parent not in real_folders:
            real_folders[parent] = os.path.realpath(parent)
        return (os.path.join(parent, name, "").startswith(local)
                or os.path.join(real_folders[parent], name, "").startswith(local))

    return inside


def _expand_one(item: str, left_out: Counter, output_folders: Sequence[str]) -> list[str]:
    # an existing name is taken literally even when it holds glob characters ("scan [1].pdf")
    if not is_uri(item) and not os.path.lexists(item) and _GLOB_CHARS.search(item):
        # linked folders are searched: each file once, by its shortest path
        shortest: dict[tuple[str, str], str] = {}
        real_folders: dict[str, str] = {}
        for match in sorted(map(os.path.abspath, _glob(item)), key=len):
            parent, name = os.path.split(match)
            real = real_folders.setdefault(parent, os.path.realpath(parent))
            shortest.setdefault((real, name), match)
        seen: set[tuple[int, int]] = set()
        walked = [_walk(match, seen) if os.path.isdir(match) else ([match], []) for match in sorted(shortest.values())]
        return _sort_out([path for paths, _ in walked for path in paths], left_out, output_folders,
                         [folder for _, unlisted in walked for folder in unlisted])
    if not is_uri(item):  # os, not pyarrow: a name that is not UTF-8 is found, to be reported by triage
        path = os.path.abspath(item)
        if os.path.isdir(path):
            paths, unlisted = _walk(path, set())
            return _sort_out(paths, left_out, output_folders, unlisted)
        if not os.path.lexists(path):  # a broken link is there: reported by triage
            raise NoInputError(f"input {item!r}: there is no such file or folder")
        return [path]
    if "?" in item:
        # rebuilt from their paths, the files found would be read without them: from another endpoint (AWS's)
        raise ConfigError(f"input {item!r}: the options of an input URI (after '?') do not reach the files found in "
                          "it; set them in the environment instead (S3: AWS_ENDPOINT_URL, AWS_REGION and the "
                          "credentials), and write a '?' in a name as %3F")
    filesystem, path = resolve_filesystem(item)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound and _GLOB_CHARS.search(path):
        root = path[: _GLOB_CHARS.search(path).start()].rsplit("/", 1)[0]
        # a glob ending in "/" matches folders only, as on a disk (pyarrow drops the "/" from the path)
        parts = path[len(root):].strip("/").split("/") + ([""] if item.endswith("/") else [])
        infos = filesystem.get_file_info(pafs.FileSelector(root or "/", recursive=True, allow_not_found=True))
        return _sort_out([with_scheme(item, i.path) for i in infos if i.type == pafs.FileType.File
                          and _matches_glob(parts, i.path[len(root):].strip("/").split("/"))], left_out,
                         output_folders)
    if info.type == pafs.FileType.Directory:
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        return _sort_out([with_scheme(item, i.path) for i in infos if i.type == pafs.FileType.File], left_out,
                         output_folders)
    if info.type == pafs.FileType.NotFound:
        raise NoInputError(f"input {item!r}: there is no such file or folder")
    # A file named explicitly is taken whatever its suffix: triage decides what it is.
    return [with_scheme(item, path)]


def find_inputs(inputs: list[str], output_folders: Sequence[str] = (), min_file_age_s: float = 0.0) -> FoundInputs:
    """Files, folders (recursive) and globs, local or pyarrow-filesystem URIs, in a stable order.

    An input that matches nothing is an error naming it, so a typo never yields an empty job. Folders and
    globs leave out what lies in the job's ``output_folders`` (see :func:`_sort_out`). Local files modified less
    than ``min_file_age_s`` seconds ago are set apart as ``recent`` (:func:`_settled`).
    """
    found = FoundInputs()
    seen: set[str] = set()
    now = time.time()
    for item in inputs:
        with asking_the_store(item, "the input"):
            matched = _expand_one(item, found.left_out, output_folders)
        if not matched:
            raise NoInputError(f"input {item!r} matches no document ({' '.join(SUPPORTED_SUFFIXES)})")
        for source in matched:
            if source not in seen:
                seen.add(source)
                (found.sources if _settled(source, min_file_age_s, now) else found.recent).append(source)
    return found


def _settled(source: str, min_age_s: float, now: float) -> bool:
    """Whether a file was last modified at least ``min_age_s`` seconds before ``now`` (this machine's clock).

    Why: a scanner or a copy writing into a hot folder leaves a file half written for a while; read then, it fails
    as broken or ``source_changed``, and the hour's run exits 4. Left for a later run, it is read whole. Object-store
    objects (URIs) appear whole, and a file that cannot be looked at is triage's to report: both count as settled."""
    if min_age_s <= 0:
        return True
    filesystem, path = resolve_filesystem(source)
    if not isinstance(filesystem, pafs.LocalFileSystem):  # file:// URIs are local files
        return True
    try:
        return now - os.stat(path).st_mtime >= min_age_s
    except (OSError, ValueError):
        return True


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


def source_stamp(source: str) -> tuple[int, int] | None:
    """The file's size and modification time (ns), what says cheaply that its bytes changed; None when it is
    gone."""
    filesystem, path = resolve_filesystem(source)
    try:
        info = filesystem.get_file_info(path)
    except (OSError, pa.ArrowInvalid) as exc:  # ArrowInvalid: a name pyarrow cannot take (an S3 key with "//")
        raise UnreadableFile(f"cannot read {source}: {exc}") from exc
    return None if info.type == pafs.FileType.NotFound else (info.size, info.mtime_ns or 0)


def check_unchanged(source: str, stamp: tuple[int, int]) -> None:
    """Raise :class:`SourceChanged` when the file is no longer the one ``stamp`` was taken of: written to,
    replaced or deleted while the job read it (a scanner's hot folder, a sync tool)."""
    now = source_stamp(source)
    if now is None:
        raise SourceChanged(f"{source} was deleted or moved while the job read it")
    if now != stamp:
        # a touched file had been said to be written to, "it had 793123 bytes, now 793123"
        change = (f"it had {stamp[0]} bytes, now {now[0]}" if now[0] != stamp[0]
                  else "its modification time changed, its size did not")
        raise SourceChanged(f"the file was written to, replaced or touched while the job read it ({change}): the next "
                            "run reads it as it is then")


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
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):  # TIFF, BigTIFF
        return "tiff"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):  # JP2/JPX box, raw codestream
        return "jp2"
    if head.startswith(b"BM") and head[14:18] in _BMP_HEADER_SIZES:
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if b"%PDF-" in head[:1024]:
        return "pdf"
    raise UnsupportedFormat("not a PDF, TIFF, PNG, JPEG, JPEG 2000, BMP, WebP or GIF file (checked the magic bytes)")


#: The DIB header sizes a BMP can have: "BM" alone also starts ordinary text.
_BMP_HEADER_SIZES = {size.to_bytes(4, "little") for size in (12, 16, 40, 52, 56, 64, 108, 124)}


_PAGES = re.compile(r"^Pages:\s+(\d+)", re.MULTILINE)
#: pdfinfo prints sizes with printf's %g: a page a million points wide is "1e+06"
_PAGE_SIZE = re.compile(r"^Page\s+(\d+) size:\s+([\d.eE+-]+) x ([\d.eE+-]+) pts", re.MULTILINE)
_PAGE_ROTATION = re.compile(r"^Page\s+\d+ rot:\s+(\d+)", re.MULTILINE)


def pdf_info(path: str, config: RasterizeConfig) -> dict[str, str | int | list]:
    """Page count, encryption, page sizes ((page, width, height) in points) and rotations from ``pdfinfo``,
    killed after the configured timeout."""
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
        if "security handler" in stderr.lower():
            raise EncryptedFile(f"the PDF is encrypted with a security handler poppler lacks: {stderr.splitlines()[-1]}")
        raise CorruptFile(f"pdfinfo could not read the PDF: {stderr.splitlines()[-1] if stderr else 'no detail'}")
    pages = _PAGES.search(stdout)
    if pages is None:
        raise CorruptFile("pdfinfo reported no page count")
    sizes = [(int(page), float(w), float(h)) for page, w, h in _PAGE_SIZE.findall(stdout)]
    # poppler renders a /Rotate that is no multiple of 90 (the PDF spec allows no other) as 0
    rotations = [int(r) % 360 if int(r) % 90 == 0 else 0 for r in _PAGE_ROTATION.findall(stdout)]
    return {"pages": int(pages.group(1)), "sizes": sizes, "rotations": rotations}


def _too_large(width: float, height: float, page: int, config: RasterizeConfig, dpi: int | None) -> str | None:
    """Why a page of ``width`` x ``height`` px (rendered at ``dpi``; None: an image's own pixels, whatever its
    resolution) is over the pixel limit, or None."""
    if width * height <= config.max_page_pixels:
        return None
    size = f"would be {width:.0f}x{height:.0f} px at {dpi} dpi" if dpi else f"is {width:.0f}x{height:.0f} px"
    return f"page {page} {size}, over the limit of {config.max_page_pixels} pixels (rasterize.max_page_pixels)"


def _oversized(sizes: Iterable[tuple[int, float, float]], config: RasterizeConfig,
               dpi: int | None) -> tuple[tuple[int, str], ...]:
    """(page, why) of the pages (number, width px, height px) over the pixel limit. A foldout in a book fails
    its own page, not the book."""
    return tuple((number, why) for number, width, height in sizes
                 if (why := _too_large(width, height, number, config, dpi)) is not None)


def user_unit(page: pikepdf.Page) -> float:
    """The page's /UserUnit (PDF 1.6: its unit is that many 72nds of an inch), 1 where it gives no positive number.
    The page's own entry only: the spec does not let it be inherited from the page tree."""
    unit = page.obj.get("/UserUnit")
    return float(unit) if isinstance(unit, (int, Decimal)) and unit > 0 else 1.0


def page_units(path: str) -> tuple[float, ...] | None:
    """The /UserUnit (:func:`user_unit`) of each page in the PDF's page tree as qpdf walks it, so also the page
    count (the declared /Count can lie); None if qpdf cannot open the file either."""
    try:
        with pikepdf.open(path) as pdf:
            return tuple(user_unit(page) for page in pdf.pages)
    except pikepdf.PasswordError as exc:
        raise EncryptedFile("the PDF is encrypted with a user password") from exc
    except pikepdf.PdfError as exc:
        # a certificate's (/Adobe.PubSec) or another handler qpdf lacks; qpdf's message starts with the path
        if "unsupported encryption" in str(exc).removeprefix(path):
            raise EncryptedFile(f"the PDF is encrypted in a way that cannot be read: {exc}") from exc
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


def triage_pdf(path: str, config: RasterizeConfig
               ) -> tuple[int, bool, tuple[int, ...], tuple[float, ...], tuple[tuple[int, str], ...]]:
    """Page count, whether rendering needs the repaired copy, each page's /Rotate and /UserUnit, and the pages
    too large to render (:func:`_oversized`)."""
    pages, repaired, rotations, units, sizes = pdf_pages(path, config)
    return pages, repaired, rotations, units, _oversized(sizes, config, config.dpi)


def pdf_pages(path: str, config: RasterizeConfig
              ) -> tuple[int, bool, tuple[int, ...], tuple[float, ...], list[tuple[int, float, float]]]:
    """Page count, whether rendering needs the repaired copy, each page's /Rotate and /UserUnit, and each page's
    size in pixels at ``config.dpi`` per real inch (pdfinfo gives it in units, taking each for a point)."""
    units = page_units(path)
    if units == ():
        raise NoPages("the PDF's page tree is empty: it holds no page")
    try:
        info, repaired = pdf_info(path, config), False
    except CorruptFile:
        if units is None:
            raise
        with repaired_pdf(path) as fixed:
            info, repaired = pdf_info(fixed, config), True
    # the pages qpdf walks in the tree or poppler finds, whichever are more: the declared /Count can lie, high or low
    # (the tree's pages past it fail as page_count_mismatch), and qpdf leaves out of its tree a page it cannot
    # parse, which poppler may render
    found = poppler_pages(info)
    pages = max(len(units), found) if units is not None else int(info["pages"])
    if pages < 1:
        raise NoPages("the PDF declares no page")
    units = units_by_page(units, found)
    sizes = []
    for number, width, height in info["sizes"]:
        scale = (units[number - 1] if number <= len(units) else 1.0) * config.dpi / 72
        sizes.append((number, width * scale, height * scale))
    return pages, repaired, tuple(info["rotations"]), units, sizes


def poppler_pages(info: dict) -> int:
    """The pages poppler finds in a PDF (:func:`pdf_info`): the last it gives a size, whatever /Count declares."""
    return max((number for number, width, height in info["sizes"] if width > 0 and height > 0), default=0)


def units_by_page(units: tuple[float, ...] | None, found: int) -> tuple[float, ...]:
    """The pages' /UserUnit (:func:`page_units`, in qpdf's page tree) where the tree lines up with the ``found`` pages
    of poppler, by whose numbers pages are read; () (every unit 1) where the tree lacks a page it could not parse."""
    return units if units is not None and len(units) >= found else ()


def quiet_decoders() -> None:
    """Pillow's warnings about damaged metadata ("Corrupt EXIF data") off in this process: from a Ray task they
    reach the console without a word of which file, and what damage stops a page is recorded on it. A filter for
    the process, set again (not duplicated) by each caller: ``warnings.catch_warnings`` is not safe in threads,
    which the dry run triages in."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    # an image over the page pixel limit fails as page_too_large, named; Pillow's warning names no file
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def allow_pixels(max_page_pixels: int) -> None:
    """Let Pillow open images up to twice ``max_page_pixels`` without a word (it warns over its own limit, 89 Mpx,
    and refuses twice that as a decompression bomb): the page-size check is :func:`_too_large`, the same for
    images and PDFs, and it runs before any pixel is decoded."""
    Image.MAX_IMAGE_PIXELS = max(2 * max_page_pixels, DEFAULT_MAX_IMAGE_PIXELS)


#: TIFF NewSubfileType (tag 254) bits of a frame that is no page: a reduced-resolution copy (a preview or
#: thumbnail some scanners write after each page) and a transparency mask; and the old SubfileType (tag 255)
#: value of a reduced-resolution copy.
NEW_SUBFILE_TYPE = 254
_NOT_A_PAGE = 0b101
SUBFILE_TYPE = 255
_REDUCED_RESOLUTION = 2


@dataclass(frozen=True)
class Frame:
    """One frame of an image file that is a page: its index among the file's frames and its size in pixels, or
    why its header cannot be read (the page fails, the frames after it are not reached, and the open image is
    not to be seeked to it again: Pillow then hands out the frame before it)."""

    index: int
    size: tuple[int, int] | None
    damage: str | None = None


@contextmanager
def open_image(path: str) -> Iterator[Image.Image]:
    """An image opened from a file object, not its path: Pillow memory-maps an uncompressed single-strip frame
    opened by path with the size it reports, which for a TIFF whose orientation turns it a quarter (5-8) is the
    upright one, so the page came out garbled (Pillow 13). Bytes Pillow cannot identify are named by the file's path
    (from a file object its error names the object: ``<_io.BufferedReader name=...>``)."""
    with open(path, "rb") as handle:
        try:
            image = Image.open(handle)
        except UnidentifiedImageError as exc:
            raise UnidentifiedImageError(f"cannot identify image file {path!r}") from exc
        with image:
            yield image


def page_frames(image: Image.Image, pages: int | None = None) -> list[Frame]:
    """The frames of an open image that are its pages, the first ``pages`` of them (all when None).

    Not pages: a TIFF frame marked as a reduced-resolution copy or a mask, and every picture of a multi-picture
    JPEG (MPO: what cameras write) after the first, which is a preview or another view of the same shot. A file
    whose every frame is marked so is read frame by frame. Frames are counted by seeking, not with ``n_frames``,
    which raises on a damaged frame: here a frame whose header cannot be read counts as a page and ends the
    count, and the frames before it are read."""
    if image.format == "MPO":
        return [Frame(0, image.size)]
    found: list[Frame] = []
    marked: list[Frame] = []
    damaged: list[Frame] = []
    index = 0
    # Pillow decodes a GIF's or animated PNG's frame as it seeks to the next: each is decoded here, so that its
    # damage is its own (a GIF cut off in its only frame had got a second, failed page)
    decodes_on_seek = image.format == "GIF" or (image.format == "PNG" and getattr(image, "is_animated", False))
    while pages is None or len(found) < pages:
        try:
            image.seek(index)
            if decodes_on_seek:
                image.load()
        except EOFError:
            break
        except Image.DecompressionBombError:
            raise
        except Exception as exc:  # noqa: BLE001 - any library error here means a damaged frame
            damaged.append(Frame(index, None, f"{type(exc).__name__}: {exc}"))
            break
        (marked if _is_no_page(image) else found).append(Frame(index, image.size))
        index += 1
    return (found or marked) + damaged


def _is_no_page(image: Image.Image) -> bool:
    tags = getattr(image, "tag_v2", {})
    subfile = tags.get(NEW_SUBFILE_TYPE, 0)
    return (isinstance(subfile, int) and bool(subfile & _NOT_A_PAGE)) or tags.get(SUBFILE_TYPE) == _REDUCED_RESOLUTION


def triage_image(path: str, config: RasterizeConfig) -> tuple[int, tuple[tuple[int, str], ...]]:
    """Pages of an image (:func:`page_frames`), and those too large to render (:func:`_oversized`)."""
    allow_pixels(config.max_page_pixels)
    try:
        with open_image(path) as image:
            frames = page_frames(image)
    except Image.DecompressionBombError as exc:
        raise PageTooLarge(f"decompression bomb: {exc}") from exc
    except DocumentError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, TypeError... on bad bytes
        raise CorruptFile(f"the image cannot be decoded: {type(exc).__name__}: {exc}") from exc
    sizes = [(number, *frame.size) for number, frame in enumerate(frames, 1) if frame.size is not None]
    return len(frames), _oversized(sizes, config, None)


#: How much of the temporary folder a node's copies of URI inputs may take (least recently used out first).
INPUT_COPIES_BYTES = 4 << 30
#: The sizes of the copies this process made since it last looked the folder over.
_copied_since_look: list[int] = []


@contextmanager
def local_path(source: str, stamp: tuple[int, int] | None = None,
               keep_bytes: int = INPUT_COPIES_BYTES) -> Iterator[str]:
    """A local path for poppler/Pillow: the file itself when local, else this node's copy of it. Every page range
    of a document and each of its exports reads the file: the copy is made once per node and version of the file
    (its size and modification time: ``stamp`` when the caller has just taken it, else asked for), and held while
    in use, so that no other task takes it out."""
    if not is_uri(source):
        yield source
        return
    folder = _copies_folder()
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.is_symlink() or folder.stat().st_uid != os.getuid():  # another user's in a shared /tmp
        raise UnreadableFile(f"cannot copy {source}: {folder} is not this user's folder")
    stamp = stamp or source_stamp(source)
    if stamp is None:
        raise UnreadableFile(f"cannot read {source}: there is no such file")
    key = hashlib.sha256(f"{source}\n{stamp}".encode("utf-8", "surrogateescape")).hexdigest()
    # named apart from the source: a source named x.lock had been taken for its own lock file (the bytes decide
    # what a file is, not its name)
    copy, lock_path = folder / f"{key}.copy", folder / f"{key}.lock"
    while True:  # until a copy is held: a lock changes hands for a moment as it turns exclusive or shared
        lock = _lock(lock_path, fcntl.LOCK_SH)  # readers share it; none may take the copy out meanwhile
        try:
            if not copy.exists():
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not copy.exists():
                    _copy(source, stamp, copy)
                    _copied_since_look.append(copy.stat().st_size)
                    # looked over after a share of the bound or some copies, not each: a folder of 25,000 copies
                    # takes 0.2 s to look over
                    if sum(_copied_since_look) >= keep_bytes // 8 or len(_copied_since_look) >= 64:
                        _copied_since_look.clear()
                        _keep_recent(folder, keep_bytes - copy.stat().st_size, keep=copy)
                fcntl.flock(lock, fcntl.LOCK_SH)
            if copy.exists() and _holds(lock, lock_path):
                os.utime(copy)  # its last use, which decides what goes first
                yield str(copy)
                return
        finally:
            os.close(lock)


@contextmanager
def input_copies(sources: Sequence[str]) -> Iterator[None]:
    """Around a job: when it ends, this node's copies of URI inputs that no task holds are taken out, so that the
    job leaves none in the temporary folder on a local run (a killed one leaves at most
    :data:`INPUT_COPIES_BYTES`, which the next job's end takes out; on a cluster, each other node keeps that much
    for the next job)."""
    try:
        yield
    finally:
        if any(is_uri(source) for source in sources) and _copies_folder().is_dir():
            _keep_recent(_copies_folder(), 0)


def _copies_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"trocr-pipeline-inputs-{os.getuid()}"


def _copy(source: str, stamp: tuple[int, int], copy: Path) -> None:
    """Copy ``source`` to ``copy`` whole or not at all; refused when it changed while copied."""
    handle, partial = tempfile.mkstemp(dir=copy.parent, prefix=copy.stem, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            for chunk in _chunks(source):
                out.write(chunk)
        check_unchanged(source, stamp)
        os.replace(partial, copy)
    finally:
        Path(partial).unlink(missing_ok=True)


def _keep_recent(folder: Path, room: int, keep: Path | None = None) -> None:
    """Take out the least recently used copies (and what killed copies left) until the rest fit in ``room``
    bytes; a copy in use (its lock held) stays."""
    files = []
    for entry in folder.iterdir():
        try:
            if entry.suffix != ".lock" and entry != keep:
                files.append((entry.stat(), entry))
        except FileNotFoundError:  # taken out by another task meanwhile
            pass
    total = sum(status.st_size for status, _ in files)
    for status, entry in sorted(files, key=lambda item: item[0].st_mtime):
        if total <= room:
            return
        key = entry.name.split(".")[0][:64]
        try:
            lock = _lock(folder / f"{key}.lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        try:
            entry.unlink(missing_ok=True)
            total -= status.st_size
            (folder / f"{key}.lock").unlink()
        finally:
            os.close(lock)


def _lock(path: Path, how: int) -> int:
    """An open descriptor of the lock file ``path``, locked ``how``; one taken out while waiting is opened anew,
    so that two tasks never hold locks on two files of one name."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, how)
        except BaseException:
            os.close(descriptor)
            raise
        if _holds(descriptor, path):
            return descriptor
        os.close(descriptor)


def _holds(descriptor: int, path: Path) -> bool:
    """Whether the open lock file is still the one named ``path`` (not taken out, nor made anew since)."""
    try:
        return os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def source_id(source: str) -> str:
    """The doc_id of a file whose bytes cannot be read: the sha256 of its path or URI."""
    return hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()


def _check_regular_file(path: str) -> None:
    """Refuse what is not a regular file before reading it: a FIFO would block the read forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UnreadableFile(f"cannot read {path}: {exc}") from exc
    if stat.S_ISDIR(mode):  # a folder that could not be listed (:func:`_walk`)
        try:
            os.listdir(path)
        except OSError as exc:
            raise UnreadableFile(f"cannot list the folder {path}, so the files in it are not read: {exc}") from exc
        raise UnreadableFile(f"the folder {path} could not be listed when the inputs were found: run again")
    if not stat.S_ISREG(mode):
        raise UnreadableFile(f"{path} is not a regular file (a FIFO, socket or device), so it is not read")


def unchanged_local_document(source: str, known: KnownDocument | None) -> DocumentPlan | None:
    """The plan of a ``known`` document whose local file has the size and modification time it had, taken with one
    ``stat`` where the driver lists the inputs (a rerun over 4,000 files had spent a Ray task on each, 1 ms a file);
    None for any other, which :func:`triage` reads. A URI is left to triage: a request to its store each."""
    if known is None or is_uri(source):
        return None
    try:
        stat_result = os.stat(source)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(stat_result.st_mode) or (stat_result.st_size, stat_result.st_mtime_ns) != known.stamp:
        return None
    return known.plan(source)


def local_document_of_bytes(source: str, num_pages: dict[str, int]) -> DocumentPlan | None:
    """The plan of a local file whose bytes, hashed as :func:`triage` hashes them, are those of a document written
    before (``num_pages``: each such doc_id's page count), where triage would find it so: a regular file, not empty,
    unchanged while hashed. None for any other, which triage reads. What lets a run over a touched file, or one that
    failed, find without triage that it has nothing to read."""
    if is_uri(source):
        return None
    try:
        before = os.stat(source)
        if not stat.S_ISREG(before.st_mode):
            return None
        doc_id, _, size = fingerprint(source)
        after = os.stat(source)
    except (DocumentError, OSError, ValueError):
        return None
    stamp = (before.st_size, before.st_mtime_ns)
    if size == 0 or doc_id not in num_pages or (after.st_size, after.st_mtime_ns) != stamp:
        return None
    return KnownDocument(doc_id, num_pages[doc_id], stamp).plan(source)


def triage(source: str, config: RasterizeConfig, known: KnownDocument | None = None) -> DocumentPlan:
    """Never raises for a bad document, whatever goes wrong: the error is recorded in the plan. A ``known``
    document whose file is unchanged is taken as it is, unread (a rerun over a growing archive had hashed every
    file again)."""
    doc_id = source_id(source)  # replaced by the content hash once read
    kind: DocumentKind | None = None
    stamp: tuple[int, int] | None = None
    recorded = recorded_source(source)
    try:
        if recorded != source:
            raise UnreadableFile(f"the file name is not UTF-8 ({recorded}): rename the file to have it read")
        filesystem, path = resolve_filesystem(source)
        if isinstance(filesystem, pafs.LocalFileSystem):  # a file:// URI too
            _check_regular_file(path)
        stamp = source_stamp(source)
        if stamp is None:
            raise UnreadableFile(f"cannot read {source}: there is no such file")
        if known is not None and known.stamp == stamp:
            return known.plan(source)
        quiet_decoders()
        with local_path(source, stamp) as path:  # a URI's bytes fetched once, for the hash and for the look inside
            doc_id, head, size = fingerprint(path)
            if size == 0:
                raise EmptyFile("the file is empty (0 bytes)")
            kind = sniff_kind(head)
            if kind == "pdf":
                num_pages, repaired, rotations, units, oversized = triage_pdf(path, config)
            else:
                (num_pages, oversized), repaired, rotations, units = triage_image(path, config), False, (), ()
        check_unchanged(source, stamp)
        return DocumentPlan(doc_id=doc_id, source=source, kind=kind, num_pages=num_pages, repaired=repaired,
                            page_rotations=rotations, page_units=units, oversized_pages=oversized, stamp=stamp)
    except DocumentError as error:
        if stamp is not None and not isinstance(error, SourceChanged):
            try:  # a file still being copied in had failed as corrupt_file, named by the hash of a part of it
                check_unchanged(source, stamp)
            except DocumentError as found:
                error = found if isinstance(found, SourceChanged) else error
        if isinstance(error, SourceChanged):  # no one version of the file was read: named by its path
            return DocumentPlan(doc_id=source_id(source), source=recorded, kind=kind, num_pages=0, error=error)
        # the size a copy of the file shares (:meth:`operators.write.PublishedDocuments.failed_to_retry`)
        return DocumentPlan(doc_id=doc_id, source=recorded, kind=kind, num_pages=0, error=error, stamp=stamp)
    except Exception as exc:  # noqa: BLE001 - one file must never end the job
        if (full := scratch_space_full(exc, f"reading {recorded}")) is not None:
            raise full from exc
        error = InternalError(f"triage failed unexpectedly: {type(exc).__name__}: {exc}")
        return DocumentPlan(doc_id=doc_id, source=recorded, kind=kind, num_pages=0, error=error)


def duplicate_id(doc_id: str, source: str) -> str:
    """The doc_id of a second file with the same bytes: unique, and the same in every run."""
    return hashlib.sha256(f"{doc_id}\n{source}".encode()).hexdigest()


def mark_duplicates(plans: list[DocumentPlan], published: dict[str, str]) -> list[DocumentPlan]:
    """Plans left to write, duplicates marked. ``published`` maps each doc_id already written to its
    source. A file whose bytes were already seen, earlier in this run or written by an earlier run
    under another source, becomes a duplicate (its own doc_id, no pages) of that document; or, when its
    bytes fail triage (two empty files), a failed document of its own with that error."""
    first: dict[str, str] = {}  # content doc_id -> source holding the pages
    for doc_id, source in published.items():
        first.setdefault(doc_id, source)
    fresh = []
    for plan in plans:
        owner = first.setdefault(plan.doc_id, plan.source)
        if owner != plan.source and plan.error is None:
            plan = replace(plan, doc_id=duplicate_id(plan.doc_id, plan.source), duplicate_of=plan.doc_id)
        elif owner != plan.source:  # a copy of a file that cannot be read fails as that file does, on its own row
            plan = replace(plan, doc_id=duplicate_id(plan.doc_id, plan.source))
        if plan.doc_id not in published:
            fresh.append(plan)
    return fresh
