"""Searchable PDF: each page as scanned, with an invisible text layer where the words were read.

The text layer is OCRmyPDF's (its fpdf2 renderer, the glyphless font it embeds, every word placed
and stretched onto its box along the line's baseline), drawn from the ``pages`` rows. It is laid
over the original page with pikepdf as a form XObject, so a PDF input keeps its page content and
image streams byte for byte; an image input becomes a page through img2pdf, which embeds JPEG as
is and other images losslessly. PDF/A-2b is written by ``pikepdf.pdfa``, which adds the sRGB
output intent and XMP metadata and validates the bytes it wrote (veraPDF's rules).
"""

from __future__ import annotations

import io
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import img2pdf
import pikepdf
import pikepdf.pdfa
from ocrmypdf.font import MultiFontManager
from ocrmypdf.fpdf_renderer import Fpdf2MultiPageRenderer
from ocrmypdf.models.ocr_element import Baseline, BoundingBox, OcrClass, OcrElement

from operators.formats.geometry import straight_baseline
from operators.ingest import local_path, sniff_kind

PDFA_FLAVOUR = "2b"


def searchable_pdf(pages: Sequence[dict], source: str, pdfa: bool = False) -> bytes:
    """The document's pages (the ``pages`` rows given, in page order) with their text layers."""
    ordered = sorted(pages, key=lambda row: row["page"])
    with local_path(source) as path, tempfile.TemporaryDirectory(prefix="trocr-pipeline-pdf-") as folder:
        text_path = Path(folder) / "text.pdf"
        Fpdf2MultiPageRenderer([(row["page"], ocr_page(row), row["dpi"]) for row in ordered],
                               MultiFontManager()).render(text_path)
        with _scanned_pages(path, [row["page"] for row in ordered]) as out, pikepdf.open(text_path) as text:
            for row, page, text_page in zip(ordered, out.pages, text.pages):
                page.Rotate = row["rotation"]  # EXIF or /Rotate, plus what orientation detection turned
                page.add_overlay(out.copy_foreign(text_page.as_form_xobject()), pikepdf.Rectangle(page.cropbox))
            out.docinfo[pikepdf.Name.Creator] = "trocr-pipeline"
            buffer = io.BytesIO()
            if pdfa:
                pikepdf.pdfa.save(out, buffer, PDFA_FLAVOUR)
            else:
                out.save(buffer)
            return buffer.getvalue()


@contextmanager
def _scanned_pages(path: str, numbers: list[int]) -> Iterator[pikepdf.Pdf]:
    """A new PDF holding the given 1-based pages of the original: its own pages for a PDF (qpdf
    repairs a damaged one as it opens it), img2pdf pages for an image."""
    with open(path, "rb") as handle:
        kind = sniff_kind(handle.read(1024))
    original = path if kind == "pdf" else io.BytesIO(img2pdf.convert(path, rotation=img2pdf.Rotation.ifvalid))
    with pikepdf.open(original) as source, pikepdf.new() as out:
        for number in numbers:
            out.pages.append(source.pages[number - 1])
        yield out


def ocr_page(row: dict) -> OcrElement:
    """A ``pages`` row as OCRmyPDF's page element: lines in reading order, each with its words."""
    lines = []
    for line in sorted(row["lines"], key=lambda item: item["order"]):
        if not line["text"].strip():
            continue
        words = [OcrElement(ocr_class=OcrClass.WORD, bbox=_box(word["bbox"]), text=word["text"])
                 for word in line["words"]] or [OcrElement(ocr_class=OcrClass.WORD, bbox=_box(line["bbox"]),
                                                           text=line["text"])]
        fitted = straight_baseline(line["baseline"], line["bbox"])
        lines.append(OcrElement(ocr_class=OcrClass.LINE, bbox=_box(line["bbox"]), children=words,
                                baseline=Baseline(*fitted) if fitted else None))
    return OcrElement(ocr_class=OcrClass.PAGE, bbox=BoundingBox(0, 0, row["width"], row["height"]),
                      dpi=row["dpi"], page_number=row["page"], children=lines)


def _box(bbox: Sequence[int]) -> BoundingBox:
    return BoundingBox(*(float(value) for value in bbox))
