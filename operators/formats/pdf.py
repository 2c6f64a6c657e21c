"""Searchable PDF: each page as scanned, with an invisible text layer where the words were read.

The text layer is OCRmyPDF's (its fpdf2 renderer, the glyphless font it embeds, every word placed
and stretched onto its box along the line's baseline), drawn from the ``pages`` rows. It is laid
over the original page with pikepdf as a form XObject, so a PDF input keeps its page content and
image streams byte for byte; an image input becomes a page through img2pdf, which embeds JPEG as
is and other images losslessly. PDF/A-2b is written by ``pikepdf.pdfa``, which adds the sRGB
output intent and XMP metadata and validates the bytes it wrote (veraPDF's rules). Where it refuses the document
as it is, the pages alone are tried, then those it refuses alone as poppler renders them, and then every page so
(:data:`FORMS`).
"""

from __future__ import annotations

import io
import logging
import secrets
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import img2pdf
import numpy as np
import pikepdf
import pikepdf.pdfa
from ocrmypdf.font import MultiFontManager
from ocrmypdf.fpdf_renderer import Fpdf2MultiPageRenderer
from ocrmypdf.models.ocr_element import Baseline, BoundingBox, OcrClass, OcrElement
from pdf2image import convert_from_path
from pdf2image.exceptions import PDFPageCountError, PDFPopplerTimeoutError, PDFSyntaxError
from PIL import Image

from operators.formats.geometry import straight_baseline
from operators.errors import DocumentError, RenderFailed
from operators.ingest import (Frame, allow_pixels, local_path, open_image, page_frames, page_units, pdf_info,
                              poppler_pages, quiet_decoders, repaired_pdf, sniff_kind, units_by_page)
from operators.settings import RasterizeConfig
from operators.rasterize import (EXIF_ORIENTATION_TAG, EXIF_ROTATION, MIRRORED_EXIF, decoded_upright, file_resolution,
                                 holds_deep_colour, to_gray8, upright_resolution)

PDFA_FLAVOUR = "2b"
#: What a searchable PDF is made of, tried in this order until PDF/A takes one: the document whole (a PDF input
#: keeps its outline, labels, forms, metadata), its pages alone (PDF/A refuses scripts, forms, attachments), the pages
#: PDF/A refuses as drawn (fonts that are not embedded, device colours without their profile: CMYK JPEGs, many
#: producers' PDFs) as poppler renders them or, of an image, its frames as the job read them, the others as drawn
#: ("mixed"), and every page so rendered.
FORMS = ("whole", "pages", "mixed", "rendered")
#: pdftotext -raw (poppler's content-stream order) puts a space between two words only where their glyphs lie
#: more than 0.15 font sizes apart, whatever space characters the text layer holds; a little more is kept.
RAW_WORD_GAP = 0.17
#: The long side, in pixels, of the blank page that stands for a page the job did not render (it may be 200 inches).
BLANK_PAGE_PIXELS = 1000

log = logging.getLogger(__name__)


def searchable_pdf(pages: Sequence[dict], source: str, pdfa: bool = False,
                   config: RasterizeConfig = RasterizeConfig()) -> bytes:
    """The document's pages (the ``pages`` rows given, in page order) with their text layers; ``config``: the job's
    ``rasterize`` settings, whose pdfinfo and render timeouts hold where poppler reads the source. A PDF keeps what it
    holds besides its pages (outlines, page labels, forms, metadata, and its encryption unless PDF/A is asked
    for, which forbids it); where PDF/A refuses some of that (a script, a form, an attachment), the PDF/A holds
    the pages alone. A page that shows text already (born digital, or OCRed before) gets no second text layer, as
    OCRmyPDF's ``--skip-text`` does, so that its text is not found twice."""
    ordered = sorted(pages, key=lambda row: row["page"])
    with local_path(source) as path, tempfile.TemporaryDirectory(prefix="trocr-pipeline-pdf-") as folder:
        text_path = Path(folder) / "text.pdf"
        Fpdf2MultiPageRenderer([(row["page"], ocr_page(row), row["dpi"]) for row in ordered],
                               MultiFontManager()).render(text_path)
        forms = FORMS if pdfa else FORMS[:1]
        for form in forms[:-1]:
            try:
                return _with_text_layers(path, ordered, text_path, pdfa, form, config)
            except pikepdf.pdfa.PdfaError as error:
                log.info("%s: PDF/A refuses the document's %s form (%s): trying the next", source, form, error)
        return _with_text_layers(path, ordered, text_path, pdfa, forms[-1], config)


