"""The Parquet sink: explicit schema, every document once, recovery after a killed run."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray.exceptions import OutOfMemoryError

from operators.errors import ConfigError, OutputLocked, OutputNotWritable, WriteFailed
from operators.formats.export import export_stem, write_exports
from operators.ingest import duplicate_id, mark_duplicates, source_id, source_stamp, triage
from operators.write import (
    DOCUMENTS_DIR,
    EXPORTS_DIR,
    LOCK_FILE,
    PAGES_DIR,
    RETIRING,
    STAGING_DIR,
    PagesRead,
    ParquetSink,
    check_output_is_ours,
    check_output_writable,
    output_lock,
    page_row,
    page_text,
    published_documents,
    recover_output,
    retire_documents,
)
from operators.settings import RasterizeConfig
from operators.storage import _is_the_file_named
from operators.records import DOCUMENTS_SCHEMA, PAGES_SCHEMA, DocumentRecord, LineRecord, PageWork
from pipeline.job import RayTaskExecutor


def _document(doc_id: str, pages: int, status="ok", error_code=None) -> DocumentRecord:
    return DocumentRecord(doc_id, f"{doc_id}.pdf", status, error_code, "broken" if error_code else None, pages)


def _page(doc_id: str, number: int, texts=("first", "second")) -> PageWork:
    lines = [LineRecord(bbox=(0, 10 * i, 50, 10 * i + 8), polygon=[(0, 10 * i), (50, 10 * i), (50, 10 * i + 8),
                                                                     (0, 10 * i + 8)],
                        baseline=[(0, 10 * i + 6), (50, 10 * i + 6)], block=0, order=i, text=text, confidence=0.9) for i, text in enumerate(texts)]
    return PageWork(doc_id=doc_id, source=f"{doc_id}.pdf", page=number, dpi=300, width=100, height=100, lines=lines)


def _read(output, folder):
    return ds.dataset(f"{output}/{folder}", format="parquet").to_table()


def _write_a_and_g_with_a_failed_page(output: Path, exports: tuple[str, ...]) -> None:
    """Document a, whole, and document g, failed by its second page: a run's output for --retry-failed to retire."""
    sink = ParquetSink(str(output), rows_per_file=100, exports=exports)
    sink.expect(_document("a", 1))
    sink.add_page(_page("a", 1))
    sink.expect(_document("g", 2))
    sink.add_page(_page("g", 1))
    sink.add_page(_page("g", 2).fail("render_failed", "cut off"))
    sink.close()


def test_documents_and_pages_with_the_explicit_schema(tmp_path):
    sink = ParquetSink(str(tmp_path), rows_per_file=100)
    sink.expect(_document("a", 2))
    sink.expect(_document("bad", 0, status="failed", error_code="corrupt_file"))
    sink.add_page(_page("a", 2))
    sink.add_page(_page("a", 1))
    summary = sink.close()
    assert (summary.documents_ok, summary.documents_failed, summary.pages, summary.lines) == (1, 1, 2, 4)
    pages, documents = _read(tmp_path, PAGES_DIR), _read(tmp_path, DOCUMENTS_DIR)
    assert pages.schema.equals(PAGES_SCHEMA) and documents.schema.equals(DOCUMENTS_SCHEMA)
    assert sorted(pages.column("page").to_pylist()) == [1, 2]
    assert pages.column("text").to_pylist()[0] == "first\nsecond"
    rows = {row["doc_id"]: row for row in documents.to_pylist()}
    assert rows["bad"]["error_code"] == "corrupt_file" and rows["a"]["num_pages"] == 2


def test_a_failed_page_fails_its_document_but_keeps_the_others(tmp_path):
    sink = ParquetSink(str(tmp_path), rows_per_file=100)
    sink.expect(_document("a", 2))
    sink.add_page(_page("a", 1))
    sink.add_page(_page("a", 2).fail("render_timeout", "poppler hung"))
    sink.close()
    (document,) = _read(tmp_path, DOCUMENTS_DIR).to_pylist()
    assert document["status"] == "failed" and document["error_code"] == "render_timeout"
    assert "1 of 2 pages failed" in document["error_message"]
    assert sorted(_read(tmp_path, PAGES_DIR).column("status").to_pylist()) == ["failed", "ok"]


def test_page_twice_and_missing_pages_are_bugs(tmp_path):
    sink = ParquetSink(str(tmp_path), rows_per_file=100)
    sink.expect(_document("a", 3))
    sink.add_page(_page("a", 1))
    with pytest.raises(RuntimeError, match="twice"):
        sink.add_page(_page("a", 1))
    with pytest.raises(RuntimeError, match="never arrived"):
        sink.close()


def test_documents_are_published_whole_in_small_parts(tmp_path):
    sink = ParquetSink(str(tmp_path), rows_per_file=2)
    for name in "abcde":
        sink.expect(_document(name, 1))
        sink.add_page(_page(name, 1))
    sink.close()
    assert len(list((tmp_path / PAGES_DIR).iterdir())) == len(list((tmp_path / DOCUMENTS_DIR).iterdir())) == 3
    assert sorted(_read(tmp_path, DOCUMENTS_DIR).column("doc_id").to_pylist()) == list("abcde")
    assert list((tmp_path / "_staging").iterdir()) == []


def test_recover_removes_orphan_pages_and_reports_done_documents(tmp_path):
    sink = ParquetSink(str(tmp_path), rows_per_file=1)
    sink.expect(_document("a", 1))
    sink.add_page(_page("a", 1))
    sink.close()
    # a run killed between publishing a pages part and its documents twin
    orphan = tmp_path / PAGES_DIR / "part-00000000dead-00000.parquet"
    orphan.write_bytes((tmp_path / PAGES_DIR).glob("*.parquet").__next__().read_bytes())
    (tmp_path / "_staging" / "pages-part-00000000dead-00001.parquet").write_bytes(b"PAR1 garbage")
    assert recover_output(str(tmp_path)).sources() == {"a": "a.pdf"}
    assert not orphan.exists()
    assert list((tmp_path / "_staging").iterdir()) == []


