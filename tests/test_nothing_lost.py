"""Nothing lost: the broken-file corpus (tests/corpus/README.md) through the real pipeline on Ray.

Every input ends as exactly one documents row with the documented outcome, every page as exactly
one pages row, and the good files among the broken ones are all processed.
"""

from __future__ import annotations

import os
from collections import Counter

import pyarrow.dataset as ds
import pytest

from corpus.build import EXPECTED, build_corpus
from pipeline.config import load_config
from pipeline.job import run_job


@pytest.fixture(scope="module")
def corpus_run(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    expected = build_corpus(folder)
    output = tmp_path_factory.mktemp("corpus-out")
    config = load_config(None, ["rasterize.dpi=100", "rasterize.render_timeout_s=5", "rasterize.pages_per_task=2",
                                "rasterize.max_page_pixels=250000000"])
    summary = run_job([str(folder)], str(output), config, mode="detect")
    documents = ds.dataset(f"{output}/documents", format="parquet").to_table().to_pylist()
    pages = ds.dataset(f"{output}/pages", format="parquet").to_table().to_pylist()
    return expected, summary, documents, pages


def test_every_input_is_one_documents_row(corpus_run):
    expected, _, documents, _ = corpus_run
    names = Counter(os.path.basename(row["source"]) for row in documents)
    assert names == Counter(expected.keys())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_documented_outcome(corpus_run, name):
    expected, _, documents, pages = corpus_run
    want = expected[name]
    (row,) = [r for r in documents if os.path.basename(r["source"]) == name]
    assert (row["status"], row["error_code"], row["repaired"]) == (want.status, want.error_code, want.repaired)
    if want.status == "failed":
        assert row["error_message"], "a failure always says why"
    mine = [p for p in pages if os.path.basename(p["source"]) == name]
    assert sorted(p["page"] for p in mine) == list(range(1, row["num_pages"] + 1)), "each page exactly once"
    statuses = Counter(p["status"] for p in mine)
    if want.pages_ok is not None:
        assert statuses["ok"] == want.pages_ok
    assert statuses["failed"] == want.pages_failed
    for page in mine:
        if page["status"] == "failed":
            assert page["error_code"] and page["error_message"]


def test_good_images_in_every_mode_have_their_lines(corpus_run):
    _, _, _, pages = corpus_run
    for name in ("cmyk.jpg", "gray16.png", "palette.png", "rgba.png", "bitonal.tif", "owner-password-only.pdf"):
        (page,) = [p for p in pages if os.path.basename(p["source"]) == name]
        assert len(page["lines"]) == 3, name


def test_blank_page_is_ok_with_no_lines(corpus_run):
    _, _, _, pages = corpus_run
    (page,) = [p for p in pages if os.path.basename(p["source"]) == "blank.pdf"]
    assert (page["status"], page["lines"], page["text"]) == ("ok", [], "")