def _with_text_layers(path: str, rows: Sequence[dict], text_path: Path, pdfa: bool, form: str,
                      config: RasterizeConfig) -> bytes:
    """The PDF of :func:`searchable_pdf` (its source read from ``path``), the text layers of ``text_path`` laid
    over the pages of :func:`_scanned_pages` in ``form``."""
    with _scanned_pages(path, rows, form, config) as (out, turned, encryption), pikepdf.open(text_path) as text:
        # looked for before any text layer is added: pages that share one resources dictionary (many producers
        # write one for all) would each find the layers of the pages before them there
        shows_text = [_shows_text(page.obj) for page in out.pages]
        with_text = []
        for row, page, already, text_page, shown in zip(rows, out.pages, turned, text.pages, shows_text):
            # EXIF or /Rotate, plus what orientation detection turned, less what the pixels already have
            page.Rotate = (row["rotation"] - already) % 360
            if shown:
                with_text.append(row["page"])
            else:
                # what a viewer shows, and poppler rendered: the CropBox within the MediaBox
                shown_box = pikepdf.Rectangle(page.cropbox) & pikepdf.Rectangle(page.mediabox)
                page.add_overlay(out.copy_foreign(text_page.as_form_xobject()), shown_box)
        if with_text:
            log.info("%s: %d page(s) show text already (page %d first): the searchable PDF adds no text layer to "
                     "them", rows[0]["source"], len(with_text), with_text[0])
        out.docinfo[pikepdf.Name.Creator] = "trocr-pipeline"
        buffer = io.BytesIO()
        if pdfa:
            pikepdf.pdfa.save(out, buffer, PDFA_FLAVOUR)
        else:
            _without_pdfa_claim(out)
            out.save(buffer, encryption=encryption)
        return buffer.getvalue()


def _without_pdfa_claim(pdf: pikepdf.Pdf) -> None:
    """Take a PDF/A source's claim out of its metadata: with a text layer laid over its pages by ``save``, not
    ``pikepdf.pdfa``, nothing checked that it still conforms (a layer's font lacks what PDF/A-1 asks of it)."""
    if "/Metadata" not in pdf.Root:
        return
    with pdf.open_metadata(set_pikepdf_as_editor=False, update_docinfo=False) as metadata:
        for key in ("pdfaid:part", "pdfaid:conformance", "pdfaid:amd"):
            if key in metadata:
                del metadata[key]


#: Content stream operators that show text.
_TEXT_SHOWING = "Tj TJ ' \""


def _shows_text(content: pikepdf.Object, seen: set[tuple[int, int]] | None = None) -> bool:
    """Whether a page, or a form it draws, shows text; each form looked at once (forms may draw each other, in a
    loop, or share one resources dictionary)."""
    seen = set() if seen is None else seen
    if pikepdf.parse_content_stream(content, _TEXT_SHOWING):
        return True
    for form in content.get("/Resources", {}).get("/XObject", {}).values():
        if form.get("/Subtype") == "/Form" and form.objgen not in seen:
            seen.add(form.objgen)
            if _shows_text(form, seen):
                return True
    return False