def test_recover_redoes_documents_whose_pages_part_is_lost_and_names_a_damaged_part(tmp_path):
    sink = ParquetSink(str(tmp_path), rows_per_file=1)
    for doc_id in ("a", "b"):
        sink.expect(_document(doc_id, 1))
        sink.add_page(_page(doc_id, 1))
    sink.close()
    first, second = sorted((tmp_path / PAGES_DIR).glob("*.parquet"))
    first.unlink()  # its documents part alone would stand for a document done, without its page
    assert len(published_documents(str(tmp_path)).sources()) == 1  # what a dry run reads, before a run removes it
    done = recover_output(str(tmp_path)).sources()
    assert len(done) == 1 and len(list((tmp_path / DOCUMENTS_DIR).glob("*.parquet"))) == 1
    second.write_bytes(b"not parquet")
    with pytest.raises(OutputNotWritable, match=f"the output part {second} is not a Parquet file"):
        recover_output(str(tmp_path))


def test_what_recover_takes_out_no_reader_counts_so_a_run_reads_the_documents_once(tmp_path):
    """A run reads the published documents before it starts Ray (to find whether it has anything to read), then hands
    them to recover_output, which reads them no more: nothing recover takes out may have been counted by
    published_documents, whatever a killed run left."""
    sink = ParquetSink(str(tmp_path), rows_per_file=1)
    for doc_id in ("a", "b", "c"):
        sink.expect(_document(doc_id, 1))
        sink.add_page(_page(doc_id, 1))
    sink.close()
    parts = sorted((tmp_path / PAGES_DIR).glob("*.parquet"), key=lambda part: pq.read_table(part)["doc_id"][0].as_py())
    (tmp_path / PAGES_DIR / "part-00000000dead-00000.parquet").write_bytes(parts[0].read_bytes())  # no documents twin
    parts[1].unlink()  # b's documents part has lost its pages twin
    (tmp_path / RETIRING).write_text(json.dumps([[], ["c"]]))  # a retirement of c under way
    before = published_documents(str(tmp_path))
    assert sorted(before.sources()) == ["a"]
    assert recover_output(str(tmp_path), before) is before
    assert published_documents(str(tmp_path)).rows == before.rows
    assert not (tmp_path / RETIRING).exists() and len(list((tmp_path / PAGES_DIR).glob("*.parquet"))) == 1


def test_a_file_uri_output_is_locked_as_its_folder_is(tmp_path):
    with output_lock(str(tmp_path)):
        with pytest.raises(OutputLocked, match="another run is writing"), output_lock(f"file://{tmp_path}"):
            pass


def test_exports_that_fail_fail_their_document_not_the_job(tmp_path, monkeypatch):
    """A source no PDF library can read (here: a text file under a .pdf name) gets no searchable PDF; its
    document is failed with export_failed, its pages are still written, and the next document is fine."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.pdf").write_text("not a pdf")
    sink = ParquetSink(str(tmp_path / "out"), rows_per_file=100, exports=("alto", "pdf"))
    sink.expect(_document("a", 1))
    sink.add_page(_page("a", 1))
    sink.expect(_document("b", 0, status="failed", error_code="corrupt_file"))
    summary = sink.close()
    assert list((tmp_path / "out" / EXPORTS_DIR).iterdir()) == []  # its ALTO, written before, had stayed
    rows = {row["doc_id"]: row for row in _read(tmp_path / "out", DOCUMENTS_DIR).to_pylist()}
    assert rows["a"]["status"] == "failed" and rows["a"]["error_code"] == "export_failed"
    assert "exports not written" in rows["a"]["error_message"] and rows["b"]["error_code"] == "corrupt_file"
    assert _read(tmp_path / "out", PAGES_DIR).column("doc_id").to_pylist() == ["a"]
    assert summary.documents_failed == 2


@pytest.mark.parametrize("exports", [("txt",), ()])
def test_a_rerun_removes_what_an_unfinished_run_exported_of_a_document_it_writes_again(tmp_path, exports):
    """A killed run exported document "a" (both pages, four formats) and never published it; the rerun reads
    page 1 only, with other formats or none: only what the rerun writes may lie in exports/, since the rest
    could be another model's reading or pages the tables do not hold."""
    exports_dir = tmp_path / EXPORTS_DIR
    killed = write_exports([page_row(_page("a", 1)), page_row(_page("a", 2))], asdict(_document("a", 2)),
                           ["alto", "page", "hocr", "txt"], str(exports_dir))
    (exports_dir / "b-pdf.txt").write_text("another document's file, left alone")
    sink = ParquetSink(str(tmp_path), rows_per_file=100, exports=exports)
    sink.expect(_document("a", 2), pages=1)
    sink.add_page(_page("a", 1, texts=("rerun",)))
    sink.close()
    assert len(killed) == 6
    assert sorted(path.name for path in exports_dir.iterdir()) == ["a-a.txt"] * bool(exports) + ["b-pdf.txt"]
    if exports:
        assert (exports_dir / "a-a.txt").read_text() == "rerun\n"


