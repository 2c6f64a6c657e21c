"""Synthetic lines and documents: real fonts, real rendering, real files written to tmp_path."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pdf2image import convert_from_path
from PIL import Image, ImageSequence

from operators.errors import ExitCode
from pipeline.synth.corpus import CHARSET, ENGLISH_CHARSET, LANGUAGES, CorpusSampler, cut_at_word
from pipeline.synth.docs import load_ground_truth, write_document_set
from pipeline.synth.fonts import REQUIRED_CHARS, FontsNotFound, discover_fonts, load_font, missing_chars
from pipeline.synth.lines import MANIFEST_HEADER, iter_lines, write_line_set


# --- fonts -----------------------------------------------------------------------------------

def test_font_discovery_finds_printed_and_handwritten_faces():
    printed, handwritten, every = discover_fonts("printed"), discover_fonts("handwritten"), discover_fonts("all")
    assert {f.kind for f in printed} == {"printed"} and {f.kind for f in handwritten} == {"handwritten"}
    assert set(every) == set(printed) | set(handwritten)
    assert {"LiberationSerif-Regular", "DejaVuSansMono"} <= {f.name for f in printed}
    assert all(f.covers(REQUIRED_CHARS) for f in every)


def test_historical_font_kind_has_blackletter_and_early_modern_faces_in_few_styles():
    """A training mix gives the historical faces their own share; "all" stays printed and handwritten,
    and Junicode's many widths and weights are left out so that the one blackletter face is not drowned."""
    historical = discover_fonts("historical")
    assert {face.family for face in historical} == {"Blankenburg_UNZ1A", "Junicode Two Beta"}
    assert {face.kind for face in historical} == {"historical"} and len(historical) <= 4
    assert not set(historical) & set(discover_fonts("all"))
    assert all(face.covers(REQUIRED_CHARS) for face in historical)
    fonts = {font for _, _, font in iter_lines(24, seed=3, font_kind="historical")}
    assert "Blankenburg_UNZ1A" in fonts and fonts <= {face.name for face in historical}


def test_font_discovery_names_the_debian_packages_when_nothing_is_installed(tmp_path):
    with pytest.raises(FontsNotFound, match="fonts-dkg-handwriting"):
        discover_fonts("handwritten", root=tmp_path)
    with pytest.raises(FontsNotFound, match="fonts-urw-base35"):
        discover_fonts("heldout", root=tmp_path)
    with pytest.raises(FontsNotFound, match="fonts-blankenburg fonts-junicode"):
        discover_fonts("historical", root=tmp_path)


def test_training_sources_cannot_draw_the_heldout_fonts():
    """The held-out families measure fonts a model never saw: no training data source may use them."""
    from pydantic import ValidationError

    from pipeline.train.config import DataSource

    with pytest.raises(ValidationError, match="font_kind"):
        DataSource(kind="synth", font_kind="heldout")
    with pytest.raises(ValueError, match="font kind"):
        discover_fonts("gothic")


def test_missing_chars_tells_absent_glyphs_from_present_ones():
    face = discover_fonts("printed")[0]
    font = load_font(face.path, 32)
    assert missing_chars(font, "Ag& \ue001\u0530") == {"\ue001", "\u0530"}


def test_uppercase_only_face_reports_upper_case_ground_truth():
    humor = [f for f in discover_fonts("handwritten") if f.uppercase_only]
    assert humor, "Humor Sans (fonts-humor-sans) should be installed and flagged upper-case only"
    assert humor[0].shown("Fax 12b") == "FAX 12B"
    assert not humor[0].covers("café")  # it has no É, so accented text never goes to it


# --- corpus ----------------------------------------------------------------------------------

def test_corpus_is_deterministic_and_stays_inside_charset():
    first = _lines(CorpusSampler(3), 300)
    assert _lines(CorpusSampler(3), 300) == first
    assert _lines(CorpusSampler(4), 50) != first[:50]
    assert all(set(line) <= set(CHARSET) for line in first)
    assert all(line == line.strip() and "  " not in line for line in first)


