"""Write: finished pages and documents to Parquet, committed so that readers and reruns see each
document exactly once.

Pages are held per document until all of its pages are in. Complete documents are written in
pairs of part files with the same name, ``pages/part-R-N.parquet`` then
``documents/part-R-N.parquet``, each written under ``_staging/`` and renamed into place. A document
counts as written once its ``documents`` row is published; a ``pages`` part whose ``documents``
twin is missing (a run killed between the two renames) is removed at the next start, and the rerun
processes those documents again. ALTO / PAGE / hOCR / text / PDF / METS exports, when asked for, go to
``exports/`` before the documents row is published (written by the job's Ray tasks while it reads on), under names
that a rerun overwrites; what an unfinished run exported of a document and the rerun does not write again is
removed.

One run at a time: :func:`output_lock` holds ``DIR/.lock`` for the whole run, and a write that fails
(disk full) stops the job with :class:`~operators.errors.WriteFailed`, everything published before
it intact.

Reading order was fixed by detection; here each page's lines are joined into its text, split into
words at the ink gaps measured in the layout stage, and mapped onto a row of ``PAGES_SCHEMA``.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Executor
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, ClassVar, NamedTuple
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators.errors import (EXPORT_FAILED, ConfigError, DocumentError, EmptyFile, OutputLocked, OutputNotWritable,
                              PipelineError, SourceChanged, WriteFailed)
from operators.formats.export import STAGED_EXPORT_PREFIX, formats_written, remove_other_exports, write_exports
from operators.ingest import KnownDocument, check_unchanged, duplicate_id, source_id, with_scheme
from operators.records import DOCUMENTS_SCHEMA, PAGES_SCHEMA, DocumentRecord, LineRecord, PageWork
from operators.settings import RasterizeConfig
from operators.storage import (asking_the_store, holding_lock_file, is_uri, move_into_place, resolve_filesystem,
                               scratch_space_full, writing)
from operators.words import split_words

log = logging.getLogger(__name__)

PAGES_DIR = "pages"
DOCUMENTS_DIR = "documents"
STAGING_DIR = "_staging"
#: In DIR while ``--retry-failed`` takes documents out: the doc_ids, so that a killed run's retirement is finished.
RETIRING = "_retiring.json"
#: ``_staging/`` note of a document whose exports are being written and whose row is not published yet (what a
#: rerun takes out when the row never came: a killed run, then the source changed or gone).
EXPORTING = "exporting-{doc_id}.json"
_EXPORTING_NAME = re.compile(r"exporting-[^/]+\.json")
#: The name of the file that checks a folder of the output can be written (one run at a time holds the output).
WRITE_PROBE = ".write-test"
EXPORTS_DIR = "exports"
LOCK_FILE = ".lock"


def page_text(lines: list[LineRecord]) -> str:
    """Page text: line texts in reading order, a blank line between blocks. Lines without text (detection
    only, or nothing read) are left out, so a blank line always means a new block."""
    parts: list[str] = []
    previous_block = None
    for line in sorted(lines, key=lambda item: item.order):
        if not line.text:
            continue
        if previous_block is not None and line.block != previous_block:
            parts.append("")
        parts.append(line.text)
        previous_block = line.block
    return "\n".join(parts)


def page_row(work: PageWork) -> dict:
    """The Arrow row (matching PAGES_SCHEMA) of a finished page."""
    lines = sorted(work.lines, key=lambda item: item.order)
    page_size = (work.width, work.height)
    return {
        "doc_id": work.doc_id,
        "source": work.source,
        "page": work.page,
        "width": work.width,
        "height": work.height,
        "dpi": work.dpi,
        "rotation": work.rotation,
        "text": page_text(lines),
        "lines": [
            {
                "text": line.text,
                "confidence": line.confidence,
                "bbox": list(line.bbox),
                "polygon": [list(point) for point in line.polygon],
                "baseline": [list(point) for point in line.baseline],
                "block": line.block,
                "order": line.order,
                "truncated": line.truncated,
                "words": [word.to_row() for word in split_words(line.text, line.bbox, line.gaps, page_size,
                                                                   line.word_confidences)],
            }
            for line in lines
        ],
        "status": work.status,
        "error_code": work.error_code,
        "error_message": work.error_message,
    }


@contextmanager
def output_lock(output: str) -> Iterator[None]:
    """Hold the output for one run, then check it can be written at all.

    A local output is locked with ``flock`` on ``DIR/.lock``: a second run on the same folder (a cron
    job firing twice) stops at once with :class:`OutputLocked`, before it writes anything, instead of
    cleaning up or repeating the first run's work. The kernel releases the lock when the run ends, even
    killed. Object stores have no such lock, nor do some shares (:func:`operators.storage.lock_alone` warns of
    them): such an output is only checked, and one job at a time per output is the caller's rule. Another tool's
    Parquet files there are refused first (:func:`check_output_is_ours`), before anything is written: the refused
    folder had been left with this tool's lock file and staging folder in it.
    """
    check_output_is_ours(output)
    filesystem, root = resolve_filesystem(output)
    local = isinstance(filesystem, pafs.LocalFileSystem)  # a file:// URI too
    made = local and not os.path.lexists(root)
    try:
        with _holding(output, root) if local else nullcontext():
            try:
                _check_writable(filesystem, root, output)
                yield
            finally:
                if local:
                    _leave_no_trace(root)
    finally:
        if made:  # once let go, and only when empty: what another run has put there since stays
            with suppress(OSError):
                os.rmdir(root)


def _check_writable(filesystem: pafs.FileSystem, root: str, output: str) -> None:
    """Make the staging folder, and write in each folder a run writes in that is there already (one made read-only
    had been found after all the work)."""
    try:
        filesystem.create_dir(f"{root}/{STAGING_DIR}", recursive=True)
    except OSError as exc:
        raise OutputNotWritable(f"the output {output} cannot be written: {exc}") from exc
    folders = [STAGING_DIR, *(folder for folder in (PAGES_DIR, DOCUMENTS_DIR, EXPORTS_DIR)
                              if filesystem.get_file_info(f"{root}/{folder}").type != pafs.FileType.NotFound)]
    for folder in folders:  # one name: a run killed here leaves its probe for the next run to take out
        probe = f"{root}/{folder}/{WRITE_PROBE}"
        try:
            with filesystem.open_output_stream(probe):
                pass
            filesystem.delete_file(probe)
        except OSError as exc:
            raise OutputNotWritable(f"the output {output} cannot be written: {exc}") from exc


@contextmanager
def _holding(output: str, root: str) -> Iterator[None]:
    """Hold ``DIR/.lock`` for this run (:func:`operators.storage.holding_lock_file`)."""
    with ExitStack() as held:
        try:
            held.enter_context(holding_lock_file(f"{root}/{LOCK_FILE}", f"the output {output}"))
        except BlockingIOError as exc:
            raise OutputLocked(f"another run is writing to {output} (it holds {root}/{LOCK_FILE}); "
                               "this run stopped without touching the output") from exc
        except OSError as exc:
            raise OutputNotWritable(f"the output {output} cannot be written: {exc}") from exc
        yield


def _leave_no_trace(root: str) -> None:
    """Take out what a run that wrote nothing made (refused once Ray had started: too few CPUs or no GPU for the
    recognizers; stopped before its first part): its lock file, and its folders while they are empty, while it holds
    the lock. They had been left, and ``show`` and ``synth`` took the folder for an output (:func:`output_lock` takes
    out the folder it made)."""
    folders = (STAGING_DIR, PAGES_DIR, DOCUMENTS_DIR, EXPORTS_DIR)
    try:
        held = set(os.listdir(root))
        if held - {LOCK_FILE, *folders} or any(os.listdir(f"{root}/{folder}") for folder in held & set(folders)):
            return
        for folder in held & set(folders):
            os.rmdir(f"{root}/{folder}")
        os.remove(f"{root}/{LOCK_FILE}")
    except OSError:  # the folder went, or cannot be changed: what is left is harmless
        pass


#: The names this tool gives its part files (:meth:`ParquetSink.flush`) and what it stages under ``_staging/``.
_PART_NAME = re.compile(r"part-[0-9a-f]{12}-\d{5,}\.parquet")
_STAGED_NAME = re.compile(
    rf"((retired-)?({PAGES_DIR}|{DOCUMENTS_DIR})-{_PART_NAME.pattern}|{re.escape(RETIRING)}|{re.escape(WRITE_PROBE)}"
    rf"|{STAGED_EXPORT_PREFIX}[0-9a-f]{{32}}|{_EXPORTING_NAME.pattern}\.part)")


def _list_parts(filesystem: pafs.FileSystem, folder: str) -> dict[str, str]:
    selector = pafs.FileSelector(folder, allow_not_found=True)
    return {info.base_name: info.path for info in filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File and _PART_NAME.fullmatch(info.base_name)}


def check_output_is_ours(output: str) -> None:
    """Refuse an output whose ``pages/`` or ``documents/`` hold Parquet files this tool did not write: a reader of
    the folder would take them for rows, and a run would remove them as parts without a twin."""
    filesystem, root = resolve_filesystem(output)
    for folder in (PAGES_DIR, DOCUMENTS_DIR):
        selector = pafs.FileSelector(f"{root}/{folder}", allow_not_found=True)
        with asking_the_store(output, "the output"):
            listed = filesystem.get_file_info(selector)
        foreign = sorted(info.base_name for info in listed
                         if info.base_name.endswith(".parquet") and not _PART_NAME.fullmatch(info.base_name))
        if foreign:
            raise OutputNotWritable(
                f"{root}/{folder} holds {len(foreign)} Parquet file(s) trocr-pipeline did not write ({foreign[0]}): "
                f"move them out of {output}, or write to another output")


def check_output_writable(output: str) -> None:
    """What :func:`output_lock` finds by writing, found without writing (the dry run): a local output that is a
    file, or that lies in a folder this user or a read-only mount cannot write to. Object stores are not checked."""
    filesystem, root = resolve_filesystem(output)
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return
    existing = root
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputNotWritable(f"the output {output} cannot be written: {existing} is "
                                f"{'a read-only folder' if os.path.isdir(existing) else 'not a folder'}")


def _clear_staging(filesystem: pafs.FileSystem, root: str) -> None:
    """Remove what a run staged and did not publish; anything else in ``_staging/`` is left alone."""
    selector = pafs.FileSelector(f"{root}/{STAGING_DIR}", allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        if info.type == pafs.FileType.File and _STAGED_NAME.fullmatch(info.base_name):
            filesystem.delete_file(info.path)


def output_folders(output: str) -> list[str]:
    """The folders a job writes in ``output``, and its lock file: a job never reads them as its input (the lock had
    been counted as an input left out for having no suffix). A URI's are written as the files found in a store
    are, percent-encoded the one way and without the URI's options (``?region=...``), so that they compare: an
    output so named inside an input folder had read its own exports as new documents at each run."""
    if is_uri(output):
        parts = urlsplit(output)
        output = with_scheme(output, unquote(parts.netloc + parts.path))
    return [f"{output.rstrip('/')}/{name}" for name in (PAGES_DIR, DOCUMENTS_DIR, STAGING_DIR, EXPORTS_DIR, LOCK_FILE)]


def recover_output(output: str, published: PublishedDocuments | None = None) -> PublishedDocuments:
    """Clean what a killed run left behind and return the documents already published: ``published``, where the run
    has read them before (:func:`published_documents` counts none of what this takes out), else read here.

    Parts are published in pairs, pages first: a pages part without its documents twin is a killed run's,
    and is removed. A documents part without its pages twin (removed by hand, lost) is removed too, so that
    its documents are read again instead of standing as done without their pages. A part that is no
    Parquet file stops the run, named: whether to redo its documents is the owner's call."""
    filesystem, root = resolve_filesystem(output)
    filesystem.create_dir(root, recursive=True)
    _clear_staging(filesystem, root)
    if _pending_retirement(filesystem, root):  # a --retry-failed run killed while taking documents out
        _retire(filesystem, root)
    documents = _list_parts(filesystem, f"{root}/{DOCUMENTS_DIR}")
    pages = _list_parts(filesystem, f"{root}/{PAGES_DIR}")
    for name, path in pages.items():
        if name not in documents:
            filesystem.delete_file(path)
        else:
            _read_part(filesystem, path, columns=[])  # its footer: a part that is no Parquet file is named here
    for name, path in documents.items():
        if name not in pages:
            log.warning("%s has lost its pages twin %s/%s/%s: its documents will be read again", path, root, PAGES_DIR,
                        name)
            filesystem.delete_file(path)
    if published is None:
        published = published_documents(output)
    _remove_unpublished_exports(filesystem, root, set(published.sources()))
    return published