def test_retrying_failed_documents_takes_out_their_rows_and_pages_and_keeps_every_other_document(tmp_path):
    """--retry-failed: the failed documents of the run's sources, and the duplicates pointing at them, leave
    the published parts; the documents beside them in the same parts stay, rows and pages."""
    sink = ParquetSink(str(tmp_path), rows_per_file=4)
    sink.expect(_document("a", 1))
    sink.add_page(_page("a", 1))
    sink.expect(_document("f", 0, status="failed", error_code="corrupt_file"))
    sink.expect(replace(_document("d", 0, status="duplicate"), duplicate_of="f"))
    sink.expect(_document("g", 2))  # a page failed: a failed document with a good page
    sink.add_page(_page("g", 1))
    sink.add_page(_page("g", 2).fail("render_failed", "cut off"))
    sink.expect(_document("h", 0, status="failed", error_code="render_timeout"))  # alone in the second part
    sink.close()
    everything = {f"{doc_id}.pdf": doc_id for doc_id in "afdgh"}  # each source with the doc_id of its bytes
    published = published_documents(str(tmp_path))
    assert published.failed_to_retry({"f.pdf": "f", "g.pdf": "g"}).doc_ids == {"g"}  # d.pdf, unread, would point at nothing
    assert published.failed_to_retry({"a.pdf": "a"}).doc_ids == set()
    retirement = published.failed_to_retry(everything)
    assert (retirement.dependents, retirement.failed) == ({"d"}, {"f", "g", "h"})
    # a folder that could not be listed, whose files this run reads: its row goes (it had stayed for good)
    folders = ParquetSink(str(tmp_path / "folders"), rows_per_file=4)
    folders.expect(DocumentRecord("box", "/scans/box", "failed", "unreadable", "cannot list the folder", 0))
    folders.close()
    assert published_documents(str(tmp_path / "folders")).failed_to_retry({"/scans/box/a.pdf": "a"}).doc_ids == {"box"}
    # any run: what was never read (a doc_id made from the path), read now under another doc_id, and the folder
    folders = ParquetSink(str(tmp_path / "plain"), rows_per_file=4)
    for name in ("/scans/box", "u.pdf", "v.pdf"):
        folders.expect(DocumentRecord(source_id(name), name, "failed", "unreadable", "network fault", 0))
    folders.expect(_document("f", 0, status="failed", error_code="corrupt_file"))
    folders.close()
    plain = published_documents(str(tmp_path / "plain")).failed_to_retry(
        {"/scans/box/a.pdf": "a", "u.pdf": "u", "v.pdf": source_id("v.pdf"), "f.pdf": "f2"}, every=False)
    assert plain.doc_ids == {source_id("/scans/box"), source_id("u.pdf")}  # v.pdf unreadable still, f.pdf's bytes failed
    retire_documents(str(tmp_path), retirement)
    assert len(list((tmp_path / DOCUMENTS_DIR).iterdir())) == len(list((tmp_path / PAGES_DIR).iterdir())) == 1
    assert recover_output(str(tmp_path)).sources() == {"a": "a.pdf"}
    assert [(row["doc_id"], row["page"]) for row in _read(tmp_path, PAGES_DIR).to_pylist()] == [("a", 1)]
    assert _read(tmp_path, DOCUMENTS_DIR).schema.equals(DOCUMENTS_SCHEMA)
    assert published_documents(str(tmp_path)).failed_to_retry(everything).doc_ids == set()


def test_a_row_of_a_file_that_changed_or_was_empty_is_replaced_by_the_next_reading_of_its_file_or_bytes(tmp_path):
    """A hot folder: a file renamed (or its folder) while a run read it had failed as source_changed under its bytes'
    doc_id, and the next run made the renamed file a duplicate of that row (its pages never read, exit 0, for good);
    a file caught empty as it was created, or changed, had kept that row beside the reading of its next bytes. Any run
    takes them out when it reads their file's new bytes, or a changed file's bytes under any name; a damaged page
    before the changed one no longer hides the change."""
    sink = ParquetSink(str(tmp_path), rows_per_file=100)
    sink.expect(_document("moved", 2))
    sink.add_page(_page("moved", 1).fail("render_failed", "cut off"))
    sink.add_page(_page("moved", 2).fail("source_changed", "moved.pdf was deleted or moved while the job read it"))
    sink.expect(_document("grown", 0, status="failed", error_code="source_changed"))
    sink.expect(_document("empty", 0, status="failed", error_code="empty_file"))
    sink.expect(_document("broken", 0, status="failed", error_code="corrupt_file"))
    sink.expect(DocumentRecord(duplicate_id("empty", "copy.pdf"), "copy.pdf", "failed", "empty_file", "empty", 0))
    sink.close()
    published = published_documents(str(tmp_path))
    assert {row["doc_id"]: row["error_code"] for row in published.rows}["moved"] == "source_changed"
    unchanged = {"empty.pdf": "empty", "copy.pdf": "empty", "broken.pdf": "broken"}
    assert published.failed_to_retry(unchanged, every=False).doc_ids == set()  # still empty: no row read again
    assert published.failed_to_retry({"grown.pdf": "grown"}, every=False).doc_ids == {"grown"}  # touched while read
    read_now = {"renamed.pdf": "moved", "grown.pdf": "g2", "empty.pdf": "e2", "copy.pdf": "empty", "broken.pdf": "b2"}
    assert published.failed_to_retry(read_now, every=False).doc_ids == {"moved", "grown", "empty",
                                                                        duplicate_id("empty", "copy.pdf")}


def test_a_failed_copy_outside_the_run_is_found_among_the_retried_documents_of_its_size(tmp_path):
    """A copy has its original's bytes, so its row is tried only against retried documents of its size (5,000
    failed rows outside a run, each tried against 5,000 retried, had taken 30 s); a row without a size, against
    every one."""
    sink = ParquetSink(str(tmp_path), rows_per_file=100)
    for index in range(3):
        sink.expect(replace(_document(f"x{index}", 0, status="failed", error_code="corrupt_file"),
                            source_size=100 + index, source_mtime_ns=1))
    sink.expect(DocumentRecord(duplicate_id("x1", "y.pdf"), "y.pdf", "failed", "corrupt_file", "broken", 0,
                               source_size=101, source_mtime_ns=1))
    sink.expect(DocumentRecord(duplicate_id("x2", "z.pdf"), "z.pdf", "failed", "corrupt_file", "broken", 0))
    sink.close()
    read_now = {f"x{index}.pdf": f"x{index}" for index in range(3)}
    assert published_documents(str(tmp_path)).failed_to_retry(read_now).doc_ids == {"x0"}  # y.pdf, z.pdf rest