def test_corpus_in_other_languages_brings_their_words_letters_and_quotation_marks():
    # English, the default, stays inside ENGLISH_CHARSET: documents set their line pitch by it
    english = _reseeded_lines(CorpusSampler(3), 600)
    assert all(set(line) <= set(ENGLISH_CHARSET) for line in english)
    mixed = _reseeded_lines(CorpusSampler(3, ("fr", "de", "it", "es", "la")), 600)
    assert _reseeded_lines(CorpusSampler(3, ("fr", "de", "it", "es", "la")), 600) == mixed
    assert all(set(line) <= set(CHARSET) for line in mixed)
    text = " ".join(mixed)
    for letters in ("ß", "äöü", "éèàçê", "ñá", "«»", "„"):  # German, French, Spanish; their quotes
        assert any(letter in text for letter in letters), letters
    latin = " ".join(_lines(CorpusSampler(5, ("la",)), 200)).lower()
    assert "dolor" in latin or "voluptatem" in latin
    with pytest.raises(ValueError, match="unknown: xx"):
        CorpusSampler(1, ("en", "xx"))
    with pytest.raises(ValueError, match="each once"):
        CorpusSampler(1, ("fr", "fr"))


@pytest.mark.parametrize("language", list(LANGUAGES))
def test_what_faker_gives_each_language_is_inside_charset(language):
    # the sampler silently drops characters outside CHARSET: a missing letter would cut words
    faker = CorpusSampler(0, (language,))._faker
    texts = []
    for seed in range(100):
        faker.seed_instance(seed)
        texts += [faker.sentence(nb_words=12), faker.name(), faker.address(), faker.company(), faker.catch_phrase()]
    assert {c for text in texts for c in text if not c.isspace()} <= set(CHARSET)


def test_charset_holds_the_capital_of_each_letter():
    assert all(c.upper() in CHARSET for c in CHARSET if len(c.upper()) == 1)


@pytest.mark.parametrize("kind", ["printed", "handwritten", "historical"])
def test_every_font_kind_renders_lines_in_all_languages(kind):
    lines = list(iter_lines(60, seed=9, font_kind=kind, languages=tuple(LANGUAGES)))
    assert any(set(text) - set(ENGLISH_CHARSET) for _, text, _ in lines)


def test_corpus_lines_spread_from_one_word_to_full_width():
    lengths = [len(line) for line in _lines(CorpusSampler(11), 400)]
    assert min(lengths) >= 1 and max(lengths) <= 70
    assert sum(n >= 40 for n in lengths) > 0.3 * len(lengths)
    assert sum(n < 15 for n in lengths) > 0.05 * len(lengths)
    assert len(CorpusSampler(1).line(max_chars=5)) <= 5


def test_paragraph_has_the_requested_word_count_and_a_full_stop():
    text = CorpusSampler(2).paragraph(37)
    assert len(text.split()) == 37 and text[-1] in ".?!"
    with pytest.raises(ValueError):
        CorpusSampler(2).paragraph(0)


def test_cut_at_word_keeps_whole_words():
    assert cut_at_word("alpha beta gamma", 12) == "alpha beta"
    assert cut_at_word("alpha beta", 40) == "alpha beta"
    assert cut_at_word("abcdefgh", 3) == "abc"


def _lines(sampler: CorpusSampler, count: int) -> list[str]:
    return [sampler.line() for _ in range(count)]


def _reseeded_lines(sampler: CorpusSampler, count: int) -> list[str]:
    """Lines as synthetic line sets draw them: the sampler reseeded for each (which picks its language)."""
    lines = []
    for seed in range(count):
        sampler.reseed(seed)
        lines.append(sampler.line())
    return lines


# --- lines -----------------------------------------------------------------------------------

