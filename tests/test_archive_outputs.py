"""What an archive takes home, through the real command line on a real local Ray: searchable PDFs
(PDF/A-2b), METS packages, word confidences, ``--pages``, ``--dry-run``, ``--log-json`` and a quiet
log. The bundled model reads the small 150-dpi pages, so the text layer carries real words."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote

import cv2
import jiwer
import numpy as np
import pikepdf
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
import tifffile
from lxml import etree
from pdf2image import convert_from_path
from PIL import Image, TiffImagePlugin

from conftest import box_iou, official_schema, text_page, write_pdf
from helpers import run_on_a_terminal
from operators.errors import ConfigError, ExitCode, WriteFailed
from operators.formats.export import remove_other_exports
from operators.formats.mets import page_images
from operators.formats.pdf import searchable_pdf
from operators.formats.read import page_image
from operators.ingest import DEFAULT_MAX_IMAGE_PIXELS, NEW_SUBFILE_TYPE, sniff_kind, triage
from operators.rasterize import PageRange, page_ranges, rasterize
from operators.records import DocumentRecord, LineRecord, PageWork
from operators.settings import DEFAULT_MODEL, RasterizeConfig
from operators.write import PagesRead, ParquetSink, page_row
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.job import dry_run, run_job
from pipeline.progress import JobProgress

CLI = [sys.executable, "-m", "pipeline.cli"]
DPI = "rasterize.dpi=150"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, page_images) -> Path:
    """Five documents: a 3-page PDF, a PNG, a TIFF, a JPEG and a file that is no document."""
    folder = tmp_path_factory.mktemp("archive-inputs")
    write_pdf(folder / "letters.pdf", page_images)
    text_page(["A note on a single sheet of paper.", "Signed and dated below."]).save(folder / "note.png", dpi=(150, 150))
    text_page(["The receipt for the quick brown fox."]).save(folder / "receipt.tif", dpi=(150, 150))
    text_page(["Pack my box with five dozen jugs."]).save(folder / "box.jpg", dpi=(150, 150), quality=95)
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")
    return folder


@pytest.fixture(scope="module")
def run(inputs, tmp_path_factory):
    """One plain non-interactive run of the command line with every export but text."""
    output = tmp_path_factory.mktemp("archive-out")
    log = output.parent / f"{output.name}.jsonl"
    started = time.time()
    job = subprocess.Popen(CLI + ["run", str(inputs), "--output", str(output), "--set", DPI,
                                  "--export", "pdf,mets,page,hocr", "--pdfa", "--log-json", str(log)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    stdout, stderr = job.communicate(timeout=600)
    result = subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
    # the Ray instance it started leaves no session folder (logs) behind: one had stayed from every run (that of a
    # killed run long ago whose process id this one has again is not its)
    assert not [session for session in Path(tempfile.gettempdir(), "ray").glob(f"session_*_{job.pid}")
                if session.stat().st_mtime >= started], job.pid
    pages = ds.dataset(f"{output}/pages", format="parquet").to_table().to_pylist()
    return result, output, log, pages


def _exports(output: Path, source: str, suffix: str) -> Path:
    [path] = (output / "exports").glob(f"{Path(source).stem}-*{suffix}")
    return path


def test_a_plain_run_prints_a_short_log_without_ray_chatter_or_warnings(run, inputs):
    result, *_ = run
    assert result.returncode == 4, result.stderr  # broken.pdf fails triage
    lines = (result.stdout + result.stderr).splitlines()
    assert 0 < len(lines) <= 40, lines
    chatter = [line for line in lines if re.search(r"core_worker|logging_progress|streaming_executor|Running Dataset"
                                                     r"|WARNING|warning|Loading weights", line)]
    assert not chatter, chatter
    assert "documents: 4 ok, 1 failed" in result.stdout
    # the failed document named with its error (the console had only counted it)
    assert [line for line in lines if line.startswith("failed: ")] == [
        line for line in lines if line.startswith(f"failed: {inputs / 'broken.pdf'} (corrupt_file: ")]
    assert len([line for line in lines if line.startswith("failed: ")]) == 1


def test_log_json_has_one_record_per_finished_document(run, inputs):
    _, _, log, pages = run
    records = {Path(entry["source"]).name: entry for entry in map(json.loads, log.read_text().splitlines())}
    assert set(records) == {path.name for path in inputs.iterdir()}
    assert records["broken.pdf"]["status"] == "failed" and records["broken.pdf"]["error"]["code"] == "corrupt_file"
    assert all(isinstance(record["seconds"], float) for record in records.values())  # had been 0, an int, without pages
    letters = records["letters.pdf"]
    assert (letters["status"], letters["pages"], letters["error"]) == ("ok", 3, None)
    assert letters["lines"] == sum(len(page["lines"]) for page in pages if page["source"].endswith("letters.pdf"))
    assert letters["seconds"] > 0


def test_a_duplicates_log_json_record_names_the_document_that_holds_its_text(tmp_path):
    """A duplicate's record had said only "duplicate": a scheduler could not tell where its text was."""
    progress = JobProgress(stream=io.StringIO(), log_json=tmp_path / "log.jsonl")
    progress.document_published(DocumentRecord("c0", "copy.pdf", "duplicate", None, None, 0, duplicate_of="a1"),
                                PagesRead.of([]))
    progress.document_published(DocumentRecord("a1", "a.pdf", "ok", None, None, 0), PagesRead.of([]))
    progress.close()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(record["source"], record["duplicate_of"]) for record in records] == [("copy.pdf", "a1"), ("a.pdf", None)]


def test_words_carry_their_own_confidence(run):
    *_, pages = run
    lines = [line for page in pages for line in page["lines"] if len(line["words"]) > 1]
    assert lines
    for line in lines:
        confidences = [word["confidence"] for word in line["words"]]
        assert all(0 < value <= 1 for value in confidences)
    assert any(len({round(word["confidence"], 6) for word in line["words"]}) > 1 for line in lines)


def _pdf_words(path: Path) -> list[list[tuple[str, list[float]]]]:
    """Per page: (word, [x0, y0, x1, y1] in points from the top left) as pdftotext finds them."""
    html = subprocess.run(["pdftotext", "-bbox", str(path), "-"], capture_output=True, check=True).stdout
    root = etree.fromstring(html, etree.HTMLParser(encoding="utf-8"))
    return [[(word.text or "", [float(word.get(key)) for key in ("xmin", "ymin", "xmax", "ymax")])
             for word in page.iter("word")] for page in root.iter("page")]


def test_searchable_pdfs_hold_the_recognized_words_on_their_boxes(run, inputs):
    _, output, _, pages = run
    for source in sorted({page["source"] for page in pages}):
        rows = sorted((page for page in pages if page["source"] == source), key=lambda page: page["page"])
        pdf_path = _exports(output, source, ".pdf")
        found = _pdf_words(pdf_path)
        assert len(found) == len(rows)
        with pikepdf.open(pdf_path) as pdf:
            sizes = [(float(page.mediabox[2]), float(page.mediabox[3])) for page in pdf.pages]
        expected_words, found_words, placed, total = [], [], 0, 0
        for row, words, (width_pt, height_pt) in zip(rows, found, sizes):
            scale_x, scale_y = row["width"] / width_pt, row["height"] / height_pt
            found_words += [text for text, _ in words]
            for line in row["lines"]:
                for word in line["words"]:
                    expected_words.append(word["text"])
                    boxes = [[box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y]
                             for text, box in words if text == word["text"]]
                    total += 1
                    placed += any(box_iou(word["bbox"], box) >= 0.5 for box in boxes)
        assert expected_words, source
        assert jiwer.cer(" ".join(sorted(expected_words)), " ".join(sorted(found_words))) <= 0.02
        assert placed >= 0.9 * total, (source, placed, total)


def test_a_cropped_pdf_page_is_read_and_overlaid_as_a_viewer_shows_it(tmp_path, page_images):
    """A PDF page whose CropBox is smaller than its MediaBox (a scan cropped in a PDF editor): the job reads
    what a viewer shows, and the text layer's words land on the pixels they were read from."""
    image = np.asarray(page_images[0].convert("L"))
    with pikepdf.open(write_pdf(tmp_path / "full.pdf", page_images[:1], dpi=150)) as pdf:
        _, _, width, height = (float(value) for value in pdf.pages[0].mediabox)
        pdf.pages[0].CropBox = [72, 72, width - 72, height - 36]  # 1 inch off the left, right and bottom, 0.5 off the top
        pdf.save(tmp_path / "cropped.pdf")
    source = str(tmp_path / "cropped.pdf")
    [work] = rasterize(PageRange("0123456789abcdef", source, "pdf", 1, 1),
                       RasterizeConfig(dpi=150, detect_orientation=False))
    shown = image[75:-150, 150:-150]
    assert work.image.shape == shown.shape
    assert np.abs(work.image.astype(np.float32) - shown).mean() < 3

    _assert_text_layer_on_the_pixels(work, source, tmp_path)


def test_a_crop_box_reaching_beyond_the_media_box_overlays_what_a_viewer_shows(tmp_path, page_images):
    """A viewer and poppler show the part of the CropBox inside the MediaBox: the text layer had been stretched
    over the whole CropBox, its words a tenth too small and half an inch off."""
    with pikepdf.open(write_pdf(tmp_path / "full.pdf", page_images[:1], dpi=150)) as pdf:
        _, _, width, height = (float(value) for value in pdf.pages[0].mediabox)
        pdf.pages[0].CropBox = [-36, -36, width, height]
        pdf.save(tmp_path / "overcropped.pdf")
    source = str(tmp_path / "overcropped.pdf")
    [work] = rasterize(PageRange("0123456789abcdef", source, "pdf", 1, 1),
                       RasterizeConfig(dpi=150, detect_orientation=False))
    assert work.image.shape == np.asarray(page_images[0].convert("L")).shape
    _assert_text_layer_on_the_pixels(work, source, tmp_path)