def test_a_rerun_takes_unchanged_duplicates_of_written_documents_unread(tmp_path):
    """A copy of a document read well is known as that document's bytes, so a rerun marks it a duplicate again
    without hashing it (200 copies of a 10 MB scan had been read again at each rerun); a copy of a failed
    document, which --retry-failed may read again, is not."""
    sources = {name: tmp_path / f"{name}.pdf" for name in "abfg"}
    for path in sources.values():
        path.write_bytes(b"%PDF-1.4 the same bytes")
    stamps = {name: dict(zip(("source_size", "source_mtime_ns"), source_stamp(str(path))))
              for name, path in sources.items()}
    sink = ParquetSink(str(tmp_path / "out"), rows_per_file=100)
    sink.expect(replace(_document("a", 1), source=str(sources["a"]), **stamps["a"]))
    sink.add_page(replace(_page("a", 1), source=str(sources["a"])))
    sink.expect(replace(_document(duplicate_id("a", str(sources["b"])), 0, status="duplicate"), source=str(sources["b"]),
                        duplicate_of="a", **stamps["b"]))
    sink.expect(replace(_document("f", 0, status="failed", error_code="render_failed"), source=str(sources["f"]),
                        **stamps["f"]))
    sink.expect(replace(_document(duplicate_id("f", str(sources["g"])), 0, status="duplicate"), source=str(sources["g"]),
                        duplicate_of="f", **stamps["g"]))
    sink.close()
    published = published_documents(str(tmp_path / "out"))
    known = published.known()
    assert {Path(source).name: document.doc_id for source, document in known.items()} == {"a.pdf": "a", "b.pdf": "a"}
    plans = [triage(str(sources[name]), RasterizeConfig(), known[str(sources[name])]) for name in "ab"]
    assert mark_duplicates(plans, published.sources()) == []  # both written already, neither read


def test_a_failed_document_records_the_size_its_copies_share(tmp_path):
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")
    plan = triage(str(tmp_path / "broken.pdf"), RasterizeConfig())
    assert plan.error is not None and plan.stamp == source_stamp(str(tmp_path / "broken.pdf"))


def test_a_failed_copy_rests_on_its_original_and_old_parts_without_the_newer_columns_are_read(tmp_path):
    """Two copies of a broken file: the second's row is a failed row of its own whose doc_id is made from the
    first's. Retiring the first alone would leave the copy's row resting on nothing, and a later run would write
    the copy a second row. Parts written before duplicate_of and pages_selected existed are read all the same."""
    sink = ParquetSink(str(tmp_path), rows_per_file=100)
    sink.expect(_document("x", 0, status="failed", error_code="corrupt_file"))
    copy_id = duplicate_id("x", "y.pdf")
    sink.expect(DocumentRecord(copy_id, "y.pdf", "failed", "corrupt_file", "cannot read y.pdf", 0))  # its own words
    sink.close()
    [part] = (tmp_path / DOCUMENTS_DIR).iterdir()
    pq.write_table(pq.read_table(part).drop_columns(["duplicate_of", "pages_selected"]), part)
    published = published_documents(str(tmp_path))
    assert published.failed_to_retry({"x.pdf": "x"}).doc_ids == set()  # y.pdf, not read, found all the same
    retirement = published.failed_to_retry({"x.pdf": "x", "y.pdf": "x"})  # y.pdf read: found by its bytes' doc_id
    assert (retirement.dependents, retirement.failed) == ({copy_id}, {"x"})


def test_a_retirement_cut_short_is_finished_at_the_next_start_and_counts_as_done_meanwhile(tmp_path):
    """A run killed while taking documents out (here: after the pages part was rewritten, before the documents
    part) had left a failed document without its good pages for good, unless the next run retried it too; the
    retired document's exports had stayed beside its new reading."""
    _write_a_and_g_with_a_failed_page(tmp_path, exports=("txt",))
    assert sorted(path.name for path in (tmp_path / EXPORTS_DIR).iterdir()) == ["a-a.txt", "g-g.txt"]
    # what retire_documents writes down before it starts, and the first of its renames
    (tmp_path / RETIRING).write_text(json.dumps([[], ["g"]]))
    [pages_part] = (tmp_path / PAGES_DIR).iterdir()
    pages = pq.read_table(pages_part)
    pq.write_table(pages.filter(pc.equal(pages.column("doc_id"), "a")), pages_part)
    assert published_documents(str(tmp_path)).sources() == {"a": "a.pdf"}  # the dry run's view: g is being taken out
    assert recover_output(str(tmp_path)).sources() == {"a": "a.pdf"}
    assert not (tmp_path / RETIRING).exists()
    assert [row["doc_id"] for row in _read(tmp_path, DOCUMENTS_DIR).to_pylist()] == ["a"]
    assert [path.name for path in (tmp_path / EXPORTS_DIR).iterdir()] == ["a-a.txt"]


def test_every_file_a_run_publishes_is_on_the_disk_before_its_name_is(tmp_path, names_synced):
    """ext4 and XFS may write a new file's data after its rename, so each part, export file and part rewritten by a
    retirement is fsynced under its staging name: a power cut could otherwise leave a published name on an empty
    file."""
    _write_a_and_g_with_a_failed_page(tmp_path, exports=("txt", "alto"))
    retire_documents(str(tmp_path), published_documents(str(tmp_path)).failed_to_retry({"g.pdf": "g"}))
    published = [path for folder in (PAGES_DIR, DOCUMENTS_DIR, EXPORTS_DIR) for path in (tmp_path / folder).iterdir()]
    assert sorted(path.suffix for path in published) == [".parquet", ".parquet", ".txt", ".xml"]
    staged = f"{tmp_path}/{STAGING_DIR}/"
    assert [path for path in published if not any(name.startswith(staged) for name in names_synced(path))] == []