def test_iter_lines_is_deterministic_and_chunkable():
    whole = list(iter_lines(6, seed=5))
    again = list(iter_lines(6, seed=5))
    tail = list(iter_lines(3, seed=5, start_index=3))
    assert [(t, f) for _, t, f in whole] == [(t, f) for _, t, f in again]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _, _), (b, _, _) in zip(whole, again))
    assert [t for _, t, _ in whole[3:]] == [t for _, t, _ in tail]
    assert [t for _, t, _ in iter_lines(6, seed=6)] != [t for _, t, _ in whole]


def test_line_images_are_grey_tight_crops_of_dark_ink_on_light_paper():
    for image, text, font_name in iter_lines(12, seed=21, font_kind="all"):
        pixels = np.asarray(image)
        assert image.mode == "L" and text and font_name
        assert 16 <= image.height <= 140 and image.width >= image.height // 2
        assert pixels.min() < 110 and np.median(pixels) > 150  # ink present, paper dominates
        assert np.median(pixels[:, :2]) > 150  # the side margins are paper, the crop does not cut ink


def test_write_line_set_writes_images_text_and_manifest_that_agree(tmp_path):
    out = write_line_set(tmp_path / "set", count=4, seed=9)
    write_line_set(out, count=2, seed=9, start_index=4)
    rows = [line.split("\t") for line in (out / "manifest.tsv").read_text(encoding="utf-8").splitlines()]
    assert tuple(rows[0]) == MANIFEST_HEADER and len(rows) == 7
    streamed = list(iter_lines(6, seed=9))
    for index, (row, (image, text, font_name)) in enumerate(zip(rows[1:], streamed)):
        stem = f"line_{index:06d}"
        assert row == [f"{stem}.png", text, font_name, "printed"]
        assert (out / f"{stem}.gt.txt").read_bytes() == text.encode("utf-8")
        assert np.array_equal(np.asarray(Image.open(out / f"{stem}.png")), np.asarray(image))


def test_write_line_set_with_zero_count_writes_only_the_manifest_header(tmp_path):
    out = write_line_set(tmp_path, count=0, seed=1)
    assert (out / "manifest.tsv").read_text().splitlines() == ["\t".join(MANIFEST_HEADER)]
    assert not list(out.glob("*.png"))


# --- documents -------------------------------------------------------------------------------

DOC_DPI = 100


@pytest.fixture(scope="module")
def two_column_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs2")
    return write_document_set(out, count=2, seed=13, dpi=DOC_DPI, pages_per_document=(2, 2), two_column_share=1.0)


@pytest.fixture(scope="module")
def skewed_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("skewed")
    return write_document_set(out, count=1, seed=2, dpi=DOC_DPI, formats=("tiff",), pages_per_document=(1, 1),
                              two_column_share=0.0, max_skew_deg=3.0)


def _page_images(document):
    if document.suffix == ".pdf":
        return convert_from_path(document, dpi=DOC_DPI, grayscale=True)
    with Image.open(document) as tiff:
        return [frame.convert("L") for frame in ImageSequence.Iterator(tiff)]


def test_documents_cycle_formats_and_carry_ground_truth_beside_them(two_column_set):
    assert [d.name for d in two_column_set] == ["doc_0000.pdf", "doc_0001.tif"]
    for document in two_column_set:
        gt = load_ground_truth(document)
        assert gt["source"] == document.name and gt["dpi"] == DOC_DPI and len(gt["pages"]) == 2
        assert [page["page"] for page in gt["pages"]] == [1, 2]


def test_ground_truth_lines_are_inside_the_page_ordered_and_never_collide(two_column_set, skewed_set):
    for document in two_column_set + skewed_set:
        for page in load_ground_truth(document)["pages"]:
            lines = page["lines"]
            assert lines, f"{document.name} page {page['page']} has no lines"
            assert sorted(line["order"] for line in lines) == list(range(len(lines)))
            for line in lines:
                x0, y0, x1, y1 = line["bbox"]
                assert 0 <= x0 < x1 <= page["width"] and 0 <= y0 < y1 <= page["height"]
                assert line["text"] and line["text"] == line["text"].strip()
                assert 0 <= line["block"] < page["columns"]
            for block in range(page["columns"]):
                in_order = sorted(lines, key=lambda line: line["order"])
                boxes = [line["bbox"] for line in in_order if line["block"] == block]
                if page["skew_deg"] == 0:
                    assert all(upper[3] <= lower[1] for upper, lower in zip(boxes, boxes[1:]))