@contextmanager
def _scanned_pages(path: str, rows: Sequence[dict], form: str, config: RasterizeConfig
                   ) -> Iterator[tuple[pikepdf.Pdf, list[int], bool | pikepdf.Encryption]]:
    """A PDF holding the pages of the ``pages`` rows given, in page order, in ``form`` (:data:`FORMS`): a PDF input
    itself when they are all its pages and the form is whole (qpdf repairs a damaged one as it opens it), else a
    new one of those pages (``--pages``: the original's page labels and outline would name other pages), or of
    their renderings (:func:`_rendered_pages`), which are all there is of a PDF whose page tree, as qpdf walks it,
    lacks a page poppler reads (the job's page numbers are poppler's); :func:`_image_pages` for an image, its
    frames as the job read them when rendered; mixed: the pages PDF/A refuses alone rendered, the others as drawn.
    Also, per page, the degrees its pixels are already turned from the file's own; and the encryption to save it
    with."""
    if form == "mixed":
        with _scanned_pages(path, rows, "pages", config) as (drawn, turns, _):
            refused = [index for index, page in enumerate(drawn.pages) if not _pdfa_takes(page)]
            # refused together only, or each alone: every page rendered (the pages form again had been refused again,
            # and pages all rendered had been rendered again by the last form)
            every = len(refused) in (0, len(rows))
            with _scanned_pages(path, rows if every else [rows[index] for index in refused], "rendered", config) as (
                    rendered, rendered_turns, _), pikepdf.new() as out:
                if every:
                    yield rendered, rendered_turns, False
                    return
                renderings = dict(zip(refused, zip(rendered.pages, rendered_turns)))
                chosen = [renderings.get(index, drawn_page) for index, drawn_page in enumerate(zip(drawn.pages, turns))]
                for page, _ in chosen:
                    out.pages.append(page)
                yield out, [turn for _, turn in chosen], False
        return
    numbers = [row["page"] for row in rows]
    with open(path, "rb") as handle:
        kind = sniff_kind(handle.read(1024))
    if kind == "pdf":
        original, indexes, turns = path, [number - 1 for number in numbers], [0] * len(numbers)
    else:
        # the job read these pages, maybe under a max_page_pixels above the default: Pillow may open them
        allow_pixels(max(row["width"] * row["height"] for row in rows))
        pdf, page_indexes, all_turns = _image_pages(path, {row["page"]: row["dpi"] for row in rows},
                                                    as_read=form == "rendered")
        original = io.BytesIO(pdf)
        indexes, turns = [page_indexes[number - 1] for number in numbers], [all_turns[number - 1] for number in numbers]
    with pikepdf.open(original) as source:
        # its restrictions, under an owner password of its own (the original's cannot be read back): the pages
        # read alone, as links, named destinations and form fields of the original would keep the others in it
        encryption = pikepdf.Encryption(owner=secrets.token_urlsafe(24), allow=source.allow) \
            if source.is_encrypted else False
        if kind == "pdf" and (form == "rendered" or len(source.pages) < _poppler_page_count(path, config)):
            rendered, turns = _rendered_pages(path, rows, config)
            with pikepdf.open(io.BytesIO(rendered)) as images:
                yield images, turns, encryption
            return
        if kind == "pdf" and form == "whole" and indexes == list(range(len(source.pages))):
            yield source, turns, source.is_encrypted  # True: saved under its own encryption
            return
        with pikepdf.new() as out:
            for index in indexes:
                out.pages.append(source.pages[index])
            yield out, turns, encryption


def _pdfa_takes(page: pikepdf.Page) -> bool:
    """Whether PDF/A takes a page as it is drawn, alone in a document of its own."""
    with pikepdf.new() as alone:
        alone.pages.append(page)
        try:
            pikepdf.pdfa.save(alone, io.BytesIO(), PDFA_FLAVOUR)
        except pikepdf.pdfa.PdfaError:
            return False
    return True


def _poppler_page_count(path: str, config: RasterizeConfig) -> int:
    """The pages poppler finds in the PDF at ``path``; 0 where it cannot read it (qpdf repaired it for the job,
    whose pages are then those of qpdf's tree)."""
    try:
        return poppler_pages(pdf_info(path, config))
    except DocumentError:
        return 0


def _rendered_pages(path: str, rows: Sequence[dict], config: RasterizeConfig) -> tuple[bytes, list[int]]:
    """The pages of the rows as poppler renders them from the PDF at ``path`` by their numbers, as the job did (its
    /UserUnit counted, but in colour), in a PDF of images of the pages' real sizes; and the degrees each is turned:
    its /Rotate, which poppler applies. A page the job did not render (too large, timed out) is a blank page of
    its size in points, not rendered again. A damaged PDF is rendered from the copy qpdf repairs, as the job did."""
    try:
        info, readable = pdf_info(path, config), nullcontext(path)
    except DocumentError:
        info, readable = None, repaired_pdf(path)
    with readable as source:
        info = info or pdf_info(source, config)
        units = units_by_page(page_units(source), poppler_pages(info))
        sizes = {number: (width, height) for number, width, height in info["sizes"]}
        pages, turns = [], []
        for row in rows:
            number = row["page"]
            unit = units[number - 1] if number <= len(units) else 1.0
            image = _rendering(source, number, row, unit, config) if row["width"] and row["height"] else None
            buffer = io.BytesIO()
            if image is not None:
                _gray_if_gray(image).save(buffer, format="PNG", dpi=(row["dpi"], row["dpi"]))
                turns.append(info["rotations"][number - 1] if number <= len(info["rotations"]) else 0)
            else:
                width, height = (side * unit for side in sizes.get(number, (612, 792)))
                dpi = min(72.0, BLANK_PAGE_PIXELS * 72 / max(width, height, 1))  # a blank small in pixels, not in size
                Image.new("1", (max(1, round(width * dpi / 72)), max(1, round(height * dpi / 72))), 1).save(
                    buffer, format="PNG", dpi=(dpi, dpi))
                turns.append(0)
            pages.append(buffer.getvalue())
    return img2pdf.convert(pages), turns