def test_an_output_holding_files_of_others_is_refused_and_their_files_stay(tmp_path):
    """A run had deleted another tool's Parquet files in pages/ and documents/ (as parts without a twin) and
    everything under _staging/, with exit 0."""
    sink = ParquetSink(str(tmp_path), rows_per_file=100)
    sink.expect(_document("a", 1))
    sink.add_page(_page("a", 1))
    sink.close()
    (tmp_path / STAGING_DIR / "batch1").mkdir()
    (tmp_path / STAGING_DIR / "batch1" / "scan-0001.tif").write_bytes(b"keep")
    (tmp_path / STAGING_DIR / "pages-part-0123456789ab-00000.parquet").write_bytes(b"a killed run's")
    assert recover_output(str(tmp_path)).sources() == {"a": "a.pdf"}
    assert [path.name for path in (tmp_path / STAGING_DIR).iterdir()] == ["batch1"]
    pq.write_table(pa.table({"x": [1]}), tmp_path / PAGES_DIR / "page_scores_2023.parquet")

    def run_there(output: str) -> None:
        with output_lock(output):
            recover_output(output)

    for check in (run_there, check_output_is_ours):
        with pytest.raises(OutputNotWritable, match="pages holds 1 Parquet file\\(s\\) trocr-pipeline did not write "
                                                     "\\(page_scores_2023.parquet\\)"):
            check(str(tmp_path))
    assert len(list((tmp_path / PAGES_DIR).iterdir())) == 2
    # another tool's folder is refused before anything is written in it (it had been left with .lock and _staging/)
    theirs = tmp_path / "theirs"
    (theirs / PAGES_DIR).mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), theirs / PAGES_DIR / "scores.parquet")
    with pytest.raises(OutputNotWritable, match="did not write"):
        run_there(str(theirs))
    assert sorted(path.name for path in theirs.iterdir()) == [PAGES_DIR]


def test_a_run_that_writes_nothing_leaves_nothing_behind(tmp_path):
    """A run refused after taking the output (the recognizers' CPUs or GPUs are checked once Ray has started), or
    stopped before its first part, had left the folder holding .lock and _staging/, which show and synth took for an
    output. A folder that was there stays; what a run wrote stays."""
    with pytest.raises(ConfigError, match="refused"):
        with output_lock(str(tmp_path / "new")):
            raise ConfigError("refused")
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt):  # stopped in triage: the sink has made its folders, empty
        with output_lock(str(tmp_path / "stopped")):
            ParquetSink(str(tmp_path / "stopped"), rows_per_file=100)
            raise KeyboardInterrupt
    assert not (tmp_path / "stopped").exists()
    (tmp_path / "given").mkdir()
    with output_lock(str(tmp_path / "given")):
        pass
    assert list((tmp_path / "given").iterdir()) == []
    with output_lock(str(tmp_path / "written")):
        sink = ParquetSink(str(tmp_path / "written"), rows_per_file=100)
        sink.expect(_document("a", 1))
        sink.add_page(_page("a", 1))
        sink.close()
    assert {path.name for path in (tmp_path / "written").iterdir()} == {".lock", DOCUMENTS_DIR, PAGES_DIR, STAGING_DIR}


def test_a_lock_on_a_file_taken_out_of_the_folder_is_not_the_outputs_lock(tmp_path):
    """A run that wrote nothing takes out its lock file: a run that had opened it just before, and locked it once
    it was let go, had held a lock on a file no longer in the folder, beside a third run locking a new one."""
    path = tmp_path / LOCK_FILE
    with open(path, "a") as stale:
        assert _is_the_file_named(stale, str(path))
        path.unlink()
        assert not _is_the_file_named(stale, str(path))
        path.touch()
        assert not _is_the_file_named(stale, str(path))


def test_the_dry_run_finds_an_output_that_cannot_be_written_without_writing(tmp_path):
    (tmp_path / "report.pdf").write_bytes(b"a file")
    for output in (tmp_path / "report.pdf", tmp_path / "report.pdf" / "out"):
        with pytest.raises(OutputNotWritable, match="report.pdf is not a folder"):
            check_output_writable(str(output))
    check_output_writable(str(tmp_path / "new" / "out"))
    assert not (tmp_path / "new").exists()


def test_a_flush_cut_short_and_flushed_again_publishes_nothing_twice(tmp_path):
    """Ctrl-C or SIGTERM inside a flush, then the flush at the interrupt: the same documents had been published as
    a second part (here the documents rename fails after the pages part is in place)."""
    sink = ParquetSink(str(tmp_path), rows_per_file=100)
    sink.expect(_document("a", 1))
    sink.add_page(_page("a", 1))
    (tmp_path / DOCUMENTS_DIR).rmdir()
    (tmp_path / DOCUMENTS_DIR).write_text("in the way")
    with pytest.raises(WriteFailed):
        sink.flush()
    (tmp_path / DOCUMENTS_DIR).unlink()
    (tmp_path / DOCUMENTS_DIR).mkdir()
    sink.flush()
    assert list((tmp_path / DOCUMENTS_DIR).iterdir()) == [] and len(list((tmp_path / PAGES_DIR).iterdir())) == 1
    assert recover_output(str(tmp_path)).sources() == {}  # "a" is read again by the next run, once
    assert list((tmp_path / PAGES_DIR).iterdir()) == []


def test_finished_documents_are_published_at_least_every_publish_every_s(tmp_path):
    sink = ParquetSink(str(tmp_path), rows_per_file=100, publish_every_s=0.0)
    for doc_id in ("a", "b"):
        sink.expect(_document(doc_id, 1))
        sink.add_page(_page(doc_id, 1))
        assert doc_id in published_documents(str(tmp_path)).sources()  # not held back for 100 rows


