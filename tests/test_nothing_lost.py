"""Nothing lost: the broken-file corpus (tests/corpus/README.md) through the real pipeline on Ray.

Every input ends as exactly one documents row with the documented outcome, every page as exactly
one pages row, and the good files among the broken ones are all processed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pikepdf
import pyarrow.dataset as ds
import pytest

from conftest import text_page, write_pdf
from corpus.build import EXPECTED, LEFT_OUT, LONG_NAME, build_corpus
from pipeline.config import load_config
from pipeline.job import run_job


@pytest.fixture(scope="module")
def corpus_run(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    expected = build_corpus(folder)
    output = tmp_path_factory.mktemp("corpus-out")
    config = load_config(None, ["rasterize.dpi=100", "rasterize.render_timeout_s=5", "rasterize.pages_per_task=2",
                                "rasterize.max_page_pixels=250000000", "output.exports=[alto]"])
    summary = run_job([str(folder)], str(output), config, mode="detect")
    documents = ds.dataset(f"{output}/documents", format="parquet").to_table().to_pylist()
    pages = ds.dataset(f"{output}/pages", format="parquet").to_table().to_pylist()
    return expected, summary, documents, pages, output


def test_every_input_is_one_documents_row(corpus_run):
    expected, summary, documents, pages, _ = corpus_run
    names = Counter(os.path.basename(row["source"]) for row in documents)
    assert names == Counter(expected.keys())
    assert summary.left_out == LEFT_OUT, "what is no document is counted, never skipped without a word"
    assert len({row["doc_id"] for row in documents}) == len(documents), "doc_ids are unique"
    assert len({(page["doc_id"], page["page"]) for page in pages}) == len(pages), "no page written twice"


def test_same_bytes_under_two_names_is_a_duplicate_row_without_pages(corpus_run):
    expected, summary, documents, pages, _ = corpus_run
    rows = {os.path.basename(row["source"]): row for row in documents}
    for name, want in expected.items():
        if want.duplicate_of:
            original = rows[want.duplicate_of]
            assert rows[name]["duplicate_of"] == original["doc_id"] != rows[name]["doc_id"]
            assert rows[name]["num_pages"] == original["num_pages"]
            assert not [page for page in pages if page["doc_id"] == rows[name]["doc_id"]]
    assert summary.written.documents_duplicate == sum(1 for want in expected.values() if want.duplicate_of)


def test_long_names_are_exported_under_a_legal_name(corpus_run):
    *_, output = corpus_run
    (alto,) = [path for path in (output / "exports").iterdir() if path.name.startswith(LONG_NAME[:50])]
    assert len(alto.name.encode()) <= 255 and alto.name.endswith(".p0001.alto.xml")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_documented_outcome(corpus_run, name):
    expected, _, documents, pages, _ = corpus_run
    want = expected[name]
    (row,) = [r for r in documents if os.path.basename(r["source"]) == name]
    assert (row["status"], row["error_code"], row["repaired"]) == (want.status, want.error_code, want.repaired)
    if want.status == "failed":
        assert row["error_message"], "a failure always says why"
    mine = [p for p in pages if os.path.basename(p["source"]) == name]
    pages_written = 0 if want.duplicate_of else row["num_pages"]
    assert sorted(p["page"] for p in mine) == list(range(1, pages_written + 1)), "each page exactly once"
    statuses = Counter(p["status"] for p in mine)
    if want.pages_ok is not None:
        assert statuses["ok"] == want.pages_ok
    assert statuses["failed"] == want.pages_failed
    for page in mine:
        if page["status"] == "failed":
            assert page["error_code"] and page["error_message"]
        else:
            assert page["rotation"] == want.rotation
            assert want.lines is None or len(page["lines"]) == want.lines


def test_good_images_in_every_mode_have_their_lines(corpus_run):
    pages = corpus_run[3]
    for name in ("cmyk.jpg", "gray16.png", "palette.png", "rgba.png", "bitonal.tif", "owner-password-only.pdf"):
        (page,) = [p for p in pages if os.path.basename(p["source"]) == name]
        assert len(page["lines"]) == 3, name


def test_blank_page_is_ok_with_no_lines(corpus_run):
    pages = corpus_run[3]
    (page,) = [p for p in pages if os.path.basename(p["source"]) == "blank.pdf"]
    assert (page["status"], page["lines"], page["text"]) == ("ok", [], "")


def test_thousand_page_pdf_streams_through_in_bounded_memory(tmp_path, joining_ray_local):
    """1,000 pages rendered 50 at a time: every page comes out once, the driver stays small."""
    single = write_pdf(tmp_path / "one.pdf", [text_page(["A page of the thousand-page register",
                                                         "with a second line of text"],
                                                        size=(620, 877), font_px=14)], dpi=75)
    register = tmp_path / "register.pdf"
    with pikepdf.open(single) as pdf:
        for _ in range(999):
            pdf.pages.append(pdf.pages[0])
        pdf.save(register)
    output = tmp_path / "out"
    # the peak of this process's own memory (VmHWM): getrusage's ru_maxrss keeps, across exec, the resident size
    # of the test process it was spawned from, which other tests here leave large
    measured = (
        "import re, sys\n"
        "from pipeline.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('max_rss_kb', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", measured, "detect", str(register), "--output", str(output),
         "--set", "rasterize.dpi=50", "--set", "rasterize.pages_per_task=50",
         "--set", "rasterize.detect_orientation=false"],  # a third of each page's work, and beside the point here
        capture_output=True, text=True, timeout=900, env=joining_ray_local)
    assert result.returncode == 0, result.stderr[-3000:]
    pages = ds.dataset(f"{output}/pages", format="parquet").to_table(columns=["page", "status", "lines"])
    assert sorted(pages.column("page").to_pylist()) == list(range(1, 1001))
    assert set(pages.column("status").to_pylist()) == {"ok"}
    assert all(len(lines) == 2 for lines in pages.column("lines").to_pylist())
    max_rss_mb = int(result.stdout.split("max_rss_kb")[1].split()[0]) / 1024
    assert max_rss_mb < 1500, f"driver peaked at {max_rss_mb:.0f} MB"