def _rendering(source: str, number: int, row: dict, unit: float, config: RasterizeConfig) -> Image.Image | None:
    """Page ``number`` of the PDF at ``source`` as poppler renders it at the row's dpi; None where poppler fails or
    takes longer than the job's ``render_timeout_s`` now (the page is then blank: the job read it, and the export
    must not fail the document)."""
    allow_pixels(row["width"] * row["height"])
    try:
        [image] = convert_from_path(source, dpi=row["dpi"] * unit, first_page=number, last_page=number,
                                    use_cropbox=True, timeout=config.render_timeout_s)
    except (PDFPageCountError, PDFPopplerTimeoutError, PDFSyntaxError, ValueError):
        return None
    return image


def _gray_if_gray(image: Image.Image) -> Image.Image:
    """An RGB rendering of a page in gray, when it is all gray (a black-and-white scan): a third of the bytes."""
    red, green, blue = (np.asarray(band) for band in image.split())
    return image.convert("L") if np.array_equal(red, green) and np.array_equal(green, blue) else image


def _image_pages(path: str, dpis: Mapping[int, int], as_read: bool = False) -> tuple[bytes, list[int], list[int]]:
    """An image file's pages (:func:`page_frames`) in a PDF: its bytes, the PDF page of each page, and the degrees
    each page's pixels are turned. ``dpis``: the dpi the job read pages at (page number -> dpi), which a page
    whose file gives no plausible resolution takes, so that the page's size agrees with the rows' boxes.

    img2pdf embeds the file's own streams (JPEG as is), a PDF page for each frame, previews too. Where it cannot,
    the pages alone are embedded as the job read them instead (mirror and turn undone, lossless PNG), and their
    pixels are then turned by the EXIF turn: a mirrored EXIF orientation (no page's /Rotate can mirror), a frame
    that cannot be decoded (the job failed its page and read the others; here a blank page of its size, or of
    the page before where even its header is damaged), pages of which some give a plausible resolution and some
    not, and what img2pdf refuses or gets wrong (16-bit samples, which it embeds from a PNG as they are, dark where
    they hold 12-bit values; alpha, a raw JPEG 2000 codestream, the frames of an animated PNG, a camera's JPEG whose
    preview is cut off, a TIFF turned by its orientation tag, which Pillow turns as it decodes it and img2pdf turns
    again; a palette with a colour marked transparent), and where ``as_read`` asks for them (PDF/A refuses a CMYK
    JPEG, which img2pdf embeds as it is)."""
    quiet_decoders()
    with open_image(path) as image:
        frames = page_frames(image)
        facts = [(1, None) if frame.damage else _orientation_and_resolution(image, frame.index) for frame in frames]
        orientations = [orientation for orientation, _ in facts]
        fallback = next((dpis[number] for number, (_, resolution) in enumerate(facts, 1)
                         if resolution is None and number in dpis), None)
        plausible = {resolution is not None for _, resolution in facts}
        if not as_read and not any(frame.damage for frame in frames) and not MIRRORED_EXIF.intersection(orientations) \
                and not (image.format == "TIFF" and set(orientations) != {1}) and plausible != {True, False} \
                and not (image.format == "PNG" and (image.mode.startswith("I") or holds_deep_colour(image, path))) \
                and not _keyed_palette(image, frames):
            layout = img2pdf.default_layout_fun if plausible == {True} or fallback is None else \
                img2pdf.get_fixed_dpi_layout_fun((fallback, fallback))
            try:
                pdf = img2pdf.convert(path, rotation=img2pdf.Rotation.ifvalid, layout_fun=layout)
                if _page_count(pdf) == getattr(image, "n_frames", 1):  # a JPEG has no n_frames
                    return pdf, [frame.index for frame in frames], [0] * len(frames)
            except Exception:  # noqa: BLE001 - whatever img2pdf cannot embed is embedded page by page, below
                pass
        pages, size = [], (1000, 1000)
        for frame, (orientation, resolution) in zip(frames, facts):
            buffer = io.BytesIO()
            dpi = resolution or ((fallback, fallback) if fallback else None)
            try:
                if frame.damage:
                    raise ValueError(frame.damage)
                image.seek(frame.index)
                # sizes swap as resolutions do, but Pillow gives a TIFF's size upright already
                size = image.size if image.format == "TIFF" else upright_resolution(image.size, orientation)
                upright = _embeddable(decoded_upright(image, path))
            except (OSError, ValueError, SyntaxError, RenderFailed):
                upright = Image.new("L", (int(size[0]), int(size[1])), 255)
            # without a resolution, img2pdf's default
            upright.save(buffer, format="PNG", **({"dpi": upright_resolution(dpi, orientation)} if dpi else {}))
            pages.append(buffer.getvalue())
    return img2pdf.convert(pages), list(range(len(pages))), [EXIF_ROTATION.get(value, 0) for value in orientations]