def test_published_documents_are_announced_only_once_their_rows_are_written(tmp_path):
    """``--log-json`` hears of a document when its row is in the output, not when it is complete: a run
    killed in between and run again would otherwise log it twice."""
    completed, published = [], []
    sink = ParquetSink(str(tmp_path), rows_per_file=100, listener=lambda record, pages: completed.append(record.doc_id),
                       on_published=lambda record, read: published.append((record.doc_id, read.pages)))
    sink.expect(_document("a", 1))
    sink.add_page(_page("a", 1))
    assert completed == ["a"] and published == []
    assert not (tmp_path / DOCUMENTS_DIR).exists() or not list((tmp_path / DOCUMENTS_DIR).iterdir())
    sink.close()
    assert published == [("a", 1)]
    assert _read(tmp_path, DOCUMENTS_DIR).column("doc_id").to_pylist() == ["a"]


@pytest.mark.parametrize("waiting", ["for the document's last page", "for the next part"])
def test_pages_the_sink_holds_are_held_as_arrow_rows(tmp_path, waiting):
    """A document's pages wait for its last page, then up to parquet_rows_per_file rows for their part
    (publish_every_s). Held as line records, and then as dict rows beside them too, a page of 60 lines had taken 285
    KB, then 840 KB (a 3,000-page register 3 GB in the driver); as an Arrow row, 60 KB."""
    import gc
    import tracemalloc

    def page(doc_id: str, number: int) -> PageWork:
        outline = [(x, 0) for x in range(0, 1000, 50)] + [(x, 25) for x in range(1000, 0, -50)]
        lines = [LineRecord(bbox=(0, 30 * i, 1000, 30 * i + 25), polygon=[(x, y + 30 * i) for x, y in outline],
                            baseline=[(0, 30 * i + 20), (1000, 30 * i + 20)], block=0, order=i,
                            text="The quick brown fox jumps over the lazy dog again", confidence=0.9)
                 for i in range(60)]
        return PageWork(doc_id=doc_id, source=f"{doc_id}.pdf", page=number, dpi=300, width=2480, height=3508,
                        lines=lines)

    sink = ParquetSink(str(tmp_path), rows_per_file=10_000)
    sink.expect(_document("warm", 1))
    sink.add_page(page("warm", 1))  # what the sink imports, loaded
    if waiting == "for the document's last page":
        sink.expect(_document("register", 41))
    gc.collect()
    tracemalloc.start()
    arrow_before = pa.total_allocated_bytes()
    for index in range(40):
        if waiting == "for the next part":
            sink.expect(_document(f"d{index}", 1))
        sink.add_page(page("register", index + 1) if waiting == "for the document's last page" else page(f"d{index}", 1))
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - arrow_before
    tracemalloc.stop()
    assert held / 40 < 100_000, f"{held / 40 / 1000:.0f} KB a page held"
    if waiting == "for the document's last page":
        sink.add_page(page("register", 41))
    sink.close()
    assert _read(tmp_path, PAGES_DIR).num_rows == 1 + 40 + (waiting == "for the document's last page")


class _StoppedOnPublishing(ParquetSink):
    """A sink on which a stop (Ctrl-C, SIGTERM) lands once its first documents part is in place."""

    stopped = False

    def _publish(self, table: pa.Table, folder: str, name: str) -> None:
        super()._publish(table, folder, name)
        if folder == DOCUMENTS_DIR and not self.stopped:
            self.stopped = True
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop", ["as the part is published", "as b is announced"])
def test_documents_published_by_a_flush_stopped_half_way_are_each_announced_once(tmp_path, stop):
    """A stop (Ctrl-C, SIGTERM) landing once the documents part is in place (a move of seconds on an object store),
    or while its documents are announced: the stopped run's last flush announces the rest. They had had no
    ``--log-json`` line, and a rerun takes them as done and logs none either."""
    published, stopping_at = [], ["b"] if stop == "as b is announced" else []

    def announce(record: DocumentRecord, read: PagesRead) -> None:
        if record.doc_id in stopping_at:
            stopping_at.remove(record.doc_id)
            raise KeyboardInterrupt  # the stop, landing as b is told
        published.append((record.doc_id, read.pages))

    sink = (_StoppedOnPublishing if stop == "as the part is published" else ParquetSink)(
        str(tmp_path), rows_per_file=100, on_published=announce)
    for doc_id in ("a", "b", "c"):
        sink.expect(_document(doc_id, 1))
        sink.add_page(_page(doc_id, 1))
    with pytest.raises(KeyboardInterrupt):
        sink.flush()
    assert published == {"as the part is published": [], "as b is announced": [("a", 1)]}[stop]
    sink.flush()  # what the stopped job does before it ends
    assert published == [("a", 1), ("b", 1), ("c", 1)]
    assert _read(tmp_path, DOCUMENTS_DIR).column("doc_id").to_pylist() == ["a", "b", "c"]


def test_page_text_leaves_out_lines_without_text_and_marks_blocks_with_one_blank_line():
    def line(order: int, block: int, text: str) -> LineRecord:
        return LineRecord(bbox=(0, 10 * order, 50, 10 * order + 8), polygon=[], baseline=[], block=block, order=order,
                          text=text)

    lines = [line(3, 1, ""), line(0, 0, "first"), line(2, 1, ""), line(4, 1, "third"), line(1, 0, "second"),
             line(5, 2, "")]
    assert page_text(lines) == "first\nsecond\n\nthird"
    assert page_text([line(0, 0, ""), line(1, 1, "")]) == ""


def _scanned_document(folder, name: str) -> tuple[DocumentRecord, PageWork]:
    """A real one-page PNG and the records of its reading, with the size and modification time triage takes."""
    source = folder / name
    Image.new("L", (100, 100), 255).save(source, dpi=(100, 100))
    stamp = source_stamp(str(source))
    document = DocumentRecord(name, str(source), "ok", None, None, 1, source_size=stamp[0], source_mtime_ns=stamp[1])
    page = replace(_page(name, 1), source=str(source), dpi=100)
    return document, page