@contextmanager
def exports_tidied_when_stopped(output: str) -> Iterator[None]:
    """Around a run, outside its Ray session: when it is stopped (Ctrl-C, SIGTERM, ``ray job stop``), the exports
    of the documents it did not publish, and what it staged, are taken out once Ray is down and their tasks with it.
    An orderly stop had left them in ``exports/`` until the next run, beside no row: an archive syncing the folder
    meanwhile took in METS packages of documents the tables lack. The notes naming them stay, so that the next run's
    start does the same again, should this fail or a cluster's task still be writing."""
    try:
        yield
    except KeyboardInterrupt:
        with suppress(OSError, PipelineError):
            filesystem, root = resolve_filesystem(output)
            _remove_unpublished_exports(filesystem, root, set(published_documents(output).sources()), keep_notes=True)
            _clear_staging(filesystem, root)
        raise


def _remove_unpublished_exports(filesystem: pafs.FileSystem, root: str, published: set[str],
                                keep_notes: bool = False) -> None:
    """Take out the exports a killed run wrote for documents whose rows it never published (:data:`EXPORTING`): a
    rerun writes them again under the same names, but not when the source has changed or gone meanwhile, and they
    had stayed beside the new ones for good."""
    selector = pafs.FileSelector(f"{root}/{STAGING_DIR}", allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        if info.type != pafs.FileType.File or not _EXPORTING_NAME.fullmatch(info.base_name):
            continue
        with filesystem.open_input_stream(info.path) as stream:
            document = json.loads(stream.read())
        if document["doc_id"] not in published:
            remove_other_exports(document, (), f"{root}/{EXPORTS_DIR}", filesystem)
        if not keep_notes:
            filesystem.delete_file(info.path)


def _read_part(filesystem: pafs.FileSystem, path: str, columns: Sequence[str] | None = None) -> pa.Table:
    """``columns`` of a published part (all when None; those a part older than them lacks are left out), its file
    closed after (a ``ParquetFile`` does not close a file it is handed); one that is no Parquet file stops the run,
    named (an OSError, a storage hiccup, says nothing of the part and is raised as it is)."""
    try:
        with filesystem.open_input_file(path) as file:
            part = pq.ParquetFile(file)
            return part.read(columns=None if columns is None else
                             [column for column in columns if column in part.schema_arrow.names])
    except pa.ArrowInvalid as exc:
        raise OutputNotWritable(f"the output part {path} is not a Parquet file ({exc}); remove it and its twin of "
                                f"the same name in {PAGES_DIR}/ or {DOCUMENTS_DIR}/ to have its documents read again"
                                ) from exc


def _published_rows(output: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """``columns`` of every published documents row: in a part with its pages twin (see :func:`recover_output`),
    and not written down to be retired (:func:`retire_documents`); None where a part predates a column."""
    filesystem, root = resolve_filesystem(output)
    retiring = set().union(*_pending_retirement(filesystem, root))
    rows: list[dict[str, Any]] = []
    pages = _list_parts(filesystem, f"{root}/{PAGES_DIR}")
    for name, path in _list_parts(filesystem, f"{root}/{DOCUMENTS_DIR}").items():
        if name not in pages:
            continue
        rows += [{column: row.get(column) for column in columns}
                 for row in _read_part(filesystem, path, columns).to_pylist() if row["doc_id"] not in retiring]
    return rows


def published_documents(output: str) -> PublishedDocuments:
    """The documents ``output`` holds as published, read without changing anything (``--dry-run``)."""
    return PublishedDocuments(tuple(_published_rows(output, PublishedDocuments.COLUMNS)))


def read_published(output: str, page_columns: Sequence[str], first_pages: int) -> tuple[list[dict], list[dict]]:
    """The documents rows, and the ``page_columns`` of the first ``first_pages`` pages rows by source and page
    number, that ``output`` holds as published: parts with their twin, less a retirement under way (what a reader
    should take as the output, :func:`_published_rows`). Of the other pages rows only the source and page number
    are read (an archive's text and line geometry had all been loaded to show three pages)."""
    filesystem, root = resolve_filesystem(output)
    if filesystem.get_file_info(root).type == pafs.FileType.NotFound:
        raise ConfigError(f"{output} does not exist")
    if filesystem.get_file_info(f"{root}/{DOCUMENTS_DIR}").type != pafs.FileType.Directory:
        raise ConfigError(f"{output} holds no trocr-pipeline output (no {DOCUMENTS_DIR}/ folder)")
    check_output_is_ours(output)  # another tool's Parquet files there: not an output to read as this tool's
    documents = _published_rows(output, DOCUMENTS_SCHEMA.names)
    published = {row["doc_id"] for row in documents}
    pages = _list_parts(filesystem, f"{root}/{PAGES_DIR}")
    parts = [pages[name] for name in _list_parts(filesystem, f"{root}/{DOCUMENTS_DIR}") if name in pages]
    keys = ((row["source"], row["page"], part, position) for part, path in enumerate(parts)
            for position, row in enumerate(_read_part(filesystem, path, ["doc_id", "source", "page"]).to_pylist())
            if row["doc_id"] in published)
    chosen = heapq.nsmallest(first_pages, keys)
    wanted: dict[int, list[int]] = {}
    for _, _, part, position in chosen:
        wanted.setdefault(part, []).append(position)
    rows = {(part, position): row for part, positions in wanted.items()
            for position, row in zip(positions, _read_part(filesystem, parts[part], ["doc_id", *page_columns]).take(
                positions).to_pylist())}
    return documents, [rows[part, position] for _, _, part, position in chosen]


class Reading(NamedTuple):
    """How a published document was read (each None where its row predates the column)."""

    pages_selected: str | None  # None: every page, or not recorded
    mode: str | None
    model: str | None
    model_sha256: str | None


@dataclass(frozen=True)
class Retirement:
    """The published failed documents a run takes out so that it reads them again
    (:meth:`PublishedDocuments.failed_to_retry`), in the order they go: the rows that rest on another (duplicates,
    failed copies) before the documents they rest on, so that a kill in between never leaves a row pointing at
    nothing."""

    dependents: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()

    @property
    def doc_ids(self) -> frozenset[str]:
        return self.dependents | self.failed


@dataclass(frozen=True)
class PublishedDocuments:
    """The published documents rows a job starts from, read once (an archive's output holds millions): which
    doc_ids are done, which files a rerun need not read, how each was read, and what ``--retry-failed`` takes
    out."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("doc_id", "source", "status", "error_code", "num_pages", "duplicate_of",
                                          "pages_selected", "mode", "source_size", "source_mtime_ns", "model",
                                          "model_sha256", "exports")
    rows: tuple[dict[str, Any], ...]

    def lacking_exports(self, doc_ids: Collection[str], formats: Sequence[str]) -> list[str]:
        """The sources of the documents among ``doc_ids`` with pages whose row does not record all of ``formats`` as
        written (rows written before the exports were recorded are not known to)."""
        wanted = set(formats_written(formats))
        return [row["source"] for row in self.rows
                if row["doc_id"] in doc_ids and row["exports"] is not None and not wanted <= set(row["exports"])]

    def read_sources(self, doc_ids: Collection[str]) -> set[str]:
        """The sources of the documents among ``doc_ids`` that were read (status ok)."""
        return {row["source"] for row in self.rows if row["doc_id"] in doc_ids and row["status"] == "ok"}

    def sources(self) -> dict[str, str]:
        """doc_id -> source."""
        return {row["doc_id"]: row["source"] for row in self.rows}

    def failed(self) -> frozenset[str]:
        """The doc_ids of the failed documents."""
        return frozenset(row["doc_id"] for row in self.rows if row["status"] == "failed")

    def known(self) -> dict[str, KnownDocument]:
        """The documents read whole and well (status ok), and the duplicates of those (as their bytes' document), by
        source, with the size and modification time their files had (rows written before those were recorded are
        left out): what a rerun need not read again (200 copies of a 10 MB scan had been hashed again each rerun)."""
        ok = {row["doc_id"] for row in self.rows if row["status"] == "ok"}
        return {row["source"]: KnownDocument(row["doc_id"] if row["status"] == "ok" else row["duplicate_of"],
                                             row["num_pages"], (row["source_size"], row["source_mtime_ns"]))
                for row in self.rows
                if (row["status"] == "ok" or (row["status"] == "duplicate" and row["duplicate_of"] in ok))
                and row["source_size"] is not None and row["source_mtime_ns"] is not None}

    def readings(self) -> dict[str, Reading]:
        """doc_id -> how it was read."""
        return {row["doc_id"]: Reading(row["pages_selected"], row["mode"], row["model"], row["model_sha256"])
                for row in self.rows}

    def failed_to_retry(self, read_now: dict[str, str], every: bool = True) -> Retirement:
        """What ``--retry-failed`` takes out: the ``failed`` documents whose source is among this run's
        (``read_now``: each recorded source and the doc_id its bytes have now), whatever bytes it holds now, with
        the rows resting on them: duplicates, and failed copies (a copy of a file that fails triage fails on a row
        of its own, with the original's error, its doc_id made from the original's by
        :func:`operators.ingest.duplicate_id`). A failed document with such a row that this run does not read
        stays, so that no row is left pointing at nothing.

        A folder's row (one that could not be listed) goes too when this run reads files in it.

        ``every`` false (any run): only the failures that say nothing of the bytes the file holds (:func:`_of_no_bytes`)
        of files this run reads under another doc_id, the rows of folders it now lists, and the ``source_changed``
        rows of bytes this run reads, under any name. The new outcome replaces them: a file an object store had failed
        to send once (a network fault) had kept its ``unreadable`` row beside the reading that followed, two rows for
        one source; and a file renamed while a run read it (a folder renamed) had become a ``duplicate`` of its
        ``source_changed`` row, its pages never read, with exit 0.

        A copy this run reads is found from its bytes' doc_id, at once; only the failed rows of files it does not
        read are tried against the documents it retries of their size, as a copy has its original's bytes (8,000
        failed documents read again had taken 33 s, every pair tried; and 5,000 failed outside the run, tried
        against 5,000 retried, 30 s); a row without its size (written before failed rows recorded it) against
        every one."""
        failed = {row["doc_id"]: row for row in self.rows if row["status"] == "failed" and (every or _of_no_bytes(row))}
        listed = {str(folder) for source in read_now for folder in PurePosixPath(source).parents}
        bytes_now = set(read_now.values())

        def other_bytes_now(row: dict[str, Any]) -> bool:  # a failed copy's row is its bytes' too (no churn)
            now = read_now.get(row["source"])
            return now is not None and row["doc_id"] not in (now, duplicate_id(now, row["source"]))

        resting: dict[str, list[dict]] = {doc_id: [] for doc_id, row in failed.items()
                                          if row["source"] in listed or other_bytes_now(row)
                                          or (every and row["source"] in read_now)
                                          or (row["error_code"] == SourceChanged.error_code and doc_id in bytes_now)}
        for row in self.rows:
            if row["duplicate_of"] in resting:
                resting[row["duplicate_of"]].append(row)
        for source, doc_id in read_now.items():
            if doc_id in resting and (copy := failed.get(duplicate_id(doc_id, source))) is not None:
                resting[doc_id].append(copy)
        by_size: dict[int | None, list[str]] = {}
        for doc_id in resting:
            by_size.setdefault(failed[doc_id]["source_size"], []).append(doc_id)
        for row in failed.values():
            if row["source"] not in read_now:
                size = row["source_size"]
                for doc_id in resting if size is None else by_size.get(size, []) + by_size.get(None, []):
                    if row["doc_id"] == duplicate_id(doc_id, row["source"]):
                        resting[doc_id].append(row)
        owners = {doc_id for doc_id, rows_on in resting.items() if all(row["source"] in read_now for row in rows_on)}
        dependents = frozenset(row["doc_id"] for doc_id in owners for row in resting[doc_id])
        return Retirement(dependents=dependents, failed=frozenset(owners - dependents))


def _of_no_bytes(row: dict[str, Any]) -> bool:
    """Whether a failed documents row says nothing of the bytes its file holds, so that the next run that reads other
    bytes there replaces it: they could not be read (its doc_id made from the path), the file was empty (a scanner's
    file as it is created), or it changed while the job read it (a hot folder's file still being copied in, replaced
    or moved). Such a row had stayed for good beside the reading of the file's next bytes."""
    return (row["doc_id"] == source_id(row["source"])
            or row["error_code"] in (EmptyFile.error_code, SourceChanged.error_code))


def retire_documents(output: str, retirement: Retirement) -> None:
    """Take the documents of ``retirement`` out of ``output``: their export files, then their rows. It is written
    down first (:data:`RETIRING`), and a run killed part way is finished by the next start
    (:func:`recover_output`), whatever that run reads."""
    if not retirement.doc_ids:
        return
    filesystem, root = resolve_filesystem(output)
    partial = f"{root}/{STAGING_DIR}/{RETIRING}"
    with writing(f"{root}/{RETIRING}"):
        with filesystem.open_output_stream(partial) as stream:
            stream.write(json.dumps([sorted(retirement.dependents), sorted(retirement.failed)]).encode())
        move_into_place(filesystem, partial, f"{root}/{RETIRING}")
    _retire(filesystem, root)


def _pending_retirement(filesystem: pafs.FileSystem, root: str) -> list[set[str]]:
    """The waves of doc_ids a run wrote down to retire and may not have finished (:func:`retire_documents`)."""
    try:
        with filesystem.open_input_stream(f"{root}/{RETIRING}") as stream:
            return [set(wave) for wave in json.loads(stream.read())]
    except FileNotFoundError:
        return []


def _retire(filesystem: pafs.FileSystem, root: str) -> None:
    """Each wave out of every part that holds it: the documents' export files, then each part rewritten under its
    own name and renamed over itself, pages part first (every other document stays published throughout); a part
    left empty is removed, documents first. Every step can be done again, so a kill anywhere is finished by
    running this again."""
    for wave in _pending_retirement(filesystem, root):
        retired = pa.array(sorted(wave), pa.string())
        pages = _list_parts(filesystem, f"{root}/{PAGES_DIR}")
        for name, path in _list_parts(filesystem, f"{root}/{DOCUMENTS_DIR}").items():
            if name not in pages:
                continue
            documents = _read_part(filesystem, path)
            leaving = pc.is_in(documents.column("doc_id"), retired)
            if not pc.any(leaving).as_py():
                continue
            with writing(f"{root}/{DOCUMENTS_DIR}/{name}"):
                for document in documents.filter(leaving).to_pylist():
                    remove_other_exports(document, (), f"{root}/{EXPORTS_DIR}", filesystem)
                staying = documents.filter(pc.invert(leaving))
                if len(staying) == 0:
                    filesystem.delete_file(path)
                    filesystem.delete_file(pages[name])
                    continue
                page_rows = _read_part(filesystem, pages[name])
                for table, final in ((page_rows.filter(pc.invert(pc.is_in(page_rows.column("doc_id"), retired))),
                                      pages[name]), (staying, path)):
                    staged = f"{root}/{STAGING_DIR}/retired-{final.rsplit('/', 2)[-2]}-{name}"
                    pq.write_table(table, staged, filesystem=filesystem)
                    move_into_place(filesystem, staged, final)
    filesystem.delete_file(f"{root}/{RETIRING}")


def export_document(outcome: DocumentRecord, pages: pa.Table, output: str, exports: Sequence[str], pdfa: bool,
                    rasterize: RasterizeConfig) -> DocumentRecord:
    """Write a complete document's export files (``pages``: its ``pages`` rows) to ``output``; run where the sink's
    exporter puts it (a Ray task, on any node: the output is on storage they all reach) while the job reads on.
    The rows come as Arrow and become Python objects here, off the driver, which had spent 10 ms a page on that.
    Returns the document's record: as given, or failed for its exports. An output that cannot be written stops
    the job (:func:`operators.storage.writing`), and so does the temporary folder running out of space while they
    are made. A source changed since its pages were read (the searchable PDF and METS read it again) fails this
    document as ``source_changed``, any other failure (a file a PDF library cannot embed, say) as
    ``export_failed``; either way what it had exported is removed, and its text stays in the tables."""
    filesystem, root = resolve_filesystem(output)
    document, folder = asdict(outcome), f"{root}/{EXPORTS_DIR}"
    stamp = (outcome.source_size, outcome.source_mtime_ns)
    try:
        if None not in stamp:
            check_unchanged(outcome.source, stamp)
        write_exports(pages.to_pylist(), document, exports, folder, filesystem, pdfa=pdfa,
                      staging=f"{root}/{STAGING_DIR}", rasterize=rasterize)
        if None not in stamp:
            check_unchanged(outcome.source, stamp)
    except WriteFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - one document's exports never end the job
        if (full := scratch_space_full(exc, f"making the exports of {outcome.source}")) is not None:
            raise full from exc
        if not isinstance(exc, SourceChanged) and None not in stamp:  # the file gone or replaced under a renderer
            try:
                check_unchanged(outcome.source, stamp)
            except DocumentError as found:
                exc = found if isinstance(found, SourceChanged) else exc
        _take_out_exports(document, folder, filesystem)  # none half written, none of another file
        return _export_failed(outcome, exc)
    return outcome


def _take_out_exports(document: dict, folder: str, filesystem: pafs.FileSystem) -> None:
    """Remove what a document's failed exports wrote to ``folder``."""
    with writing(f"the exports of {document['source']} in {folder}"):
        remove_other_exports(document, (), folder, filesystem)


def _export_failed(outcome: DocumentRecord, exc: Exception) -> DocumentRecord:
    """The document failed for its exports, with their reason: a source changed since it was read as
    ``source_changed``, anything else as ``export_failed``; a document failed before keeps its own code."""
    reason = f"exports not written: {exc if isinstance(exc, SourceChanged) else f'{type(exc).__name__}: {exc}'}"
    if outcome.status == "failed":
        return replace(outcome, error_message=f"{outcome.error_message}; {reason}", exports=())
    code = SourceChanged.error_code if isinstance(exc, SourceChanged) else EXPORT_FAILED
    return replace(outcome, status="failed", error_code=code, error_message=reason, exports=())


@dataclass
class WriteSummary:
    documents_ok: int = 0
    documents_failed: int = 0
    documents_duplicate: int = 0
    pages: int = 0
    pages_failed: int = 0
    lines: int = 0


@dataclass(frozen=True)
class _RunningExport:
    future: futures.Future[DocumentRecord]  # of :func:`export_document`
    outcome: DocumentRecord  # as it stands without its exports
    pages: list[HeldPage]
    rows: pa.Table


class _InlineExecutor(futures.Executor):
    """Runs what it is given at once, in the caller: the sink's exports where no job hands it an executor."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        future: futures.Future = futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed back through the future, as any executor does
            future.set_exception(exc)
        return future


@dataclass
class _PendingDocument:
    record: DocumentRecord
    expected: int  # pages to wait for: the selected ones (``rasterize.pages``), else all
    pages: dict[int, HeldPage] = field(default_factory=dict)


@dataclass(frozen=True)
class HeldPage:
    """A page the sink holds until its document is complete and published: its row as Arrow, and what the document's
    outcome and counts need. A page of 60 lines had been held as its line records, then as a dict row beside them too:
    840 KB where its Arrow row takes 57 KB (a 3,000-page register had taken 3 GB in the driver)."""

    page: int
    status: str
    error_code: str | None
    error_message: str | None
    lines: int
    seconds: float
    row: pa.Table

    @classmethod
    def of(cls, work: PageWork) -> "HeldPage":
        return cls(work.page, work.status, work.error_code, work.error_message, len(work.lines), work.seconds,
                   pa.Table.from_pylist([page_row(work)], schema=PAGES_SCHEMA))


#: Called with a document and its pages when it is complete (progress).
DocumentListener = Callable[[DocumentRecord, list[HeldPage]], None]


@dataclass(frozen=True)
class PagesRead:
    """What a published document's pages came to, told once its row is in the output (``--log-json``): all that
    is kept of them until then besides their rows (their line records had been held too, twice a page's rows)."""

    pages: int
    lines: int
    seconds: float

    @classmethod
    def of(cls, pages: list[HeldPage]) -> "PagesRead":
        return cls(len(pages), sum(page.lines for page in pages), sum(page.seconds for page in pages))


#: Called with a document and what its pages came to once its row is published (``--log-json``: a record there
#: means the document is in the output).
PublishedListener = Callable[[DocumentRecord, PagesRead], None]
#: A complete document as it waits for the next part: its row, its pages rows (None: none) and :class:`PagesRead`.
ReadyDocument = tuple[DocumentRecord, "pa.Table | None", PagesRead]


def _document_outcome(record: DocumentRecord, pages: list[HeldPage]) -> DocumentRecord:
    """Failed where a page failed, under the first failed page's code; ``source_changed`` where any page found the
    file changed, since the next run's reading of it replaces this row (:func:`_of_no_bytes`): a damaged first page
    had hidden it, and the row had stayed beside that reading."""
    failed = [page for page in pages if page.status == "failed"]
    if record.status == "failed" or not failed:
        return record
    first = next((page for page in failed if page.error_code == SourceChanged.error_code), failed[0])
    message = f"{len(failed)} of {len(pages)} pages failed; page {first.page}: {first.error_message}"
    return replace(record, status="failed", error_code=first.error_code, error_message=message)


class ParquetSink:
    """Collects page results as they stream in and publishes complete documents."""

    def __init__(self, output: str, rows_per_file: int, exports: Sequence[str] = (), pdfa: bool = False,
                 listener: DocumentListener | None = None, on_published: PublishedListener | None = None,
                 publish_every_s: float = float("inf"), rasterize: RasterizeConfig = RasterizeConfig(),
                 exporter: Executor | None = None, exports_in_flight: int = 4):
        self.filesystem, self.root = resolve_filesystem(output)
        self.output = output if is_uri(output) else self.root  # absolute, for workers whatever their folder
        self.rows_per_file = rows_per_file
        self.publish_every_s = publish_every_s  # a run stopped then keeps what it finished up to that long ago
        self._last_published = time.monotonic()
        self.exports = tuple(exports)
        self._formats_written = tuple(sorted(formats_written(self.exports)))  # each document's exports column
        self.pdfa = pdfa
        self.rasterize = rasterize  # the job's: the searchable PDF and METS read the source again under it
        self.exporter = exporter or _InlineExecutor()  # the job's runs each document's exports as a Ray task
        # at most this many documents wait for their exports: held in memory and unpublished, they had piled up
        # without end where exports are slower than reading (PDF/A, METS), to be lost by a killed run
        self.exports_in_flight = exports_in_flight
        self.listener = listener
        self.on_published = on_published
        self.run_id = uuid.uuid4().hex[:12]
        self.summary = WriteSummary()
        self._pending: dict[tuple[str, str], _PendingDocument] = {}
        # complete documents with their pages rows, for the next part: one list, added to in one step, so that a stop
        # (Ctrl-C, SIGTERM) landing mid-way cannot publish a document without its pages, nor pages without it. Up to
        # parquet_rows_per_file rows wait here (publish_every_s), as Arrow (:class:`HeldPage`)
        self._ready: list[ReadyDocument] = []
        self._ready_rows = 0  # pages rows in _ready
        self._unannounced: list[ReadyDocument] = []  # published, not yet told
        self._publishing: tuple[str, list[ReadyDocument]] | None = None
        self._exporting: set[str] = set()  # doc_ids with an EXPORTING note
        self._exports_running: dict[str, _RunningExport] = {}  # by doc_id, in the order they were handed out
        self._reading: set[str] = set()  # doc_ids of the pending documents
        self._held: dict[str, list[DocumentRecord]] = {}  # duplicates by the doc_id of the document they name
        self._parts = 0
        with writing(output):
            for folder in (PAGES_DIR, DOCUMENTS_DIR, STAGING_DIR):
                self.filesystem.create_dir(f"{self.root}/{folder}", recursive=True)
        self._exports_found = self.filesystem.get_file_info(f"{self.root}/{EXPORTS_DIR}").type != pafs.FileType.NotFound

    def expect(self, record: DocumentRecord, pages: int | None = None) -> None:
        """Announce a document and the number of its pages to wait for (default: all of them); one with
        no pages to wait for is complete at once."""
        expected = record.num_pages if pages is None else pages
        if expected == 0 or record.status != "ok":
            self._complete(record, [])
        else:
            self._pending[(record.doc_id, record.source)] = _PendingDocument(record, expected)
            self._reading.add(record.doc_id)
        self.collect_exports()

    def add_page(self, work: PageWork) -> None:
        pending = self._pending[(work.doc_id, work.source)]
        if work.page in pending.pages:
            raise RuntimeError(f"page {work.page} of {work.source} arrived twice")
        pending.pages[work.page] = HeldPage.of(work)
        if len(pending.pages) == pending.expected:
            del self._pending[(work.doc_id, work.source)]
            self._complete(pending.record, [pending.pages[n] for n in sorted(pending.pages)])
        self.collect_exports()

    def _complete(self, record: DocumentRecord, pages: list[HeldPage]) -> None:
        rows = pa.concat_tables([page.row for page in pages]) if pages else None
        outcome = replace(_document_outcome(record, pages), exports=self._formats_written if pages else None)
        if self.exports and rows is not None:  # before the documents row is published: a rerun rewrites them whole
            self._start_export(outcome, pages, rows)
            return
        if rows is not None and self._exports_found:  # an unfinished earlier run's exports of it, not written now
            with writing(f"the exports of {outcome.source} in {self.root}/{EXPORTS_DIR}"):
                remove_other_exports(asdict(outcome), (), f"{self.root}/{EXPORTS_DIR}", self.filesystem)
        self._finish(outcome, pages, rows)

    def _finish(self, outcome: DocumentRecord, pages: list[HeldPage], rows: pa.Table | None) -> None:
        """The document is complete, its exports written: hold it for the next part, with the duplicates that
        waited for it."""
        self._reading.discard(outcome.doc_id)
        # a duplicate waits for the document it names: published first, it had pointed at nothing for as long as
        # that one was read (and exported), and for good when the run was killed meanwhile
        if outcome.duplicate_of in self._reading:  # a duplicate: no pages of its own
            self._held.setdefault(outcome.duplicate_of, []).append(outcome)
        else:
            released = self._held.pop(outcome.doc_id, [])
            self._ready += [(outcome, rows, PagesRead.of(pages)),
                            *((duplicate, None, PagesRead.of([])) for duplicate in released)]
            self._ready_rows += len(pages)
        summary = self.summary
        summary.documents_ok += outcome.status == "ok"
        summary.documents_failed += outcome.status == "failed"
        summary.documents_duplicate += outcome.status == "duplicate"
        summary.pages += len(pages)
        summary.pages_failed += sum(page.status == "failed" for page in pages)
        summary.lines += sum(page.lines for page in pages)
        if self.listener is not None:
            self.listener(outcome, pages)
        if (self._ready_rows >= self.rows_per_file or len(self._ready) >= self.rows_per_file
                or time.monotonic() - self._last_published >= self.publish_every_s):
            self.flush()

    def _start_export(self, outcome: DocumentRecord, pages: list[HeldPage], rows: pa.Table) -> None:
        """Note the document's exports in ``_staging/`` (what a rerun takes out if its row never comes), then hand
        :func:`export_document` to the exporter; the document is finished once they are written."""
        note = self._exporting_note(outcome.doc_id)
        with writing(f"{self.root}/{STAGING_DIR}"):  # whole or not at all: a rerun reads it
            with self.filesystem.open_output_stream(f"{note}.part") as stream:
                stream.write(json.dumps({"doc_id": outcome.doc_id, "source": outcome.source,
                                         "num_pages": outcome.num_pages}).encode())
            move_into_place(self.filesystem, f"{note}.part", note)
        self._exporting.add(outcome.doc_id)
        while len(self._exports_running) >= self.exports_in_flight:
            self.collect_exports(block=True)
        future = self.exporter.submit(export_document, outcome, rows, self.output, self.exports, self.pdfa,
                                      self.rasterize)
        self._exports_running[outcome.doc_id] = _RunningExport(future, outcome, pages, rows)

    def collect_exports(self, block: bool = False) -> None:
        """Finish the documents whose exports are written (with ``block``, once one is, or ``publish_every_s`` has
        passed). An export that could not run to its end (its worker killed: out of memory, a node lost) fails its
        document as ``export_failed``, its files removed; one that could not write stops the job."""
        if block and self._exports_running:
            futures.wait([running.future for running in self._exports_running.values()],
                         timeout=None if self.publish_every_s == float("inf") else self.publish_every_s,
                         return_when=futures.FIRST_COMPLETED)
        for doc_id, running in list(self._exports_running.items()):
            if not running.future.done():
                continue
            del self._exports_running[doc_id]
            try:
                outcome = running.future.result()
            except WriteFailed:
                raise
            except Exception as exc:  # noqa: BLE001 - one document's exports never end the job
                _take_out_exports(asdict(running.outcome), f"{self.root}/{EXPORTS_DIR}", self.filesystem)
                outcome = _export_failed(running.outcome, exc)
            self._finish(outcome, running.pages, running.rows)

    def finish_exports(self) -> None:
        """Wait for every document's exports, publishing the documents as they are written (``publish_every_s``,
        ``rows_per_file``)."""
        while self._exports_running:
            self.collect_exports(block=True)
            if time.monotonic() - self._last_published >= self.publish_every_s:
                self.flush()

    def _exporting_note(self, doc_id: str) -> str:
        return f"{self.root}/{STAGING_DIR}/{EXPORTING.format(doc_id=doc_id)}"

    def _publish(self, table: pa.Table, folder: str, name: str) -> None:
        staged = f"{self.root}/{STAGING_DIR}/{folder}-{name}"
        with writing(staged):
            pq.write_table(table, staged, filesystem=self.filesystem)
            move_into_place(self.filesystem, staged, f"{self.root}/{folder}/{name}")

    def flush(self) -> None:
        """Publish the complete documents held so far (also what a stopped run does before it ends)."""
        self._last_published = time.monotonic()
        if self._publishing is not None:  # a flush stopped (Ctrl-C, SIGTERM) as it published: did its part go in?
            name, ready = self._publishing
            part = f"{self.root}/{DOCUMENTS_DIR}/{name}"
            with writing(part):
                published = self.filesystem.get_file_info(part).type == pafs.FileType.File
            self._unannounced, self._publishing = self._unannounced + (ready if published else []), None
        self._announce()  # what a flush stopped half way had published without telling on_published
        if not self._ready:
            return
        name = f"part-{self.run_id}-{self._parts:05d}.parquet"
        self._parts += 1
        # taken off the sink first: a flush interrupted half way (Ctrl-C, SIGTERM) and flushed again must not
        # publish them twice; unpublished, they are read again by the next run
        ready, self._ready, self._ready_rows = self._ready, [], 0
        # a stop may land once the documents part is in place, before they are noted as published (the move takes
        # seconds on an object store): the next flush looks for the part
        self._publishing = (name, ready)
        documents = [record for record, _, _ in ready]
        tables = [table for _, table, _ in ready if table is not None]
        self._publish(pa.concat_tables(tables) if tables else PAGES_SCHEMA.empty_table(), PAGES_DIR, name)
        self._publish(pa.Table.from_pylist([asdict(record) for record in documents], schema=DOCUMENTS_SCHEMA),
                      DOCUMENTS_DIR, name)
        self._unannounced, self._publishing = self._unannounced + ready, None
        with writing(f"{self.root}/{STAGING_DIR}"):
            for record in documents:
                if record.doc_id in self._exporting:
                    self._exporting.discard(record.doc_id)
                    self.filesystem.delete_file(self._exporting_note(record.doc_id))
        self._announce()

    def _announce(self) -> None:
        """Tell on_published of each published document (``--log-json``): one stopped mid-way (Ctrl-C, SIGTERM) is
        told by the stopped run's last flush; one stopped as it was told (its line written, not yet noted) is told
        twice rather than never."""
        while self._unannounced:
            record, _, read = self._unannounced[0]
            if self.on_published is not None:
                self.on_published(record, read)
            del self._unannounced[0]

    def close(self) -> WriteSummary:
        """Flush; documents still waiting for pages mean pages were lost, which is a bug."""
        if self._pending:
            missing = {source: record.expected - len(record.pages)
                       for (_, source), record in self._pending.items()}
            raise RuntimeError(f"pages never arrived for {missing}")
        self.finish_exports()
        self.flush()
        _clear_staging(self.filesystem, self.root)
        return self.summary