def _keyed_palette(image: Image.Image, frames: Sequence[Frame]) -> bool:
    """Whether a frame is a palette image with a colour marked transparent (GIFs, palette PNGs), of which img2pdf
    makes a soft mask of the palette indices: its page had come out nearly white."""
    for frame in frames:
        image.seek(frame.index)
        if image.mode in ("P", "PA") and "transparency" in image.info:
            return True
    return False


def _orientation_and_resolution(image: Image.Image, index: int) -> tuple[int, tuple[int, int] | None]:
    """A frame's EXIF orientation, and its resolution where the file gives a plausible one
    (:func:`operators.rasterize.file_resolution`)."""
    image.seek(index)
    return image.getexif().get(EXIF_ORIENTATION_TAG, 1), file_resolution(image)


def _page_count(pdf: bytes) -> int:
    with pikepdf.open(io.BytesIO(pdf)) as opened:
        return len(opened.pages)


def _embeddable(frame: Image.Image) -> Image.Image:
    """A frame in a mode img2pdf embeds from a PNG: 1-bit, gray, palette or RGB at 8 bits, no alpha (over white
    paper, as the job reads it); deeper gray and other modes as the job's own 8-bit gray."""
    if frame.mode in ("1", "L", "RGB") or (frame.mode == "P" and "transparency" not in frame.info):
        return frame
    if frame.mode in ("RGBA", "LA", "PA", "P", "CMYK", "YCbCr", "HSV"):
        rgba = frame.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return Image.fromarray(to_gray8(frame))


def ocr_page(row: dict) -> OcrElement:
    """A ``pages`` row as OCRmyPDF's page element: lines in reading order, each with its words."""
    lines = []
    for line in sorted(row["lines"], key=lambda item: item["order"]):
        if not line["text"].strip():
            continue
        fitted = straight_baseline(line["baseline"], line["bbox"])
        height = line["bbox"][3] - line["bbox"][1]
        # OCRmyPDF's font size: from the baseline to the line's top
        font_size = height + fitted[1] if fitted and height + fitted[1] > 0 else height
        boxes = _apart([word["bbox"] for word in line["words"]], font_size)
        words = [OcrElement(ocr_class=OcrClass.WORD, bbox=BoundingBox(*box), text=word["text"])
                 for word, box in zip(line["words"], boxes)] or [OcrElement(ocr_class=OcrClass.WORD,
                                                                             bbox=_box(line["bbox"]), text=line["text"])]
        lines.append(OcrElement(ocr_class=OcrClass.LINE, bbox=_box(line["bbox"]), children=words,
                                baseline=Baseline(*fitted) if fitted else None))
    return OcrElement(ocr_class=OcrClass.PAGE, bbox=BoundingBox(0, 0, row["width"], row["height"]),
                      dpi=row["dpi"], page_number=row["page"], children=lines)


def _box(bbox: Sequence[int]) -> BoundingBox:
    return BoundingBox(*(float(value) for value in bbox))


def _apart(boxes: Sequence[Sequence[int]], font_size: float) -> list[list[float]]:
    """A line's word boxes with at least :data:`RAW_WORD_GAP` font sizes between neighbours in x: boxes that hug the
    ink of italic or cursive words are often closer (a j's tail under the word before it), and pdftotext -raw had
    run them together ("ofjalapeño"). Each of two neighbours gives up half of what is missing, at most a quarter of
    its width, so every word still lies on its box."""
    apart = [[float(value) for value in box] for box in boxes]
    in_x = sorted(range(len(boxes)), key=lambda index: boxes[index][0])
    for left, right in zip(in_x, in_x[1:]):
        missing = RAW_WORD_GAP * font_size - (apart[right][0] - apart[left][2])
        if missing > 0:
            apart[left][2] -= min(missing / 2, (boxes[left][2] - boxes[left][0]) / 4)
            apart[right][0] += min(missing / 2, (boxes[right][2] - boxes[right][0]) / 4)
    return apart