@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_a_source_changed_before_its_exports_fails_as_source_changed_and_the_job_goes_on(tmp_path, change):
    """The searchable PDF and METS read the source again: a file replaced after its pages were read had got the
    other file's pixels under the old doc_id's text, exit 0; a file deleted had stopped the whole job (exit 7),
    blaming the output."""
    (tmp_path / "in").mkdir()
    sink = ParquetSink(str(tmp_path / "out"), rows_per_file=100, exports=("pdf", "mets"))
    for name in ("a.png", "b.png"):
        document, page = _scanned_document(tmp_path / "in", name)
        if name == "a.png" and change == "replaced":
            Image.new("L", (100, 30), 255).save(page.source)
        elif name == "a.png":
            Path(page.source).unlink()
        sink.expect(document)
        sink.add_page(page)
    sink.close()
    outcomes = {row["doc_id"]: row for row in _read(tmp_path / "out", DOCUMENTS_DIR).to_pylist()}
    assert (outcomes["a.png"]["status"], outcomes["a.png"]["error_code"]) == ("failed", "source_changed")
    assert outcomes["b.png"]["status"] == "ok"
    assert {path.name.split("-")[0] for path in (tmp_path / "out" / EXPORTS_DIR).iterdir()} == {"b"}


def test_the_temporary_folder_full_while_exports_are_made_stops_the_job_naming_it(tmp_path, small_disk):
    """A full TMPDIR (the searchable PDF's text layer is made there) had stopped the job saying the output disk,
    which had room, was full."""
    (small_disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024))
    document, page = _scanned_document(tmp_path, "a.png")
    sink = ParquetSink(str(tmp_path / "out"), rows_per_file=100, exports=("pdf",))
    sink.expect(document)
    tempfile.tempdir = str(small_disk)
    try:
        with pytest.raises(WriteFailed, match=f"no space left in the temporary folder {small_disk} while making the "
                                              "exports of"):
            sink.add_page(page)
    finally:
        tempfile.tempdir = None


@pytest.mark.parametrize("folder", [PAGES_DIR, EXPORTS_DIR])
def test_a_read_only_folder_inside_the_output_is_found_before_any_work(tmp_path, folder):
    """Only _staging/ had been tried: a read-only pages/ or exports/ (a mount, a permission) was found after all
    the work, with exit 7. Here a real read-only tmpfs is mounted on the folder."""
    mount = tmp_path / "out" / folder
    mount.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        with pytest.raises(OutputNotWritable, match=f"{mount}/.write-test"), output_lock(str(tmp_path / "out")):
            pass
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_exports_a_killed_run_wrote_for_a_document_it_never_published_are_taken_out(tmp_path):
    """A run killed after writing a document's exports and before publishing its row: a rerun writes them again
    under the same names, but when the source had changed or gone meanwhile they had stayed for good, an
    indexer's second version of the document beside the new one."""
    earlier = ParquetSink(str(tmp_path), rows_per_file=100, exports=("txt",))
    earlier.expect(_document("b", 1))
    earlier.add_page(_page("b", 1))
    earlier.close()
    killed = ParquetSink(str(tmp_path), rows_per_file=100, exports=("txt", "alto"))
    killed.expect(_document("a", 1))
    killed.add_page(_page("a", 1))  # exported, its row not yet published: then the run is killed
    assert sorted(path.name for path in (tmp_path / EXPORTS_DIR).iterdir()) == [
        "a-a.p0001.alto.xml", "a-a.txt", "b-b.txt"]
    assert set(recover_output(str(tmp_path)).sources()) == {"b"}
    assert sorted(path.name for path in (tmp_path / EXPORTS_DIR).iterdir()) == ["b-b.txt"]
    assert list((tmp_path / STAGING_DIR).iterdir()) == []


def test_a_duplicate_row_is_published_with_or_after_the_document_it_names(tmp_path):
    """Published at once (a triage result), the duplicate's row had pointed at nothing for as long as its
    document was read, and for good when the run was killed meanwhile."""
    sink = ParquetSink(str(tmp_path), rows_per_file=100, publish_every_s=0)
    sink.expect(_document("a", 1))
    sink.expect(replace(_document("d", 0, status="duplicate"), duplicate_of="a"))
    sink.flush()
    assert not list((tmp_path / DOCUMENTS_DIR).iterdir())
    sink.add_page(_page("a", 1))
    assert sorted(_read(tmp_path, DOCUMENTS_DIR).column("doc_id").to_pylist()) == ["a", "d"]
    assert sink.close().documents_duplicate == 1
    # a collection delivered twice: duplicates waiting in numbers had made each later document a part of its own
    sink = ParquetSink(str(tmp_path / "twice"), rows_per_file=100)
    for number in range(150):
        sink.expect(_document(f"a{number}", 1))
    for number in range(150):
        sink.expect(replace(_document(f"d{number}", 0, status="duplicate"), duplicate_of=f"a{number}"))
    for number in range(150):
        sink.add_page(_page(f"a{number}", 1))
    sink.close()
    assert len(list((tmp_path / "twice" / DOCUMENTS_DIR).iterdir())) == 3


@pytest.mark.parametrize("in_ray", [False, True], ids=["in the caller", "as a Ray task, as the job writes them"])
def test_an_export_is_never_seen_half_written_under_its_name(request, small_disk, in_ray):
    """Exports had been written in place: a reader could open one half written, and a run stopped by a full disk
    (or killed) left it so. Written by a Ray task, the error stops the job as itself, in one line (Ray wraps it in
    one that prints the task's traceback)."""
    exporter = None
    if in_ray:
        request.getfixturevalue("ray_local")
        exporter = RayTaskExecutor()
    sink = ParquetSink(str(small_disk), rows_per_file=100, exports=("txt",), exporter=exporter)
    sink.expect(_document("a", 1))
    with pytest.raises(WriteFailed) as stopped:
        sink.add_page(_page("a", 1, texts=("x" * 3_000_000,)))
        sink.close()
    assert type(stopped.value) is WriteFailed
    assert str(stopped.value) == (f"no space left on the device while writing the exports of a.pdf in {small_disk}/"
                                  f"{EXPORTS_DIR}; documents published so far are kept: free space and run the job "
                                  "again to finish the rest")
    assert not list((small_disk / EXPORTS_DIR).glob("a-*"))
    recover_output(str(small_disk))
    assert not [path.name for path in (small_disk / STAGING_DIR).iterdir()]