def test_two_column_pages_fill_both_columns_left_block_first(two_column_set):
    for document in two_column_set:
        for page in load_ground_truth(document)["pages"]:
            left = [line for line in page["lines"] if line["block"] == 0]
            right = [line for line in page["lines"] if line["block"] == 1]
            assert page["columns"] == 2 and left and right
            assert max(line["bbox"][2] for line in left) < min(line["bbox"][0] for line in right)
            assert max(line["order"] for line in left) < min(line["order"] for line in right)


def test_rendered_pages_match_the_stored_size_and_ink_lies_inside_the_boxes(two_column_set):
    for document in two_column_set:
        gt_pages = load_ground_truth(document)["pages"]
        images = _page_images(document)
        assert len(images) == len(gt_pages)
        for image, page in zip(images, gt_pages):
            assert image.size == (page["width"], page["height"])
            dark = np.asarray(image) < 100
            outside = dark.copy()
            for line in page["lines"]:
                x0, y0, x1, y1 = line["bbox"]
                assert dark[y0:y1, x0:x1].any(), f"no ink in the box of {line['text']!r}"
                outside[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3] = False
            assert outside.mean() < 0.001  # only dust specks outside the line boxes


def test_tiff_has_the_stated_page_count_and_resolution(two_column_set):
    with Image.open(two_column_set[1]) as tiff:
        assert tiff.n_frames == len(load_ground_truth(two_column_set[1])["pages"])
        assert tuple(round(v) for v in tiff.info["dpi"]) == (DOC_DPI, DOC_DPI)


def test_skewed_page_boxes_enclose_the_turned_lines(skewed_set):
    page = load_ground_truth(skewed_set[0])["pages"][0]
    assert 0 < abs(page["skew_deg"]) <= 3.0 and page["columns"] == 1
    slope = np.tan(np.deg2rad(abs(page["skew_deg"])))
    for line in page["lines"]:
        x0, y0, x1, y1 = line["bbox"]
        assert y1 - y0 >= slope * (x1 - x0) * 0.9


def test_document_set_is_deterministic(tmp_path):
    first = write_document_set(tmp_path / "a", count=1, seed=8, dpi=60, formats=("tiff",), pages_per_document=(1, 1))
    second = write_document_set(tmp_path / "b", count=1, seed=8, dpi=60, formats=("tiff",), pages_per_document=(1, 1))
    assert load_ground_truth(first[0]) == load_ground_truth(second[0])
    assert np.array_equal(np.asarray(_page_images(first[0])[0]), np.asarray(_page_images(second[0])[0]))