def test_words_whose_ink_nearly_touches_are_copied_apart_by_pdftotext_raw(tmp_path, page_images):
    """Word boxes hug the ink, and in italic or cursive print (a j's tail under the word before it) two words may lie
    closer than the 0.15 font sizes poppler's content-stream order takes for a space: pdftotext -raw had given
    "ofjalapeño", for all the space characters of the text layer. Each word still lies on its box."""
    source = write_pdf(tmp_path / "close.pdf", page_images[:1])
    [work] = rasterize(PageRange("0123456789abcdef", str(source), "pdf", 1, 1),
                       RasterizeConfig(dpi=150, detect_orientation=False))
    work.lines = [LineRecord(bbox=(100, 100, 900, 160), polygon=[(100, 100), (900, 100), (900, 160), (100, 160)],
                             baseline=[(100, 150), (900, 150)], block=0, order=0, confidence=0.9,
                             text="carry of jalapeño yeah", gaps=[(300, 302), (360, 362), (600, 603)])]
    row = page_row(work)
    (tmp_path / "out.pdf").write_bytes(searchable_pdf([row], str(source)))
    raw = subprocess.run(["pdftotext", "-raw", str(tmp_path / "out.pdf"), "-"], capture_output=True, text=True,
                         check=True).stdout
    assert raw.split("\n")[0] == "carry of jalapeño yeah", raw
    [found] = _pdf_words(tmp_path / "out.pdf")
    for word, (text, box) in zip(row["lines"][0]["words"], found):
        (left, right), (x0, _, x1, _) = (value * 150 / 72 for value in box[::2]), word["bbox"]
        assert text == word["text"] and x0 - 1 <= left < right <= x1 + 1 and right - left >= 0.8 * (x1 - x0), (text, box)


def test_pages_sharing_one_resources_dictionary_each_get_their_text_layer(tmp_path, page_images):
    """Many producers write one resources dictionary for every page: the first page's text layer, added to it,
    had been taken for text that every later page shows already, and they got none."""
    with pikepdf.open(write_pdf(tmp_path / "own.pdf", page_images[:2], dpi=150)) as pdf:
        first, second = pdf.pages
        shared = pdf.make_indirect(pikepdf.Dictionary(XObject=pikepdf.Dictionary(
            image=first.obj.Resources.XObject.image, image2=second.obj.Resources.XObject.image)))
        first.obj.Resources = second.obj.Resources = shared
        second.obj.Contents = pdf.make_stream(second.obj.Contents.read_bytes().replace(b"/image", b"/image2"))
        pdf.save(tmp_path / "shared.pdf")
    works = rasterize(PageRange("0123456789abcdef", str(tmp_path / "shared.pdf"), "pdf", 1, 2),
                      RasterizeConfig(dpi=150, detect_orientation=False))
    _, text = _labelled_pdf(works, tmp_path / "shared.pdf", "Sheet")
    assert text.split() == ["Sheet1", "Sheet2"], text


def _labelled_pdf(works: list, source: Path, label: str, pdfa: bool = False) -> tuple[Path, str]:
    """The searchable PDF of ``works`` (beside ``source``) with one line on each page that rendered, reading
    ``{label}{page}``, and its text as pdftotext reads it."""
    for work in works:
        work.lines = [LineRecord(bbox=(100, 100, 900, 160), polygon=[(100, 100), (900, 100), (900, 160), (100, 160)],
                                 baseline=[(100, 150), (900, 150)], block=0, order=0, confidence=0.9,
                                 text=f"{label}{work.page}")] if work.status == "ok" else []
    pdf = source.with_suffix(".out.pdf")
    pdf.write_bytes(searchable_pdf([page_row(work) for work in works], str(source), pdfa=pdfa))
    return pdf, subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout


def test_a_tiff_with_a_frame_that_cannot_be_decoded_gets_a_searchable_pdf_of_the_others(tmp_path):
    """The job fails the damaged frame's page and reads the others; img2pdf decodes every frame, so the document
    had got no PDF at all (export_failed)."""
    frames = [text_page([f"The text of page {number}."]).convert("L") for number in (1, 2, 3)]
    source = tmp_path / "bundle.tif"
    frames[0].save(source, save_all=True, append_images=frames[1:], dpi=(150, 150), compression="tiff_lzw")
    data = bytearray(source.read_bytes())
    with Image.open(source) as image:
        image.seek(1)
        for offset, count in zip(image.tag_v2[273], image.tag_v2[279]):  # the second frame's strips
            data[offset:offset + count] = b"\xff" * count
    source.write_bytes(bytes(data))
    works = rasterize(PageRange("0123456789abcdef", str(source), "tiff", 1, 3),
                      RasterizeConfig(dpi=150, detect_orientation=False))
    assert [work.status for work in works] == ["ok", "failed", "ok"]
    pdf, text = _labelled_pdf(works, source, "page")
    with pikepdf.open(pdf) as opened:
        assert len(opened.pages) == 3
    assert "page1" in text and "page3" in text