class _HeldExecutor(Executor):
    """Runs what it is given only when told to: a document's exports still being written (by a Ray task in a job)."""

    def __init__(self) -> None:
        self.held: list[tuple[Future, Callable[..., Any], tuple]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        self.held.append((Future(), fn, args))
        return self.held[-1][0]

    def run_held(self) -> None:
        for future, fn, args in self.held:
            future.set_result(fn(*args))
        self.held = []

    def fail_held(self, error: Exception) -> None:
        for future, _, _ in self.held:
            future.set_exception(error)
        self.held = []


def test_a_document_is_published_once_its_exports_are_written_and_its_duplicates_after_it(tmp_path):
    """The exports are written beside the job (Ray tasks): a document is held, its row unpublished, until its files
    are all there, and a duplicate naming it waits for it, announced before or after its pages came."""
    exporter = _HeldExecutor()
    sink = ParquetSink(str(tmp_path), rows_per_file=100, exports=("txt",), publish_every_s=0.0, exporter=exporter)
    sink.expect(_document("a", 1))
    sink.expect(replace(_document("d1", 1, status="duplicate"), duplicate_of="a"))
    sink.add_page(_page("a", 1))
    sink.expect(replace(_document("d2", 1, status="duplicate"), duplicate_of="a"))
    sink.expect(_document("b", 0))  # nothing to export: published at once
    sink.flush()
    assert published_documents(str(tmp_path)).sources() == {"b": "b.pdf"}
    assert not (tmp_path / EXPORTS_DIR).exists()
    exporter.run_held()
    sink.close()
    assert _read(tmp_path, DOCUMENTS_DIR).column("doc_id").to_pylist() == ["b", "a", "d1", "d2"]
    assert [path.suffix for path in (tmp_path / EXPORTS_DIR).iterdir()] == [".txt"]


class _SlowExecutor(ThreadPoolExecutor):
    """Exports that take a while, each in a thread of its own: notes how many were in flight at most."""

    def __init__(self) -> None:
        super().__init__(max_workers=8)
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        def slowly() -> Any:
            time.sleep(0.05)
            return fn(*args)

        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        future = super().submit(slowly)
        future.add_done_callback(lambda _: self._done())
        return future

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1


def test_documents_wait_for_their_exports_a_few_at_a_time(tmp_path):
    """Where exports are slower than reading (PDF/A, METS), every document read had been handed out at once: held in
    the driver's memory, unpublished (a killed run lost them all)."""
    with _SlowExecutor() as exporter:
        sink = ParquetSink(str(tmp_path), rows_per_file=100, exports=("txt",), exporter=exporter, exports_in_flight=2)
        for number in range(6):
            sink.expect(_document(f"d{number}", 1))
            sink.add_page(_page(f"d{number}", 1))
        sink.close()
    assert exporter.most_in_flight == 2
    assert sorted(_read(tmp_path, DOCUMENTS_DIR).column("doc_id").to_pylist()) == [f"d{n}" for n in range(6)]
    assert len(list((tmp_path / EXPORTS_DIR).iterdir())) == 6


def test_an_export_whose_worker_died_fails_its_document_and_the_job_goes_on(tmp_path):
    """A Ray task killed for memory or with its node returns Ray's error, not the document's record."""
    exporter = _HeldExecutor()
    sink = ParquetSink(str(tmp_path), rows_per_file=100, exports=("txt",), exporter=exporter)
    sink.expect(_document("a", 1))
    sink.add_page(_page("a", 1))
    (tmp_path / EXPORTS_DIR).mkdir()
    (tmp_path / EXPORTS_DIR / f"{export_stem(asdict(_document('a', 1)))}.txt").write_text("half")  # as it was killed
    exporter.fail_held(OutOfMemoryError("Task was killed due to the node running low on memory."))
    sink.expect(_document("b", 1))
    sink.add_page(_page("b", 1))
    exporter.run_held()
    sink.close()
    documents = {row["doc_id"]: row for row in _read(tmp_path, DOCUMENTS_DIR).to_pylist()}
    assert (documents["a"]["status"], documents["a"]["error_code"]) == ("failed", "export_failed")
    assert documents["a"]["error_message"] == ("exports not written: OutOfMemoryError: Task was killed due to the node "
                                               "running low on memory.")
    assert documents["b"]["status"] == "ok"
    assert [path.name.split("-")[0] for path in (tmp_path / EXPORTS_DIR).iterdir()] == ["b"]
    assert (documents["a"]["exports"], documents["b"]["exports"]) == ([], ["txt"])  # what a rerun's warning reads


def test_a_write_probe_a_killed_run_left_is_taken_out_by_the_next(tmp_path):
    """Each probe had a name of its own, so one left in exports/ by a run killed while probing stayed for good."""
    for folder in (EXPORTS_DIR, PAGES_DIR):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / ".write-test").write_bytes(b"")
    with output_lock(str(tmp_path)):
        assert not list((tmp_path / EXPORTS_DIR).iterdir()) and not list((tmp_path / PAGES_DIR).iterdir())


def test_a_disk_that_fills_as_a_document_s_exports_are_noted_leaves_an_output_the_next_run_recovers(small_disk):
    """The note of a document's exports had been written in place: a full disk (or a kill) left it empty, and
    every later run stopped at its start, reading it."""
    sink = ParquetSink(str(small_disk), rows_per_file=100, exports=("txt",))
    sink.expect(_document("a", 1))
    with open(small_disk / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:  # full
            pass
    with pytest.raises(WriteFailed, match="no space left"):
        sink.add_page(_page("a", 1))
    (small_disk / "filler").unlink()
    assert not recover_output(str(small_disk)).sources()
    assert not list((small_disk / STAGING_DIR).iterdir())