def test_document_set_rejects_bad_arguments_and_writes_nothing_for_zero(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        write_document_set(tmp_path, count=1, seed=1, formats=("png",))
    with pytest.raises(ValueError, match="pages_per_document"):
        write_document_set(tmp_path, count=1, seed=1, pages_per_document=(3, 1))
    assert write_document_set(tmp_path / "none", count=0, seed=1) == []
    with pytest.raises(FileNotFoundError, match="gt.json"):
        load_ground_truth(tmp_path / "missing.pdf")


def test_synth_command_refuses_unknown_languages_before_touching_an_existing_set(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["synth", "lines", "--output", str(tmp_path), "--count", "2", "--languages", "fr, de"]) == ExitCode.ok
    manifest = (tmp_path / "manifest.tsv").read_text(encoding="utf-8")
    assert main(["synth", "lines", "--output", str(tmp_path), "--count", "2", "--languages", "fr,xx"]) == ExitCode.bad_args
    assert main(["synth", "docs", "--output", str(tmp_path / "docs"), "--languages", "fr"]) == ExitCode.bad_args
    assert "unknown: xx" in capsys.readouterr().err
    for nothing in ("", " , "):  # had been taken as English
        assert main(["synth", "lines", "--output", str(tmp_path / "none"), "--languages", nothing]) == ExitCode.bad_args
        assert capsys.readouterr().err == (f"trocr-pipeline: error: --languages {nothing!r} names no language; "
                                           "choose from en,fr,de,it,es,la\n")
    assert not (tmp_path / "none").exists()
    assert (tmp_path / "manifest.tsv").read_text(encoding="utf-8") == manifest


def test_synth_command_refuses_a_folder_that_holds_files_and_leaves_them_as_they_were(tmp_path, capsys):
    """A second set written into a first's folder had mixed with it: 6 image/text pairs left beside a manifest of 2,
    and eval --lines and train read all 6."""
    from pipeline.cli import main

    lines = tmp_path / "lines"
    assert main(["synth", "lines", "--output", str(lines), "--count", "3"]) == ExitCode.ok
    first_set = {path.name: path.read_bytes() for path in lines.iterdir()}
    capsys.readouterr()
    assert main(["synth", "lines", "--output", str(lines), "--count", "2", "--seed", "7"]) == ExitCode.bad_args
    [message] = capsys.readouterr().err.splitlines()
    assert message == (f"trocr-pipeline: error: synth: --output {lines} already holds 7 files or folders "
                       "(line_000000.gt.txt first): choose an empty or new folder (a new set would mix with them)")
    assert {path.name: path.read_bytes() for path in lines.iterdir()} == first_set
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    assert main(["synth", "docs", "--output", str(tmp_path / "docs"), "--count", "1"]) == ExitCode.bad_args
    assert "choose an empty or new folder" in capsys.readouterr().err
    assert [path.name for path in (tmp_path / "docs").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert main(["synth", "docs", "--output", str(tmp_path / "empty"), "--count", "1"]) == ExitCode.ok


def test_synth_command_stops_in_one_line_when_the_disk_is_full(small_disk, capsys):
    """A full output disk had ended synth docs and synth lines with an ENOSPC traceback (exit 1), where inspect and
    the job say it in one line with exit code 7."""
    from pipeline.cli import main

    (small_disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 4096))
    for what in ("lines", "docs"):
        output = small_disk / what
        assert main(["synth", what, "--output", str(output), "--count", "1"]) == ExitCode.write_failed
        assert f"no space left on the device while writing {output}" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_demo_makes_its_samples_again_after_a_killed_synth(tmp_path):
    """``make demo`` runs synth only where out/demo/samples is not there: a synth killed part way had left a folder
    holding part of the set, which every later ``make demo`` took for the samples (and synth refuses, not empty)."""
    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "bin").mkdir()
    cli = tmp_path / "bin" / "trocr-pipeline"
    # the real synth; once killed after its first document; run and show only noted (Ray and the model are not this)
    cli.write_text(f"""#!/bin/bash
case "$1" in
  synth) if [ -e {tmp_path}/kill ]; then
           {sys.executable} -m pipeline.cli synth docs --output "$4" --count 1 --seed 7 >/dev/null; kill -9 $$
         fi
         exec {sys.executable} -m pipeline.cli "$@";;
  *) echo "$1" >> {tmp_path}/calls;;
esac
""")
    cli.chmod(0o755)
    make = ["make", "-s", "-o", "setup", "demo", f"BIN={tmp_path / 'bin'}", f"DEMO={tmp_path / 'demo'}"]
    (tmp_path / "kill").touch()
    assert subprocess.run(make, cwd=repo, capture_output=True).returncode != 0
    (tmp_path / "kill").unlink()
    done = subprocess.run(make, cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "demo" / "samples").glob("*.gt.json"))) == 4
    assert subprocess.run(make, cwd=repo, capture_output=True).returncode == 0  # made once: the samples are kept
    assert (tmp_path / "calls").read_text().split() == ["run", "show", "run", "show"]