@pytest.mark.parametrize("name", ["previews.tif", "camera.jpg"])
def test_the_previews_in_an_image_file_are_no_pages(tmp_path, name):
    """A scanner's TIFF with a reduced-resolution preview after each page (NewSubfileType 1) and a camera's JPEG
    with a preview picture (MPO) had each preview read as one more page, its text a second time and worse."""
    pages = [text_page([f"Sheet {number} of the set."]).convert("L") for number in (1, 2)]
    previews = [page.resize((page.width // 4, page.height // 4)) for page in pages]
    source = tmp_path / name
    if name == "previews.tif":
        for preview in previews:
            preview.encoderinfo = {"tiffinfo": {NEW_SUBFILE_TYPE: 1}}
        pages[0].save(source, save_all=True, append_images=[previews[0], pages[1], previews[1]], dpi=(150, 150))
    else:
        pages = pages[:1]
        pages[0].save(source, format="MPO", save_all=True, append_images=previews[:1], dpi=(150, 150))
    plan = triage(str(source), RasterizeConfig(dpi=150))
    assert (plan.kind, plan.num_pages) == ("tiff" if name.endswith("tif") else "jpeg", len(pages))
    works = rasterize(PageRange(plan.doc_id, str(source), plan.kind, 1, plan.num_pages),
                      RasterizeConfig(dpi=150, detect_orientation=False))
    assert [(work.status, work.width, work.height) for work in works] == [("ok", *page.size) for page in pages]
    pdf, text = _labelled_pdf(works, source, "sheet")
    with pikepdf.open(pdf) as opened:
        assert [round(float(page.mediabox[2])) for page in opened.pages] == [page.width * 72 // 150 for page in pages]
    assert text.split() == [f"sheet{number}" for number in range(1, len(pages) + 1)]


@pytest.mark.parametrize("name", ["preview-cut.jpg", "header-cut.tif"])
def test_a_searchable_pdf_of_an_image_with_a_frame_that_is_cut_off(tmp_path, name):
    """img2pdf decodes every frame: a camera's JPEG whose preview picture was cut off (what editors that keep
    only the primary picture leave) and a TIFF whose last frame's header is cut had got no searchable PDF
    (export_failed), though the job read their pages."""
    pages = [text_page([f"Sheet {number} of the set."]).convert("L") for number in (1, 2, 3)]
    source = tmp_path / name
    if name == "preview-cut.jpg":
        pages = pages[:1]
        pages[0].save(source, format="MPO", save_all=True, append_images=[pages[0].resize((310, 438))])
        with Image.open(source) as image:
            primary = image.mpinfo[0xB002][0]["Size"]
        source.write_bytes(source.read_bytes()[:primary + 200])
    else:
        pages[0].save(source, save_all=True, append_images=pages[1:], dpi=(150, 150), compression="tiff_lzw")
        source.write_bytes(source.read_bytes()[: source.stat().st_size * 9 // 10])
    plan = triage(str(source), RasterizeConfig(dpi=150))
    works = rasterize(PageRange(plan.doc_id, str(source), plan.kind, 1, plan.num_pages),
                      RasterizeConfig(dpi=150, detect_orientation=False))
    assert [work.status for work in works] == (["ok"] if name.endswith("jpg") else ["ok", "ok", "failed"])
    pdf, text = _labelled_pdf(works, source, "sheet")
    with pikepdf.open(pdf) as opened:
        assert len(opened.pages) == len(works)
    assert text.split() == [f"sheet{work.page}" for work in works if work.status == "ok"]


@pytest.mark.parametrize("name", ["master.tif", "frames.png"])
def test_images_img2pdf_cannot_embed_get_a_searchable_pdf_of_every_page(tmp_path, name):
    """A 16-bit master TIFF ("PIL is unable to preserve more than 8 bits per sample") and an animated PNG (img2pdf
    made one page of three) had failed with export_failed."""
    pages = [text_page([f"Sheet {number} of the set."]).convert("L") for number in (1, 2, 3)]
    source = tmp_path / name
    if name == "master.tif":
        pages = pages[:1]
        Image.fromarray(np.asarray(pages[0], np.uint16) * 257).save(source, dpi=(150, 150))
    else:
        pages[0].save(source, save_all=True, append_images=pages[1:], dpi=(150, 150))
    works = rasterize(PageRange("0123456789abcdef", str(source), "tiff" if name.endswith("tif") else "png", 1,
                                len(pages)), RasterizeConfig(dpi=150, detect_orientation=False))
    _, text = _labelled_pdf(works, source, "sheet")
    assert text.split() == [f"sheet{number}" for number in range(1, len(pages) + 1)]


@pytest.mark.parametrize("bands", [3, 1])
def test_a_16_bit_png_holding_12_bit_values_shows_in_its_searchable_pdf_as_the_job_read_it(tmp_path, bands):
    """img2pdf embeds a 16-bit PNG's samples as they are: 12-bit values showed the page near black under its text
    layer, where the job had read it scaled from its bit depth."""
    page = np.asarray(text_page(["Twelve bits in sixteen, shown as read."], size=(700, 240)))
    source = tmp_path / "page.png"
    cv2.imwrite(str(source), np.dstack([page.astype(np.uint16) * 16] * bands))
    [work] = rasterize(PageRange("0123456789abcdef", str(source), "png", 1, 1),
                       RasterizeConfig(dpi=150, detect_orientation=False))
    pdf, _ = _labelled_pdf([work], source, "sheet")
    [shown] = convert_from_path(pdf, dpi=150, grayscale=True)
    assert np.abs(work.image.astype(int) - page).max() <= 1
    assert shown.size == (work.width, work.height)
    assert np.abs(np.asarray(shown, dtype=int) - work.image).mean() < 2


@pytest.mark.parametrize("orientation", [1, 6, 5])  # upright; stored turned (EXIF 6); turned and mirrored (5)
def test_a_fax_of_non_square_pixels_is_read_with_square_ones(tmp_path, orientation):
    """A fax at 204 x 98 dpi holds its page squashed to half height: the job reads it stretched back to
    204 dpi both ways, and the searchable PDF (its page from the file's own resolutions) lays the words on it.
    Stored turned a quarter, its x and y resolutions are swapped."""
    page = text_page(["A fax from the registry, sent at normal resolution."]).convert("L")
    fax = page.resize((page.width, round(page.height * 98 / 204)), Image.Resampling.BOX)
    if orientation == 1:
        source, kind = tmp_path / "fax.tif", "tiff"
        fax.convert("1").save(source, dpi=(204, 98), compression="group4")
    else:
        source, kind, exif = tmp_path / "fax.png", "png", Image.Exif()
        exif[0x0112] = orientation
        stored = fax.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.TRANSPOSE)
        stored.save(source, dpi=(98, 204), exif=exif.tobytes())
    [work] = rasterize(PageRange("0123456789abcdef", str(source), kind, 1, 1),
                       RasterizeConfig(dpi=300, detect_orientation=False))
    assert (work.dpi, work.width, work.height) == (204, page.width, round(fax.height * 204 / 98))
    back = np.asarray(page.resize((work.width, work.height)), dtype=np.float32)
    assert np.abs(work.image.astype(np.float32) - back).mean() < 12
    _assert_text_layer_on_the_pixels(work, str(source), tmp_path)


def _assert_text_layer_on_the_pixels(work, source: str, folder: Path) -> None:
    """A word at a pixel box of the page as the job read it is where pdftotext finds it in the searchable PDF."""
    box = (200, 100, 500, 140)
    work.lines = [LineRecord(bbox=box, polygon=[], baseline=[], block=0, order=0, text="Placed")]
    (folder / "out.pdf").write_bytes(searchable_pdf([page_row(work)], source))
    html = subprocess.run(["pdftotext", "-cropbox", "-bbox", str(folder / "out.pdf"), "-"], capture_output=True,
                          check=True).stdout
    [word] = etree.fromstring(html, etree.HTMLParser()).iter("word")
    found = [float(word.get(key)) * work.dpi / 72 for key in ("xmin", "ymin", "xmax", "ymax")]
    assert word.text == "Placed" and box_iou(found, box) >= 0.8, found


def test_what_a_library_warns_of_while_exporting_is_logged_by_the_driver(ray_local, tmp_path, caplog, capfd):
    """img2pdf's warning about a PNG's alpha channel, said in the Ray task that writes the exports, had reached the
    console through Ray's forwarding, with its colour codes and the worker's pid."""
    text_page(["A page with an alpha channel."]).convert("LA").save(tmp_path / "faded.png", dpi=(150, 150))
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        run_job([str(tmp_path / "faded.png")], str(tmp_path / "out"),
                load_config(None, [DPI, "output.exports=[pdf]", "recognize.max_new_tokens=4"]))
    assert [record.name for record in caplog.records if "alpha channel" in record.getMessage()] == ["img2pdf"]
    assert "export_document pid=" not in capfd.readouterr().err


@pytest.mark.parametrize("name", ["keyed.png", "keyed.gif"])
def test_a_palette_image_with_a_transparent_colour_shows_its_page_in_the_searchable_pdf(tmp_path, name):
    """img2pdf made a palette image's transparent colour a soft mask of its palette indices: the page of a GIF or of
    a 16-grey PNG with one grey marked transparent came out nearly white, its text layer alone left."""
    page = text_page([f"Line {number} of a page kept in sixteen greys." for number in range(8)]).convert("L")
    source = tmp_path / name
    page.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(source, transparency=0, dpi=(150, 150))
    [work] = rasterize(PageRange("0123456789abcdef", str(source), sniff_kind(source.read_bytes()[:1024]), 1, 1),
                       RasterizeConfig(dpi=150, detect_orientation=False))
    pdf, text = _labelled_pdf([work], source, "Sheet")
    [shown] = convert_from_path(str(pdf), dpi=150, grayscale=True)
    shown = np.asarray(shown.resize(work.image.shape[::-1]), np.float32)
    assert np.corrcoef(shown.ravel(), work.image.astype(np.float32).ravel())[0, 1] > 0.9
    assert text.split() == ["Sheet1"]


def test_pages_stored_turned_show_upright_under_their_text_layer(ray_local, tmp_path):
    """Camera JPEGs stored sideways (EXIF 6) or sideways and mirrored (EXIF 5, which a PDF page cannot
    express as /Rotate), and scanner TIFFs stored sideways with the TIFF orientation tag: the searchable PDF
    shows each page as the job read it, and its words. Pillow turns a TIFF as it decodes it: an uncompressed one
    had been read garbled, and img2pdf had turned both TIFFs a second time (a Group 4 one broken too). A PNG
    without a resolution had got img2pdf's 96 dpi page, not the dpi the job read it at."""
    upright = text_page([f"Line {number} of a page photographed with a phone." for number in range(8)])
    binary = upright.point(lambda value: 255 * (value > 127)).convert("1")
    inputs = tmp_path / "photos"
    inputs.mkdir()
    expected = {}
    for orientation, turn in ((6, Image.Transpose.ROTATE_90), (5, Image.Transpose.TRANSPOSE)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        upright.transpose(turn).save(inputs / f"photo{orientation}.jpg", dpi=(150, 150), quality=95,
                                     exif=exif.tobytes())
        expected[f"photo{orientation}"] = upright
    upright.save(inputs / "nodpi.png")  # no resolution: read at the configured dpi, its PDF page sized so
    expected["nodpi"] = upright
    tiff_tag = TiffImagePlugin.ImageFileDirectory_v2()
    tiff_tag[0x0112] = 6
    for name, page, compression in (("scan-raw", upright, "raw"), ("scan-g4", binary, "group4")):
        page.transpose(Image.Transpose.ROTATE_90).save(inputs / f"{name}.tif", dpi=(150, 150), tiffinfo=tiff_tag,
                                                        compression=compression)
        expected[name] = page
    config = load_config(None, [DPI, "rasterize.detect_orientation=false", "output.exports=[pdf]"])
    run_job([str(inputs)], str(tmp_path / "out"), config)
    for name, page in expected.items():
        [pdf_path] = (tmp_path / "out" / "exports").glob(f"{name}-*.pdf")
        shown_png = tmp_path / f"shown-{name}"
        subprocess.run(["pdftoppm", "-r", "150", "-gray", "-png", "-singlefile", str(pdf_path), str(shown_png)],
                       check=True)
        shown = np.asarray(Image.open(f"{shown_png}.png").convert("L"), dtype=np.float32)
        assert shown.shape == np.asarray(upright).shape, name
        assert np.abs(shown - np.asarray(page.convert("L"), dtype=np.float32)).mean() < 3, name
        [words] = _pdf_words(pdf_path)
        assert "phone." in [text for text, _ in words], name
    with pikepdf.open(next((tmp_path / "out" / "exports").glob("photo6-*.pdf"))) as pdf:
        [image] = pdf.pages[0].images.values()  # the JPEG as it is (it had been decoded and stored again, 7x larger)
        assert image.Filter == "/DCTDecode" and image.read_raw_bytes() == (inputs / "photo6.jpg").read_bytes()


def test_a_pdf_keeps_its_outline_labels_metadata_and_encryption_and_text_is_not_laid_twice(ray_local, tmp_path,
                                                                                          caplog):
    """A born-digital cover page before a scanned one, with an outline, page labels, a title and an owner password:
    the searchable PDF had been a new file of the pages alone, unencrypted, and the cover's text came out twice
    (its own, and an invisible copy of the job's reading of it). The page left without a text layer is said: the
    export runs as a Ray task, whose worker's log lines had gone nowhere."""
    from fpdf import FPDF

    cover = FPDF(unit="pt", format=(620, 877))
    cover.add_page()
    cover.set_font("helvetica", size=24)
    cover.text(80, 200, "Annual report of the harbour office")
    cover.add_page()
    cover.image(text_page([f"Line {number} of a scanned page in the report." for number in range(8)]), x=0, y=0,
                w=620, h=877)
    source = tmp_path / "report.pdf"
    cover.output(str(source))
    with pikepdf.open(source, allow_overwriting_input=True) as pdf:
        with pdf.open_outline() as outline:
            outline.root.append(pikepdf.OutlineItem("Scanned pages", 1))
        pdf.Root.PageLabels = pdf.make_indirect(pikepdf.Dictionary(Nums=[0, pikepdf.Dictionary(S=pikepdf.Name.r)]))
        pdf.docinfo[pikepdf.Name.Title] = "Harbour office 1901"
        pdf.Root.Names = pikepdf.Dictionary(Dests=pikepdf.Dictionary(Names=[
            pikepdf.String("cover"), pikepdf.Array([pdf.pages[0].obj, pikepdf.Name.Fit])]))
        pdf.save(source, encryption=pikepdf.Encryption(owner="secret", user="",
                                                       allow=pikepdf.Permissions(extract=False)))
    said_in = []  # the thread each line is said in: the driver's, where the progress line is drawn, not Ray's own
    caplog.handler.addFilter(lambda record: said_in.append((record.name, threading.current_thread())) or True)
    with caplog.at_level(logging.INFO, logger="operators"):
        run_job([str(source)], str(tmp_path / "out"), load_config(None, [DPI, "output.exports=[pdf]"]))
    assert re.search(r"report\.pdf: 1 page\(s\) show text already \(page 1 first\)", caplog.text), caplog.text
    assert [thread for name, thread in said_in if name == "operators.formats.pdf"] == [threading.main_thread()]
    [exported] = (tmp_path / "out" / "exports").glob("report-*.pdf")
    with pikepdf.open(exported) as pdf:
        assert pdf.is_encrypted and not pdf.allow.extract
        assert [item.title for item in pdf.open_outline().root] == ["Scanned pages"]
        assert pdf.Root.PageLabels.Nums[1].S == "/r" and pdf.docinfo.Title == "Harbour office 1901"
    first, second = _pdf_words(exported)
    assert [text for text, _ in first] == "Annual report of the harbour office".split()
    assert "scanned" in [text for text, _ in second]
    # --pages: a PDF of the pages read, without the original's labels and outline, which name other pages, and
    # encrypted as the original (it had been saved unencrypted)
    run_job([str(source)], str(tmp_path / "page2"), load_config(None, [DPI, "output.exports=[pdf]", "rasterize.pages=2"]))
    [page2] = (tmp_path / "page2" / "exports").glob("report-*.pdf")
    with pikepdf.open(page2) as pdf:
        assert len(pdf.pages) == 1 and "/PageLabels" not in pdf.Root and not list(pdf.open_outline().root)
        assert pdf.is_encrypted and not pdf.allow.extract
        # and the cover not read is not in it, by way of the named destination that points at it either
        assert not [item for item in pdf.objects if isinstance(item, pikepdf.Stream)
                    and b"harbour" in item.read_bytes()]
    [only] = _pdf_words(page2)
    assert "scanned" in [text for text, _ in only]


def test_a_pdf_holding_what_pdfa_refuses_gets_a_pdfa_of_its_pages(tmp_path, page_images):
    """A scanner's PDF with a script run on opening: kept whole, PDF/A validation refused it and the document
    failed as export_failed (the pages alone, as before the whole document was kept, make a valid PDF/A)."""
    source = write_pdf(tmp_path / "scan.pdf", page_images[:1])
    with pikepdf.open(source, allow_overwriting_input=True) as pdf:
        pdf.Root.OpenAction = pikepdf.Dictionary(S=pikepdf.Name.JavaScript, JS=pikepdf.String("app.alert(1)"))
        pdf.save(source)
    [work] = rasterize(PageRange("id", str(source), "pdf", 1, 1), RasterizeConfig(dpi=150))
    with pikepdf.open(io.BytesIO(searchable_pdf([page_row(work)], str(source), pdfa=True))) as pdf:
        assert pdf.open_metadata().pdfa_status == "2B" and "/OpenAction" not in pdf.Root and len(pdf.pages) == 1
    with pikepdf.open(io.BytesIO(searchable_pdf([page_row(work)], str(source)))) as pdf:
        assert "/OpenAction" in pdf.Root  # without PDF/A, the document as it was


def _stamped(pdf: pikepdf.Pdf, page: pikepdf.Page) -> None:
    """A stamp on the page in a font the PDF does not embed (many producers' letterheads): PDF/A refuses the page as
    drawn."""
    page.obj.Resources.Font = pikepdf.Dictionary(F1=pikepdf.Dictionary(
        Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont=pikepdf.Name.Helvetica))
    page.contents_add(pdf.make_stream(b"BT /F1 9 Tf 80 80 Td (Received 1905) Tj ET"))


def test_pdfa_of_pages_it_refuses_as_drawn_holds_them_as_rendered_with_their_text_layers(tmp_path, page_images):
    """A PDF page that shows text in a font it does not embed (many producers' letterheads and stamps) and a CMYK
    JPEG: PDF/A refuses both as they are, and the document had failed as export_failed, every other export of it
    removed. Their pages are now held as the job rendered them, under their text layers. Without PDF/A, a PDF/A
    source's claim is taken out of what is no longer checked to conform."""
    source = write_pdf(tmp_path / "stamped.pdf", page_images[:1])
    with pikepdf.open(source, allow_overwriting_input=True) as pdf:
        page = pdf.pages[0]
        _stamped(pdf, page)
        _, _, width, height = (float(value) for value in page.mediabox)
        page.CropBox = [72, 72, width, height]  # what a viewer shows, and the job read
        pdf.save(source)
    text_page(["A receipt printed in four inks."]).convert("CMYK").save(tmp_path / "cmyk.jpg", dpi=(150, 150))
    for path in (source, tmp_path / "cmyk.jpg"):
        works = rasterize(PageRange("id", str(path), sniff_kind(path.read_bytes()[:1024]), 1, 1),
                          RasterizeConfig(dpi=150))
        _, text = _labelled_pdf(works, path, "Read", pdfa=True)
        with pikepdf.open(path.with_suffix(".out.pdf")) as pdf:
            assert pdf.open_metadata().pdfa_status == "2B" and len(pdf.pages) == 1
            shown = [float(value) * works[0].dpi / 72 for value in pdf.pages[0].cropbox]
            assert abs(shown[2] - shown[0] - works[0].width) <= 1 and abs(shown[3] - shown[1] - works[0].height) <= 1
        assert text.split() == ["Read1"], text
    pdfa = source.with_suffix(".out.pdf")
    with pikepdf.open(io.BytesIO(searchable_pdf([page_row(works[0]) for works in [rasterize(
            PageRange("id", str(pdfa), "pdf", 1, 1), RasterizeConfig(dpi=150))]], str(pdfa)))) as pdf:
        assert pdf.open_metadata().pdfa_status == ""


def test_pdfa_renders_only_the_pages_it_refuses_as_drawn(tmp_path, page_images):
    """One page with a stamp in a font the PDF does not embed had made the PDF/A hold every page as rendered: each
    scan resampled to the job's dpi and stored anew, four times the pixels of a 150-dpi scan (a 600-dpi one would
    have lost three quarters). The other pages now keep their image streams byte for byte."""
    source = write_pdf(tmp_path / "stamped.pdf", page_images[:2])
    with pikepdf.open(source, allow_overwriting_input=True) as pdf:
        _stamped(pdf, pdf.pages[0])
        pdf.save(source)
        scanned = pdf.pages[1].Resources.XObject.image.read_raw_bytes()
    works = rasterize(PageRange("id", str(source), "pdf", 1, 2), RasterizeConfig(dpi=300))
    pdfa, text = _labelled_pdf(works, source, "Read", pdfa=True)
    assert text.split() == ["Read1", "Read2"], text
    with pikepdf.open(pdfa) as pdf:
        assert pdf.open_metadata().pdfa_status == "2B"
        [stamped], [kept] = ([image for image in page.Resources.XObject.values() if image.Subtype == "/Image"]
                             for page in pdf.pages)
        assert "/Font" not in pdf.pages[0].Resources and stamped.Width == works[0].width
        assert kept.read_raw_bytes() == scanned


def test_a_page_qpdf_cannot_parse_gets_its_own_page_and_text_layer_in_the_searchable_pdf(tmp_path):
    """qpdf leaves such a page out of its tree, which the pages of the searchable PDF were taken from by position:
    the export failed (a page past the tree's end), and page 2 alone had shown page 3 under page 2's words."""
    pages = [text_page([f"Sheet {number} " * 3], size=(900, 600)) for number in (1, 2, 3)]
    pages[1] = Image.eval(pages[1], lambda value: value // 2 + 128)  # a grayer page 2, to tell it from page 3
    with pikepdf.open(write_pdf(tmp_path / "three.pdf", pages)) as pdf:
        pdf.pages[1].obj.PieceInfo = 7
        pdf.save(tmp_path / "marked.pdf", object_stream_mode=pikepdf.ObjectStreamMode.disable)
    source = tmp_path / "unparsable.pdf"
    source.write_bytes((tmp_path / "marked.pdf").read_bytes().replace(b"/PieceInfo 7", b"/PieceInfo 99999999999999999999"))
    config = RasterizeConfig(dpi=150, detect_orientation=False)
    plan = triage(str(source), config)
    works = [work for task in page_ranges([plan], 8) for work in rasterize(task, config)]
    assert [work.status for work in works] == ["ok"] * 3
    _, text = _labelled_pdf(works, source, "Page")
    assert text.split() == ["Page1", "Page2", "Page3"], text
    pdf, text = _labelled_pdf(works[1:2], source, "Alone")
    assert text.split() == ["Alone2"], text
    shown = np.asarray(convert_from_path(pdf, dpi=150, grayscale=True)[0]).astype(int)
    assert np.abs(shown - works[1].image).mean() < 3


def test_pdfa_of_rendered_pages_leaves_a_page_the_job_did_not_render_blank(tmp_path, page_images):
    """A page too large for the job was rendered all the same for the PDF/A (a 272-Mpx one ran out of Pillow's
    bomb limit, and the document lost every export); drawn blank at a pixel a point, a 200-inch page did too. It
    keeps its /Rotate (its row had said 0). A page's /UserUnit counts where /Count lies (it had been dropped)."""
    source = write_pdf(tmp_path / "stamped.pdf", page_images[:2])
    with pikepdf.open(source, allow_overwriting_input=True) as pdf:
        for page in pdf.pages:  # PDF/A refuses each page as drawn
            _stamped(pdf, page)
        pdf.pages[0].obj.UserUnit = 2
        pdf.pages[1].MediaBox = [0, 0, 14400, 14400]  # 200 inches square
        pdf.pages[1].Rotate = 90
        pdf.Root.Pages.Count = 3  # one more than it holds
        pdf.save(source)
    config = RasterizeConfig(dpi=150, detect_orientation=False)
    plan = triage(str(source), config)
    works = [work for task in page_ranges([plan], 8) for work in rasterize(task, config)]
    assert [(work.status, work.error_code, work.rotation) for work in works] == [
        ("ok", None, 0), ("failed", "page_too_large", 90)]
    with pikepdf.open(io.BytesIO(searchable_pdf([page_row(work) for work in works], str(source), pdfa=True))) as pdf:
        assert pdf.open_metadata().pdfa_status == "2B"
        shown = [float(value) for value in pdf.pages[0].mediabox]
        assert abs(shown[2] * works[0].dpi / 72 - works[0].width) <= 1  # two points an inch's 72nd: twice the size
        [blank] = pdf.pages[1].get_images().values()
        assert (blank.BitsPerComponent, float(pdf.pages[1].mediabox[2]), pdf.pages[1].Rotate) == (1, 14400, 90)


def test_a_16_bit_colour_tiff_with_a_damaged_frame_gets_a_searchable_pdf_of_the_others(tmp_path):
    """tifffile's codec error on the damaged frame had escaped the export: the document lost every export."""
    samples = np.dstack([np.asarray(text_page(["Sixteen bits a sample"], size=(1000, 300))).astype(np.uint16) * 16] * 3)
    source = tmp_path / "deep.tif"
    with tifffile.TiffWriter(source) as tiff:
        for _ in range(2):
            tiff.write(samples, photometric="rgb", compression="zlib", resolution=(150, 150), rowsperstrip=300)
    with tifffile.TiffFile(source) as tiff:
        offset, count = tiff.pages[1].dataoffsets[0], tiff.pages[1].databytecounts[0]
    data = bytearray(source.read_bytes())
    data[offset + 10:offset + count - 10] = bytes(count - 20)  # zeros inside the second frame's deflate stream
    source.write_bytes(bytes(data))
    works = rasterize(PageRange("id", str(source), "tiff", 1, 2), RasterizeConfig(dpi=150, detect_orientation=False))
    assert [(work.status, work.error_code) for work in works] == [("ok", None), ("failed", "render_failed")]
    _, text = _labelled_pdf(works, source, "Frame")
    assert text.split() == ["Frame1"], text


def test_text_is_looked_for_in_each_form_once(tmp_path):
    """Forms that share one resources dictionary (some producers write one for every page and form) draw each
    other: the search for text on a page had taken every path through them, N**8 parses (hours at 8 forms)."""
    from operators.formats.pdf import _shows_text

    with pikepdf.new() as pdf:
        pdf.add_blank_page()
        shared = pdf.make_indirect(pikepdf.Dictionary(XObject=pikepdf.Dictionary()))
        for index in range(8):
            form = pdf.make_stream(b"0 0 m 10 10 l S", Type=pikepdf.Name.XObject, Subtype=pikepdf.Name.Form,
                                   BBox=[0, 0, 10, 10], Resources=shared)
            shared.XObject[f"/F{index}"] = form
        pdf.pages[0].obj.Resources = shared
        pdf.pages[0].obj.Contents = pdf.make_stream(b"/F0 Do")
        assert not _shows_text(pdf.pages[0].obj)
        shared.XObject.F7.write(b"BT /F1 12 Tf (a word) Tj ET")
        assert _shows_text(pdf.pages[0].obj)


def test_pdf_inputs_keep_their_image_streams_and_the_output_is_pdfa(run, inputs):
    _, output, _, _ = run
    def images(path):
        with pikepdf.open(path) as pdf:
            return [image.read_raw_bytes() for page in pdf.pages for image in page.images.values()]
    original = images(inputs / "letters.pdf")
    assert original and images(_exports(output, "letters.pdf", ".pdf")) == original
    for pdf_path in (output / "exports").glob("*.pdf"):
        with pikepdf.open(pdf_path) as pdf:
            assert pdf.open_metadata().pdfa_status == "2B"
            assert pdf.Root.OutputIntents[0].S == "/GTS_PDFA1"


def test_mets_points_every_page_at_its_image_alto_and_page(run):
    _, output, _, pages = run
    mets_ns = {"mets": "http://www.loc.gov/METS/", "xlink": "http://www.w3.org/1999/xlink"}
    for source in {page["source"] for page in pages}:
        mets_path = _exports(output, source, ".mets.xml")
        hocr = etree.parse(str(_exports(output, source, ".hocr")))
        mets = etree.parse(str(mets_path))
        files = {entry.get("ID"): entry.find("mets:FLocat", mets_ns).get(f"{{{mets_ns['xlink']}}}href")
                 for entry in mets.iterfind(".//mets:file", mets_ns)}
        divs = mets.findall(".//mets:structMap[@TYPE='PHYSICAL']//mets:div[@TYPE='page']", mets_ns)
        assert len(divs) == sum(page["source"] == source for page in pages)
        for div in divs:
            hrefs = sorted(files[pointer.get("FILEID")] for pointer in div.iterfind("mets:fptr", mets_ns))
            number = f"p{int(div.get('ORDER')):04d}"
            assert [href.split(".", 1)[1] for href in hrefs] == [f"{number}.alto.xml", f"{number}.page.xml",
                                                                 f"{number}.png"]
            assert all((mets_path.parent / unquote(href)).is_file() for href in hrefs)
            # ALTO and PAGE name that image, as OCR-D requires, and the reader of `eval --pages` finds it; hOCR too
            # (it had named the source: a PDF, or a photo stored sideways, not the pixels of its boxes)
            alto, page_xml, image = (mets_path.parent / unquote(href) for href in hrefs)
            [hocr_page] = hocr.iterfind(f".//{{*}}div[@id='page_{div.get('ORDER')}']")
            assert hocr_page.get("title").startswith(f'image "{hrefs[2]}";')
            assert etree.parse(str(page_xml)).find("{*}Page").get("imageFilename") == hrefs[2]
            assert etree.parse(str(alto)).findtext(".//{*}sourceImageInformation/{*}fileName") == hrefs[2]
            assert page_image(page_xml, hrefs[2]) == image


@pytest.mark.parametrize("detect_orientation", [False, True])
def test_mets_page_images_are_the_pages_as_the_job_read_them(ray_local, tmp_path, detect_orientation):
    """An upside-down scan: METS's page image is turned exactly when the job turned the page, whatever
    the job's orientation setting (the coordinates of its ALTO and PAGE are pixels of that image)."""
    upright = text_page([f"Line {number} of a letter that was scanned upside down, with Tall Capitals."
                         for number in range(12)])
    upright.rotate(180).save(tmp_path / "turned.png", dpi=(150, 150))
    config = load_config(None, [DPI, f"rasterize.detect_orientation={str(detect_orientation).lower()}",
                                "output.exports=[mets]"])
    run_job([str(tmp_path / "turned.png")], str(tmp_path / "out"), config, mode="detect")  # the text is no matter
    [page] = ds.dataset(f"{tmp_path}/out/pages", format="parquet").to_table().to_pylist()
    assert page["rotation"] == (180 if detect_orientation else 0)
    [image] = (tmp_path / "out" / "exports").glob("turned-*.png")
    expected = upright if detect_orientation else upright.rotate(180)
    assert np.array_equal(np.asarray(Image.open(image).convert("L")), np.asarray(expected))


@pytest.mark.parametrize("rotate", [90, 180])
def test_mets_page_images_of_pdf_pages_with_a_rotate_are_the_pages_a_viewer_shows(ray_local, tmp_path, rotate):
    """A PDF page stored turned, with a /Rotate that shows it upright: its METS image had been turned a second
    time (sideways, or upside down), so ALTO's and PAGE's boxes fell beside the ink."""
    upright = text_page([f"Line {number} of a register page stored on its side." for number in range(8)])
    source = write_pdf(tmp_path / "turned.pdf", [upright.rotate(rotate, expand=True)], dpi=150)
    with pikepdf.open(source, allow_overwriting_input=True) as pdf:
        pdf.pages[0].Rotate = rotate
        pdf.save(source)
    run_job([str(source)], str(tmp_path / "out"), load_config(None, [DPI, "output.exports=[mets]"]), mode="detect")
    [page] = ds.dataset(f"{tmp_path}/out/pages", format="parquet").to_table().to_pylist()
    assert page["rotation"] == rotate
    [work] = rasterize(PageRange("id", str(source), "pdf", 1, 1, rotations=(rotate,)),
                       RasterizeConfig(dpi=150, detect_orientation=False))
    [image] = (tmp_path / "out" / "exports").glob("turned-*.png")
    assert np.array_equal(np.asarray(Image.open(image).convert("L")), work.image)


def test_a_page_over_the_default_pixel_limit_read_under_a_higher_one_gets_its_mets_image(tmp_path):
    """A 251-Mpx page read with ``rasterize.max_page_pixels`` raised: its METS image was missing (rendered again
    under the default limit), while its ALTO and PAGE named it."""
    Image.new("1", (16200, 15500), 1).save(tmp_path / "map.tif", compression="group4", dpi=(300, 300))
    row = {"doc_id": "id", "page": 1, "status": "ok", "lines": [], "dpi": 300, "rotation": 0, "width": 16200,
           "height": 15500}
    assert 16200 * 15500 > RasterizeConfig().max_page_pixels
    [(number, png)] = page_images([row], str(tmp_path / "map.tif"))
    with Image.open(io.BytesIO(png)) as image:
        assert (number, image.size) == (1, (16200, 15500))


def test_the_exports_read_the_source_again_under_the_jobs_render_timeout(tmp_path, page_images):
    """The METS page images and a PDF/A's rendered pages are poppler's renderings of the source made again: they had
    been made under the default ``rasterize`` settings, so a job that gave poppler longer for its slow pages
    (``render_timeout_s``) got its pages read and then their METS images missing and their PDF/A pages blank. Here
    the job's timeout is one no page renders in, and the exports, made through the job's sink, keep to it: the page
    gets no METS image and a blank PDF/A page, and the document is exported all the same."""
    source = write_pdf(tmp_path / "stamped.pdf", page_images[:1])
    with pikepdf.open(source, allow_overwriting_input=True) as pdf:  # PDF/A takes it rendered
        _stamped(pdf, pdf.pages[0])
        pdf.save(source)
    [work] = rasterize(PageRange("id", str(source), "pdf", 1, 1), RasterizeConfig(dpi=150, detect_orientation=False))
    assert work.status == "ok"
    job = RasterizeConfig(dpi=150, render_timeout_s=0.001)
    sink = ParquetSink(str(tmp_path / "out"), rows_per_file=100, exports=("pdf", "mets"), pdfa=True, rasterize=job)
    sink.expect(DocumentRecord("id", str(source), "ok", None, None, 1))
    sink.add_page(work)
    sink.close()
    [document] = ds.dataset(f"{tmp_path}/out/documents", format="parquet").to_table().to_pylist()
    assert (document["status"], document["error_code"]) == ("ok", None)
    exports = tmp_path / "out" / "exports"
    assert list(exports.glob("*.png")) == []
    [mets] = exports.glob("*.mets.xml")
    assert etree.parse(str(mets)).find(".//{*}fileGrp[@USE='OCR-D-IMG']/{*}file") is None
    [pdf_path] = exports.glob("*.pdf")
    with pikepdf.open(pdf_path) as pdf:
        assert pdf.open_metadata().pdfa_status == "2B"
        [blank] = pdf.pages[0].get_images().values()
        assert blank.BitsPerComponent == 1


def test_a_page_pillow_takes_for_a_decompression_bomb_gets_its_searchable_pdf(tmp_path):
    """A 182-Mpx page, under max_page_pixels, which the job read: its searchable PDF, made in the driver (where
    Pillow's limit is its own), had failed the document as export_failed, a DecompressionBombError."""
    Image.new("1", (13500, 13500), 1).save(tmp_path / "plan.tif", compression="group4", dpi=(300, 300))
    row = {"doc_id": "id", "source": str(tmp_path / "plan.tif"), "page": 1, "status": "ok", "lines": [], "dpi": 300,
           "rotation": 0, "width": 13500, "height": 13500}
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS  # as in the driver: other tests here raise it
    assert 13500 * 13500 > 2 * Image.MAX_IMAGE_PIXELS
    with pikepdf.open(io.BytesIO(searchable_pdf([row], row["source"]))) as pdf:
        assert [float(value) for value in pdf.pages[0].MediaBox] == [0, 0, 3240, 3240]


def test_page_words_and_baselines_lie_within_their_lines_as_ocrd_validates_them(run):
    """OCR-D's PAGE validator (ocrd_validators.page_validator: a parent simplified by 1 px, its children within it
    to 1.5 px; a line's text the words' joined by spaces) had found nearly every Word outside its TextLine: a line's
    polygon follows its ink, lower than the box around its words where no letter rises."""
    from shapely.geometry import LineString, Polygon

    _, output, _, _ = run
    ns = {"p": "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"}

    def points(element):
        return [tuple(map(int, point.split(","))) for point in element.get("points").split()]

    def area(element):
        return Polygon(points(element.find("p:Coords", ns))).simplify(1.0)

    files = sorted((output / "exports").glob("*.page.xml"))
    words = 0
    for path in files:
        for region in etree.parse(path).iterfind(".//p:TextRegion", ns):
            for line in region.iterfind("p:TextLine", ns):
                outline = area(line)
                assert outline.is_valid and outline.within(area(region).buffer(1.5))
                baseline = line.find("p:Baseline", ns)
                assert baseline is None or LineString(points(baseline)).within(outline.buffer(1.5))
                for word in line.iterfind("p:Word", ns):
                    words += 1
                    assert area(word).within(outline.buffer(1.5)), (path.name, word.get("id"))
                assert line.findtext("p:TextEquiv/p:Unicode", namespaces=ns) == " ".join(
                    word.findtext("p:TextEquiv/p:Unicode", namespaces=ns) for word in line.iterfind("p:Word", ns))
    assert files and words > 20


def test_mets_files_are_valid_against_the_official_schema_and_name_the_model_that_read_the_text(run):
    """Which model read a document, and which version of it (its weights' SHA-256), is in its documents row and
    its METS: an archive finds what an older model read, to read it again."""
    _, output, _, _ = run
    schema = official_schema("mets.xsd")
    mets_files = list((output / "exports").glob("*.mets.xml"))
    assert len(mets_files) == 4
    weights = hashlib.sha256((DEFAULT_MODEL / "model.safetensors").read_bytes()).hexdigest()
    for path in mets_files:
        mets = etree.parse(str(path))
        assert schema.validate(mets), (path.name, schema.error_log.last_error)
        assert mets.findtext("{*}metsHdr/{*}agent/{*}note") == f"model: printed, model_sha256: {weights}"
    documents = ds.dataset(f"{output}/documents", format="parquet").to_table().to_pylist()
    assert {(row["status"], row["model"], row["model_sha256"]) for row in documents} == {
        ("ok", "printed", weights), ("failed", None, None)}  # broken.pdf failed triage: no model read it


def test_every_file_an_export_writes_is_one_a_rerun_would_replace(run, tmp_path):
    """The names :func:`remove_other_exports` looks for cover every file of every format (PDF, METS with its
    page images and ALTO, PAGE): none is left behind for a rerun to mistake for its own."""
    _, output, _, _ = run
    exports = shutil.copytree(output / "exports", tmp_path / "exports")
    documents = ds.dataset(f"{output}/documents", format="parquet").to_table().to_pylist()
    assert len(list(exports.iterdir())) > 10
    for document in documents:
        remove_other_exports(document, (), str(exports), pafs.LocalFileSystem())
    assert list(exports.iterdir()) == []


def test_show_prints_what_is_published_and_refuses_a_folder_without_output(run, tmp_path, capsys):
    """`show` had printed a traceback for a folder without output, and the pages of a killed run's unpublished
    part."""
    _, output, _, _ = run
    copy = shutil.copytree(output, tmp_path / "copy")
    [part] = (copy / "pages").iterdir()
    shutil.copy(part, copy / "pages" / part.name.replace(part.name[5:17], "00000000dead"))  # a killed run's, unpublished
    assert main(["show", str(copy), "--pages", "99", "--lines", "1"]) == 0
    shown = capsys.readouterr().out
    assert "failed       0 pages" in shown and "broken.pdf (corrupt_file:" in shown
    weights = hashlib.sha256((DEFAULT_MODEL / "model.safetensors").read_bytes()).hexdigest()
    assert f"\nread by printed (weights SHA-256 {weights[:16]}): 4 documents\n" in shown  # not broken.pdf
    assert shown.count("\n--- ") == len(ds.dataset(output / "pages", format="parquet").to_table())
    assert "\ndocuments: 4 ok, 1 failed, 0 duplicates\n" in shown
    # the failed ones alone, as the job's console sends an operator to them beyond its first ten
    assert main(["show", str(copy), "--failed"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 3 and shown[0].startswith("failed       0 pages") and "broken.pdf (corrupt_file:" in shown[0]
    assert shown[1] == "documents: 4 ok, 1 failed, 0 duplicates", shown
    assert main(["show", str(tmp_path / "nothing")]) == ExitCode.bad_args
    assert f"{tmp_path / 'nothing'} does not exist" in capsys.readouterr().err  # it had said it held no output
    (tmp_path / "nothing").mkdir()
    assert main(["show", str(tmp_path / "nothing")]) == ExitCode.bad_args
    assert "holds no trocr-pipeline output" in capsys.readouterr().err
    for folder in ("pages", "documents"):  # a run stopped before it published anything
        (tmp_path / "empty" / folder).mkdir(parents=True)
    assert main(["show", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'empty'} holds no document yet\n"


def test_show_prints_one_line_per_document_whatever_its_name_holds(tmp_path, capsys):
    """A source named with a newline (Linux allows it) had split its document's line in two."""
    sink = ParquetSink(str(tmp_path), rows_per_file=100)
    sink.expect(DocumentRecord("id", "box 1\nletter.pdf", "failed", "corrupt_file", "cannot read box 1\nletter.pdf", 0))
    sink.close()
    assert main(["show", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "failed       0 pages  box 1 letter.pdf (corrupt_file: cannot read box 1 letter.pdf)",
        "documents: 0 ok, 1 failed, 0 duplicates"]
    # another tool's Parquet file there: refused as a run refuses it (it had been shown as holding no document)
    shutil.copy(next((tmp_path / "documents").iterdir()), tmp_path / "documents" / "scores.parquet")
    assert main(["show", str(tmp_path)]) == ExitCode.bad_args
    assert "holds 1 Parquet file(s) trocr-pipeline did not write (scores.parquet)" in capsys.readouterr().err


def test_show_reads_the_text_of_only_the_pages_it_prints(tmp_path, capsys):
    """`show` had loaded every page's text and line geometry to print three pages: 7.5 GB and two minutes for an
    output of 50,000 pages."""
    import tracemalloc

    sink = ParquetSink(str(tmp_path), rows_per_file=20)
    line = LineRecord(bbox=(0, 0, 10, 10), polygon=[(0, 0), (10, 0), (10, 10), (0, 10)], baseline=[(0, 9), (10, 9)],
                      block=0, order=0, confidence=0.5)
    for source in ("box 2/b.pdf", "box 1/a.pdf"):  # the last written is the first shown
        sink.expect(DocumentRecord(source[-5], source, "ok", None, None, 30))
        for page in range(30, 0, -1):
            text = f"{source} page {page} " + "x" * 100_000
            sink.add_page(PageWork(source[-5], source, page, 300, 100, 100, lines=[replace(line, text=text)]))
    sink.close()
    tracemalloc.start()
    try:
        assert main(["show", str(tmp_path), "--pages", "2", "--lines", "1"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    shown = [row[:20] for row in capsys.readouterr().out.splitlines() if row.startswith("box")]
    assert shown == ["box 1/a.pdf page 1 x", "box 1/a.pdf page 2 x"]
    assert peak < 2_000_000, f"{peak:,} bytes for two pages of 200 KB each"


def test_show_tells_a_page_without_lines_from_one_not_recognized(tmp_path, capsys):
    """A read page on which no line was found had been shown as "not recognized", as a detect run's pages are; a page
    that failed, not read at all, is said to have failed, not to have no text found."""
    sink = ParquetSink(str(tmp_path), rows_per_file=20)
    line = LineRecord(bbox=(0, 0, 10, 10), polygon=[(0, 0), (10, 0), (10, 10), (0, 10)], baseline=[(0, 9), (10, 9)],
                      block=0, order=0)
    sink.expect(DocumentRecord("d", "scan.pdf", "ok", None, None, 3))
    sink.add_page(PageWork("d", "scan.pdf", 1, 300, 100, 100))
    sink.add_page(PageWork("d", "scan.pdf", 2, 300, 100, 100, lines=[line]))
    sink.add_page(PageWork("d", "scan.pdf", 3, 300).fail("render_timeout", "poppler timed out"))  # not read at all
    sink.close()
    assert main(["show", str(tmp_path), "--lines", "0", "--pages", "3"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [row for row in shown if row.startswith("---")] == [
        "--- scan.pdf page 1: 0 lines, no text found", "--- scan.pdf page 2: 1 lines, not recognized",
        "--- scan.pdf page 3: 0 lines, failed (render_timeout: poppler timed out)"]
    # a page without text is its heading alone (each had been followed by an empty line)
    assert shown[-1] != "" and "\n\n\n" not in "\n".join(shown), shown


def test_show_counts_the_pages_read_where_pages_left_some_out(tmp_path, capsys):
    """A document read with --pages 1 had been shown as "ok 2 pages", as if both had been read."""
    sink = ParquetSink(str(tmp_path), rows_per_file=20)
    for doc_id, selected in (("a", "1"), ("b", None), ("c", "1-")):
        sink.expect(DocumentRecord(doc_id, f"{doc_id}.pdf", "ok", None, None, 2, pages_selected=selected), 0)
    # a failed one too: "3 pages" had been shown for one failed on a page of the two read
    sink.expect(DocumentRecord("d", "d.pdf", "failed", "render_failed", "1 of 2 pages failed", 3, pages_selected="2-"), 0)
    sink.close()
    assert main(["show", str(tmp_path), "--pages", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ok           1 of 2 pages  a.pdf", "ok           2 pages  b.pdf", "ok           2 pages  c.pdf",
        "failed       2 of 3 pages  d.pdf (render_failed: 1 of 2 pages failed)",
        "documents: 3 ok, 1 failed, 0 duplicates"]


def test_show_heads_a_page_with_its_whole_source_where_another_document_has_its_name(tmp_path, capsys):
    """Pages of box 1/scan.pdf and box 2/scan.pdf had both been headed "scan.pdf"."""
    sink = ParquetSink(str(tmp_path), rows_per_file=20)
    for doc_id, source in (("a", "box 1/scan.pdf"), ("b", "box 2/scan.pdf"), ("c", "box 2/note.pdf")):
        sink.expect(DocumentRecord(doc_id, source, "ok", None, None, 1))
        sink.add_page(PageWork(doc_id, source, 1, 300, 100, 100))
    sink.close()
    assert main(["show", str(tmp_path), "--lines", "0"]) == 0
    assert [row for row in capsys.readouterr().out.splitlines() if row.startswith("---")] == [
        "--- box 1/scan.pdf page 1: 0 lines, no text found", "--- note.pdf page 1: 0 lines, no text found",
        "--- box 2/scan.pdf page 1: 0 lines, no text found"]


def test_pages_selects_the_same_pages_of_every_input(ray_local, inputs, tmp_path):
    # in detect mode, which selects pages as a run does, with no model to load for each of its jobs
    config = load_config(None, [DPI, "rasterize.pages=2", "output.exports=[alto]"])
    summary = run_job([str(inputs / "letters.pdf"), str(inputs / "note.png")], str(tmp_path), config, mode="detect")
    pages = ds.dataset(f"{tmp_path}/pages", format="parquet").to_table().to_pylist()
    assert [(Path(page["source"]).name, page["page"]) for page in pages] == [("letters.pdf", 2)]
    assert sorted(path.name.split(".", 1)[1] for path in (tmp_path / "exports").iterdir()) == ["p0002.alto.xml"]
    documents = ds.dataset(f"{tmp_path}/documents", format="parquet").to_table().to_pylist()
    assert {row["status"] for row in documents} == {"ok"} and summary.written.pages == 1
    # note.png has no page 2: not written (as done with 0 pages, it had kept a run with other pages out for good)
    assert [(Path(row["source"]).name, row["pages_selected"]) for row in documents] == [("letters.pdf", "2")]
    assert summary.unselected == 1 and "1 without a page in --pages" in summary.describe()
    # a later run over the same output with other pages would skip letters.pdf as done, so its other pages would
    # never be read: it is refused, dry or not, before anything is written
    for selection in (None, "1-3"):
        again = load_config(None, [DPI, f"rasterize.pages={selection or 'null'}"])
        for attempt in (dry_run, run_job):
            with pytest.raises(ConfigError, match=f"1 of these documents is in {tmp_path} read with pages 2 "):
                attempt([str(inputs / "letters.pdf"), str(inputs / "note.png")], str(tmp_path), again, mode="detect")
    assert run_job([str(inputs / "letters.pdf")], str(tmp_path), config, mode="detect").documents_skipped == 1
    # a run that selects fewer pages than were read, or none of a document's (note.png has no page 2), loses nothing:
    # it skips them as done (both had been refused)
    whole = tmp_path.with_name(f"{tmp_path.name}-whole")
    both = [str(inputs / "letters.pdf"), str(inputs / "note.png")]
    run_job(both, str(whole), load_config(None, [DPI]), mode="detect")
    assert run_job(both, str(whole), config, mode="detect").documents_skipped == 2
    # selections are compared by the pages they pick: "2-2" picks the same pages as "2"
    same = load_config(None, [DPI, "rasterize.pages=2-2"])
    assert dry_run([str(inputs / "letters.pdf"), str(inputs / "note.png")], str(tmp_path), same, mode="detect").done
    unselected = dry_run([str(inputs / "note.png")], str(tmp_path), config, mode="detect")
    assert "no pages     0 pages" in unselected.describe()
    # and note.png is read by a run that selects its page
    first = load_config(None, [DPI, "rasterize.pages=1"])
    assert run_job([str(inputs / "note.png")], str(tmp_path), first, mode="detect").written.pages == 1


def test_dry_run_lists_documents_and_writes_nothing(inputs, tmp_path, capsys):
    folder = Path(shutil.copytree(inputs, tmp_path / "inputs"))
    shutil.copy(folder / "letters.pdf", folder / "letters2.pdf")  # a run would write it as a duplicate
    (folder / "letters.pdf.md5").write_text("0123\n")
    output = tmp_path / "never"
    code = main(["run", str(folder), "--output", str(output), "--set", DPI, "--dry-run", "--pages", "1-2"])
    result = capsys.readouterr()
    assert code == 4, result.err  # broken.pdf would fail
    assert not output.exists()
    assert "documents: 6 found, 4 to process, 1 failing, 1 duplicates, 0 already done" in result.out
    assert "\nleft out (no document): 1 .md5\n" in result.out  # as the run says it (the dry run had not)
    assert re.search(r"^ok\s+2 pages\s+\S+/letters\.pdf$", result.out, re.MULTILINE)
    assert re.search(r"^duplicate\s+0 pages\s+\S+/letters2\.pdf \(same bytes as \S+/letters\.pdf\)$",
                     result.out, re.MULTILINE)
    assert re.search(r"^failed\s+0 pages\s+\S+broken\.pdf \(corrupt_file: ", result.out, re.MULTILINE)
    assert "work: 5 pages to rasterize, detect and recognize;" in result.out
    assert main(["detect", str(folder), "--output", str(output), "--set", DPI, "--dry-run", "--pages", "1-2"]) == 4
    assert "work: 5 pages to rasterize and detect;" in capsys.readouterr().out  # no recognizing in detect


def test_a_file_still_being_written_is_left_for_a_later_run_which_reads_it(inputs, tmp_path, capsys):
    """rasterize.min_file_age_s: a scan modified lately is neither read nor recorded, the run says so and exits 0, and
    the next run that finds it old enough reads it (a hot folder's hourly run had failed it as broken or
    source_changed, and exited 4)."""
    folder = tmp_path / "hot"
    folder.mkdir()
    for name in ("note.png", "box.jpg"):
        shutil.copy(inputs / name, folder / name)
    hour_ago = time.time() - 3600
    os.utime(folder / "note.png", (hour_ago, hour_ago))
    settle = ["--set", DPI, "--set", "rasterize.min_file_age_s=60"]
    output = tmp_path / "out"

    def recorded() -> list[str]:
        return sorted(row["source"] for row in ds.dataset(f"{output}/documents", format="parquet").to_table().to_pylist())

    assert main(["detect", str(folder), "--output", str(tmp_path / "never"), *settle, "--dry-run"]) == ExitCode.ok
    planned = capsys.readouterr().out
    assert re.search(r"^recent\s+- pages\s+\S+/box\.jpg$", planned, re.MULTILINE)
    assert "documents: 1 found, 1 to process" in planned
    assert "not read yet: 1 file modified less than 60 s ago (rasterize.min_file_age_s), for a later run" in planned
    assert main(["detect", str(folder), "--output", str(output), *settle]) == ExitCode.ok
    said = capsys.readouterr().out
    assert "documents: 1 ok, 0 failed" in said and "\nnot read yet: 1 file modified less than 60 s ago" in said
    assert recorded() == [str(folder / "note.png")]
    os.utime(folder / "box.jpg", (hour_ago, hour_ago))
    assert main(["detect", str(folder), "--output", str(output), *settle]) == ExitCode.ok
    said = capsys.readouterr().out
    assert "documents: 1 ok, 0 failed, 0 duplicates, 1 already done" in said and "not read yet" not in said
    assert recorded() == [str(folder / "box.jpg"), str(folder / "note.png")]


def test_a_log_json_path_that_cannot_be_written_fails_before_any_work(inputs, tmp_path, monkeypatch):
    output = tmp_path / "never"
    result = subprocess.run(CLI + ["run", str(inputs), "--output", str(output), "--log-json",
                                   str(tmp_path / "no-such-folder" / "log.jsonl")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == ExitCode.bad_args, result.stderr
    assert "cannot write the --log-json file" in result.stderr and "no-such-folder" in result.stderr
    assert not output.exists()
    # a URI, read as a path, had become ./s3:/archive/log.jsonl, and been written there where such a folder was
    (tmp_path / "s3:" / "archive").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for only_looking in ([], ["--dry-run"]):
        assert main(["run", str(inputs), "--output", str(output), "--log-json", "s3://archive/log.jsonl",
                     *only_looking]) == ExitCode.bad_args
    assert not output.exists() and not any((tmp_path / "s3:" / "archive").iterdir())


def test_a_log_json_file_on_a_full_disk_stops_the_job_in_one_line(small_disk):
    """A full disk under --log-json had given two chained tracebacks, exit 1 (closing the file flushed again)."""
    (small_disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 4096))
    progress = JobProgress(stream=io.StringIO(), log_json=small_disk / "log.jsonl")
    record = DocumentRecord("id", "a.pdf", "failed", "corrupt_file", "x" * 8192, 0)
    with pytest.raises(WriteFailed, match=f"no space left on the device while writing the --log-json file "
                                          f"{small_disk / 'log.jsonl'}"):
        progress.document_published(record, PagesRead.of([]))
    progress.close()


def test_progress_line_redraws_in_place_on_a_terminal_and_logs_lines_otherwise(tmp_path):
    from io import StringIO

    from operators.records import DocumentRecord, PageWork

    work = PageWork("d", "a.pdf", 1, 150)
    record = DocumentRecord("d", "a.pdf", "ok", None, None, 2)
    for interactive in (True, False):
        stream = StringIO()
        progress = JobProgress(stream=stream, interactive=interactive, interval_s=0)
        progress.start(documents=1, pages=2)
        progress.page_done(work)
        progress.page_done(work)
        progress.document_done(record, [work, work])
        progress.close()
        text = stream.getvalue()
        assert "documents 1/1, pages 2/2" in text and "ETA 0:00" in text
        assert ("\r" in text) == interactive
        assert text.count("\n") == (1 if interactive else 4)  # the work ahead at once, then each step
        if not interactive:
            assert text.startswith("progress: documents 0/1, pages 0/2")


def test_failed_documents_named_in_a_log_bring_no_progress_line_of_their_own():
    """In a log, each of the first failed documents named had been followed by a ``progress:`` line at once."""
    from io import StringIO

    stream = StringIO()
    progress = JobProgress(stream=stream, interactive=False, interval_s=30)
    progress.begin()
    progress.start(documents=3, pages=3)
    for name in "abc":
        progress.document_done(DocumentRecord(name, f"{name}.pdf", "failed", "corrupt_file", "cut off", 0), [])
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["progress", "progress", "failed", "failed", "failed"], lines


def test_the_rate_stands_once_the_last_page_is_done():
    """The live line kept being drawn while the job ended (exports, publishing), its lines/s falling."""
    from io import StringIO

    from operators.records import LineRecord, PageWork

    line = LineRecord(bbox=(0, 0, 10, 10), polygon=[(0, 0), (9, 0), (9, 9)], baseline=[(0, 8), (9, 8)], block=0,
                      order=0)
    progress = JobProgress(stream=StringIO())
    progress.start(documents=1, pages=1)
    time.sleep(0.2)
    progress.page_done(PageWork("d", "a.pdf", 1, 150, lines=[line] * 10))
    done = progress.status()
    time.sleep(0.3)
    assert progress.status().split(", ")[2] == done.split(", ")[2]  # "... lines/s"


def test_the_eta_counts_from_the_first_pages_done_not_from_the_start():
    """Counted from the end of triage, the rate took in Ray's and the model's start: an 8-minute job's first ETA
    had said 34 minutes. The first batch's pages (done together) start the count; no ETA until a page after them."""
    from io import StringIO

    progress = JobProgress(stream=StringIO())
    progress.start(documents=10, pages=10)
    time.sleep(3)  # the recognizers starting
    for _ in range(2):  # the first batch
        progress.page_done(PageWork("d", "a.pdf", 1, 150))
    assert progress.status().endswith("ETA -")
    time.sleep(1.1)
    progress.page_done(PageWork("d", "a.pdf", 1, 150))
    assert progress.status().rsplit(", ", 1)[1] in ("ETA 0:07", "ETA 0:08"), progress.status()  # 1.1 s a page, 7 left


def test_the_live_line_fits_the_terminal_it_is_redrawn_on(monkeypatch):
    """A line wider than the terminal wraps, and each redraw in place had left its first row behind: a job of
    thousands of documents on an 80-column terminal scrolled a row every half second."""
    from io import StringIO

    from operators.records import DocumentRecord, PageWork

    stream = StringIO()
    progress = JobProgress(stream=stream, interactive=True)
    progress.start(documents=4000, pages=12000)
    progress.page_done(PageWork("d", "a.pdf", 1, 150))
    progress.document_done(DocumentRecord("d", "a.pdf", "failed", "corrupt_file", "broken", 1), [])
    for columns, kept in ((200, "lines/s"), (70, "elapsed"), (50, "ETA"), (30, "documents 1/4000 (1 failed),")):
        monkeypatch.setenv("COLUMNS", str(columns))
        progress._show(force=True)
        drawn = stream.getvalue().rsplit("\r\x1b[K", 1)[1]
        assert len(drawn) < columns and kept in drawn, (columns, drawn)


def test_the_live_line_is_as_wide_as_the_terminal_it_is_drawn_on_whatever_stdout_is(monkeypatch):
    """The width had been stdout's, 80 columns where the summary was piped on (``run ... | tee``)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    monkeypatch.delenv("COLUMNS", raising=False)  # pytest's stdout is no terminal: shutil's width would be 80
    terminal, drawn_on = pty.openpty()
    fcntl.ioctl(drawn_on, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    with open(drawn_on, "w", closefd=True) as stream:
        progress = JobProgress(stream=stream, interactive=True)
        progress.start(documents=4000, pages=12000)
        progress.close()
    shown = os.read(terminal, 65536).decode()
    os.close(terminal)
    assert shown and all(len(line) < 40 for line in shown.replace("\x1b[K", "").replace("\r", "\n").splitlines()), shown


def test_progress_says_the_job_is_alive_while_nothing_finishes():
    """A log had no line until the first page finished: none while Ray started, while triage hashed a large
    archive, or while a long first batch ran; a terminal's line stood still."""
    from io import StringIO

    stream = StringIO()
    progress = JobProgress(stream=stream, interval_s=0.5)
    progress.begin()
    time.sleep(1.2)
    progress.triage_started(files=3)
    time.sleep(1.2)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("progress: starting (Ray, the model), 0:0")
    assert lines[-1].startswith("progress: triage: files 0/3, 0:0")


def test_a_logs_progress_lines_come_one_interval_after_the_last_one_shown():
    """On a fixed grid from the start, the line shown once the work ahead was known made the next beat pass
    without one: a log's lines came up to twice the interval apart (54 s for 30)."""
    from io import StringIO

    stream = StringIO()
    progress = JobProgress(stream=stream, interval_s=30.0)
    progress.begin()  # a line at 0 s
    time.sleep(1.0)
    progress.start(documents=1, pages=1)  # a line at 1 s: the next is due at 31 s (at 60 s on the grid)
    due = progress._until_due()
    progress.close()
    assert 29.0 < due <= 30.0, due


def test_a_log_record_on_a_terminal_starts_on_a_line_of_its_own():
    """The live line drawn while Ray started or triage ran had run into the next log record ("0:03 elapsed2026-12-06
    ... WARNING ...")."""
    import logging
    from io import StringIO

    stream = StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        progress = JobProgress(stream=stream, interactive=True)
        progress.begin()
        time.sleep(0.8)
        logging.getLogger("pipeline.job").warning("a record")
        time.sleep(0.8)
        progress.close()
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert "elapsed\r\x1b[Ka record\n\r\x1b[Kstarting" in text, repr(text)
    assert not handler.filters


def test_a_run_on_a_terminal_redraws_its_line_and_leaves_no_colour_reset_after_the_summary(inputs, tmp_path,
                                                                                          joining_ray_local):
    """Ray's bundled colorama, set up when Ray starts, had written ``\\x1b[0m`` to the terminal at exit, after the
    summary."""
    # a detect job on the session's Ray instance: the console is the point, not the model or which instance
    status, text = run_on_a_terminal(CLI + ["detect", str(inputs / "note.png"), "--output", str(tmp_path / "out"),
                                            "--set", DPI], env=joining_ray_local)
    assert status == 0, text
    assert "\r\x1b[Kdocuments 1/1, pages 1/1" in text and "pages: 1 (0 failed)" in text, text
    assert "\r\x1b[Kstarting (Ray), 0:00 elapsed" in text and "the model" not in text, text  # a detect job loads none
    assert "\x1b[0m" not in text, text[-300:]


def test_stderr_filter_drops_ray_core_lines_and_passes_the_rest_at_once(capfd):
    import os
    import time

    from pipeline.progress import without_ray_core_logs

    for _ in range(20):  # a run that exits at once (its output locked) leaves the filter at once
        with without_ray_core_logs():
            pass
    shown = ""
    with without_ray_core_logs():
        os.write(2, b"[2026-01-01 10:00:00,123 E 4242 4242] core_worker.cc:2465: noise\nkept line\n\n"
                    b"[2026-01-01 10:00:00,123 W 4242 4242] rpc_client.h:153: header noise\n"
                    b"[2026-01-01 10:00:00,124 F 4242 4242] logging.cc:99: Check failed: fatal\n"
                    b"\rdocuments 1/2 [2026-01-01 10:00:00,126 W 4242 4242] core_worker.cc:1: glued noise\n"
                    # as Ray forwards the raylet's lines, in colour or not (they had passed, one every 10 s on a
                    # nearly full disk)
                    b"\x1b[33m(raylet)\x1b[0m [2026-12-06 16:01:46,249 E 3672 3686] (raylet) file_system_monitor.cc:116:"
                    b" forwarded noise\n(raylet) [2026-12-06 16:01:56,249 E 3672 3686] (raylet) file_system_monitor.cc:116:"
                    b" plain forwarded noise\n"
                    # as a stopped job's actors are killed: "will be retried", which they are not
                    b"\rdocuments 1/2 \x1b[33m(raylet)\x1b[0m Task MapWorker(MapBatches(_RecognizeBatch)).submit failed."
                    b" There are infinite retries remaining, so the task will be retried. Error: The actor is dead"
                    b" because it was killed by `ray.kill`. killed-actor noise\n"
                    b"\r\x1b[Kdocuments 2/2 redrawn in place [after 2 s]")  # as JobProgress draws it on a terminal
        deadline = time.monotonic() + 10
        while "redrawn in place" not in shown and time.monotonic() < deadline:
            time.sleep(0.05)
            shown += capfd.readouterr().err
        assert "redrawn in place" in shown, "a live progress line must show before its newline, if ever, comes"
    shown += capfd.readouterr().err
    assert "kept line\n\n" in shown and "noise" not in shown
    assert "Check failed: fatal" in shown and "\rdocuments 1/2 \rdocuments 1/2 \r\x1b[Kdocuments 2/2" in shown


def _under_the_stderr_filter(script: str) -> subprocess.CompletedProcess:
    """``script`` run in a process of its own, with ``os`` and :func:`without_ray_core_logs` imported."""
    script = f"import os\nfrom pipeline.progress import without_ray_core_logs\n{script}"
    return subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=60)


def test_a_job_whose_stderr_filter_is_killed_goes_on_writing_to_the_console():
    """The filter killed (the OOM killer, a stray kill) had ended the job at its next progress line with a
    BrokenPipeError, exit 1, the documents it had finished unpublished."""
    result = _under_the_stderr_filter(
        "import signal, sys, time\n"
        "with without_ray_core_logs():\n"
        "    [child] = open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split()\n"
        "    os.kill(int(child), signal.SIGKILL)\n"
        "    time.sleep(1)\n"
        "    print('progress: after the filter', file=sys.stderr, flush=True)\n"
        "print('finished')\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "finished\n", "progress: after the filter\n")


@pytest.mark.parametrize("last_words", [
    # a thread touching the core worker during ray.shutdown()
    "[2026-01-01 10:00:00,125 E 4242 4242] core_worker_process.cc:9: The core worker has already been shutdown. "
    "The process will exit",
    # the GCS gone for 60 s: the local instance stopped under the job (`ray stop`); it had ended the run in silence
    "[2026-12-07 15:44:11,695 E 10618 10858] rpc_client.h:204: Failed to connect to GCS within 60 seconds. GCS may "
    "have been killed. It's either GCS is terminated by `ray stop` or is killed unexpectedly. If it is killed "
    "unexpectedly, see the log file gcs_server.out. The program will terminate"])
def test_rays_last_words_reach_the_console_when_it_ends_the_driver(last_words):
    """Ray ends a driver with _Exit(1) right after an error line saying why: that line must still reach the
    console."""
    result = _under_the_stderr_filter(
        "with without_ray_core_logs():\n"
        f"    os.write(2, {(last_words + chr(10)).encode()!r})\n"
        "    os._exit(1)\n")
    assert result.returncode == 1
    assert last_words.split("] ", 1)[1] in result.stderr
