"""Export: a finished document's pages as ALTO 4.4, PAGE XML 2019-07-15, hOCR 1.2, plain text, a
searchable PDF (:mod:`operators.formats.pdf`) and a METS package (:mod:`operators.formats.mets`).

The input is exactly what the Parquet output holds (``pages`` rows as :func:`operators.write.
page_row` makes them, and the ``documents`` row), so exports can be written as documents complete
or later from the Parquet files. ALTO and PAGE describe one image each and get one file per page;
hOCR, text, PDF and METS hold a whole document. File names start with the source's name and the doc_id's
first 16 characters, so two sources with the same name never overwrite each other, and a rerun
overwrites its own files.

Word boxes are written where a line carries ``words``; otherwise ALTO gets one String per word
without coordinates and PAGE and hOCR stop at the line. A word's confidence comes from its own
tokens (its line's where a row has none).
"""

from __future__ import annotations

import hashlib
from functools import partial
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
import uuid
from typing import Iterator, Mapping, Sequence
from urllib.parse import quote, unquote

import pyarrow.fs as pafs
from lxml import etree

from operators.formats.geometry import box_within, line_outline, polyline_within, straight_baseline
from operators.settings import EXPORT_FORMATS, RasterizeConfig
from operators.text import xml_text
from operators.formats.mets import IMAGE_GROUP, XSI_NS, mets_document, page_images
from operators.storage import is_uri, move_into_place, resolve_filesystem, writing

SOFTWARE = "trocr-pipeline"

ALTO_NS = "http://www.loc.gov/standards/alto/ns-v4#"
ALTO_SCHEMA = "http://www.loc.gov/alto/v4/alto-4-4.xsd"
PAGE_NS = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"
PAGE_SCHEMA = f"{PAGE_NS}/pagecontent.xsd"
XHTML_NS = "http://www.w3.org/1999/xhtml"
XHTML_DOCTYPE = ('<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
                 '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">')
HOCR_CAPABILITIES = "ocr_page ocr_carea ocr_par ocr_line ocrx_word"

Rows = list[dict]
Rendered = Iterator[tuple[str, bytes]]  # (file name, content)


def write_exports(pages: Sequence[dict], document: dict, formats: Sequence[str], out_dir: str,
                  filesystem: pafs.FileSystem | None = None, pdfa: bool = False, staging: str | None = None,
                  rasterize: RasterizeConfig = RasterizeConfig()) -> list[str]:
    """Write one document in each of ``formats`` under ``out_dir`` and return the paths written. What cannot be
    written raises :class:`operators.errors.WriteFailed`; what cannot be made, the error it met.

    ``out_dir`` is a local path or URI, or a path in ``filesystem`` when one is given. A document
    without pages (it failed before rasterizing) has nothing to export and writes no file. ``mets``
    brings ``alto`` with it (a METS package points at each page's ALTO); ``pdfa`` makes the
    searchable PDF a PDF/A-2b. ``rasterize``: the job's settings, under which the searchable PDF and the METS page
    images read the source again (poppler stopped after its timeouts). With a ``staging`` folder (on the same
    filesystem), each file is written there and moved into place whole, so that a reader (an indexer) never opens
    one half written, nor is one left so by a killed run.
    """
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; choose from {list(EXPORT_FORMATS)}")
    stray = {row["doc_id"] for row in pages} - {document["doc_id"]}
    if stray:
        raise ValueError(f"pages of documents {sorted(stray)} given with document {document['doc_id']}")
    if not pages:
        return []
    filesystem, root = (filesystem, out_dir.rstrip("/")) if filesystem is not None else resolve_filesystem(out_dir)
    what = f"the exports of {document['source']} in {root}"
    with writing(what):
        filesystem.create_dir(root, recursive=True)
    ordered = sorted(pages, key=lambda row: row["page"])
    stem = export_stem(document)
    formats = formats_written(formats)
    # with a METS package, its page images are made first, and ALTO, PAGE, hOCR and the METS name the images made:
    # a page the job read that cannot be rendered again now (poppler failing or timing out) gets none, and its files
    # name the source, not an image that is not there
    images: set[int] | None = set() if "mets" in formats else None
    digests: dict[str, str] = {}  # file name -> SHA-256 of what was written
    renderers = {"png": partial(_image_files, images=images, config=rasterize), "txt": _text_files,
                 "alto": partial(_alto_files, images=images), "page": partial(_page_files, images=images),
                 "hocr": partial(_hocr_files, images=images),
                 "pdf": partial(_pdf_files, pdfa=pdfa, config=rasterize),
                 "mets": partial(_mets_files, formats=formats, images=images, digests=digests)}
    written = []
    # the METS last, as it gives the checksum of each file it names
    for export_format in sorted(dict.fromkeys(("png", *formats) if images is not None else formats),
                                key=lambda name: name == "mets"):
        for name, content in renderers[export_format](ordered, document, stem):  # reads the source for pdf, mets
            digests[name] = hashlib.sha256(content).hexdigest()
            path = f"{root}/{name}"
            target = f"{staging}/{STAGED_EXPORT_PREFIX}{uuid.uuid4().hex}" if staging is not None else path
            with writing(what):
                with filesystem.open_output_stream(target) as stream:
                    stream.write(content)
                if target != path:
                    move_into_place(filesystem, target, path)
            written.append(path)
    with writing(what):
        remove_other_exports(document, written, root, filesystem)
    return written


def formats_written(formats: Sequence[str]) -> tuple[str, ...]:
    """The formats a document is exported in when ``formats`` are asked for: ``mets`` brings ``alto`` (a METS package
    points at each page's ALTO)."""
    return ("alto", *formats) if "mets" in formats and "alto" not in formats else tuple(formats)


def remove_other_exports(document: dict, kept: Sequence[str], root: str, filesystem: pafs.FileSystem) -> None:
    """Delete the export files of ``document`` in ``root`` other than ``kept``: what an unfinished earlier
    attempt at it wrote (a killed run, then a rerun with other formats or pages) would otherwise lie beside
    this run's files as if they were its own. Only this document's own names are looked at, one call."""
    stem = export_stem(document)
    names = [f"{stem}.{suffix}" for suffix in DOCUMENT_SUFFIXES] + [
        _page_file(stem, page, suffix) for page in range(1, document["num_pages"] + 1) for suffix in PAGE_SUFFIXES]
    kept = set(kept)
    paths = [path for path in (f"{root}/{name}" for name in names) if path not in kept]
    for info in filesystem.get_file_info(paths):
        if info.type == pafs.FileType.File:
            filesystem.delete_file(info.path)


def export_stem(document: dict) -> str:
    """``<source file name without suffix>-<first 16 characters of doc_id>``, the name cut to
    ``STEM_BYTES`` so that a long source name plus the suffixes stays a legal file name (255 bytes). Sixteen hex
    digits, as archives name a file ``0001.tif`` in every box: with eight, two of 100,000 such files were likely
    to share a name and overwrite each other's exports."""
    name = document["source"].replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if is_uri(document["source"]):  # the file's own name, as a local one is named (it had kept its %20s)
        name = unquote(name).replace("/", "_")
    base = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    base = base.encode()[:STEM_BYTES].decode("utf-8", "ignore")
    return f"{base}-{document['doc_id'][:16]}"


#: How an export file being written is named in the staging folder (a name of its own: the export's may be 255
#: bytes long).
STAGED_EXPORT_PREFIX = "export-"

#: Bytes of the source name kept in export names, leaving room for the doc_id and the suffixes.
STEM_BYTES = 200
#: What follows the stem in the names of a document's files (:func:`_text_files`, :func:`_hocr_files`,
#: :func:`_pdf_files`, :func:`_mets_files`) and of its pages' files (:func:`_page_file`).
DOCUMENT_SUFFIXES = ("hocr", "txt", "pdf", "mets.xml")
PAGE_SUFFIXES = ("alto.xml", "page.xml", "png")


# --- shared geometry and text ---------------------------------------------------------------


def _blocks(page: dict) -> list[list[dict]]:
    """The page's lines grouped by block, blocks and lines in reading order."""
    blocks: dict[int, list[dict]] = {}
    for line in sorted(page["lines"], key=lambda item: item["order"]):
        blocks.setdefault(line["block"], []).append(line)
    return list(blocks.values())


def _union(lines: list[dict]) -> tuple[int, int, int, int]:
    boxes = [line["bbox"] for line in lines]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


def _rectangle(bbox: Sequence[int]) -> list[tuple[int, int]]:
    """The outline of a box's pixels (x1, y1 exclusive), as polygons give them: the box of a line at the page's
    right edge had put a region's corner one pixel beyond the page."""
    x0, y0, x1, y1 = bbox
    return [(x0, y0), (x1 - 1, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]


def _outline(line: dict) -> list[tuple[int, int]]:
    """The line polygon, or its box when the polygon cannot span an area."""
    polygon = [tuple(point) for point in line["polygon"]]
    return polygon if len(polygon) >= 3 else _rectangle(line["bbox"])


def _points(points: list[tuple[int, int]]) -> str:
    """``x1,y1 x2,y2 ...`` (the form ALTO recommends and PAGE requires), never negative."""
    return " ".join(f"{max(0, int(x))},{max(0, int(y))}" for x, y in points)


def _confidence(value: float | None) -> str | None:
    return None if value is None else f"{min(1.0, max(0.0, value)):.4f}"


def _word_confidence(word: dict, line: dict) -> float | None:
    """The word's own confidence; its line's in output written before words had one."""
    return word["confidence"] if word.get("confidence") is not None else line["confidence"]


def _a(tag: str) -> str:
    return f"{{{ALTO_NS}}}{tag}"


def _p(tag: str) -> str:
    return f"{{{PAGE_NS}}}{tag}"


def _h(tag: str) -> str:
    return f"{{{XHTML_NS}}}{tag}"


def _set(element: etree._Element, **attributes: object) -> etree._Element:
    """Set the attributes that have a value (None means absent)."""
    for name, value in attributes.items():
        if value is not None:
            element.set(name, str(value))
    return element


def _failure(page: dict) -> str | None:
    if page["status"] == "ok":
        return None
    return f"page failed ({page['error_code']}): {page['error_message']}"


def _software_version() -> str:
    try:
        return version(SOFTWARE)
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _xml_bytes(root: etree._Element, doctype: str | None = None) -> bytes:
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True, doctype=doctype)


# --- ALTO 4.4 -------------------------------------------------------------------------------


def _page_file(stem: str, page: int, suffix: str) -> str:
    return f"{stem}.p{page:04d}.{suffix}"


def _image_name(page: dict, stem: str, images: set[int] | None) -> str:
    """The image ALTO, PAGE and hOCR name: with a METS package, its image of the page where one was made (OCR-D: the
    image their coordinates are pixels of, referenced in the METS, written as its href there), else the source
    file."""
    return quote(_page_file(stem, page["page"], "png")) if images and page["page"] in images else page["source"]


def _turn(page: dict, image: str) -> int:
    """Degrees clockwise the image a file names was turned to read upright, which its coordinates are pixels of: the
    page's ``rotation`` where it names the source file, none where it names the METS image of the upright page."""
    return (page.get("rotation") or 0) if image == page["source"] else 0


#: How each format says a named image was turned (:func:`_turn`): nothing outside the Parquet had said so.
TURN_NOTE = ("the coordinates are pixels of the page upright: its stored image turned {turn} degrees clockwise, by its "
             "EXIF orientation or PDF /Rotate (which viewers apply) and any quarter turn orientation detection added, "
             "and a mirroring its EXIF orientation asks for undone")


def _alto_files(pages: Rows, document: dict, stem: str, images: set[int] | None) -> Rendered:
    for page in pages:
        yield _page_file(stem, page["page"], "alto.xml"), _xml_bytes(alto_page(page, _image_name(page, stem, images),
                                                                               model_settings(document)))


def alto_page(page: dict, image: str, model: str | None = None) -> etree._Element:
    """One page as an ALTO 4.4 document: blocks in reading order, line polygons, word Strings. ``model``: what
    read the text (:func:`model_settings`)."""
    root = etree.Element(_a("alto"), nsmap={None: ALTO_NS, "xsi": XSI_NS})
    root.set(f"{{{XSI_NS}}}schemaLocation", f"{ALTO_NS} {ALTO_SCHEMA}")
    _alto_description(root, image, model, _turn(page, image))
    number = page["page"]
    blocks = _blocks(page)
    if blocks:
        group = etree.SubElement(etree.SubElement(root, _a("ReadingOrder")), _a("OrderedGroup"), ID=f"p{number}_ro")
        for index in range(1, len(blocks) + 1):
            etree.SubElement(group, _a("ElementRef"), ID=f"p{number}_ro{index}", REF=f"p{number}_b{index}")
    page_element = _set(etree.SubElement(etree.SubElement(root, _a("Layout")), _a("Page")), ID=f"p{number}",
                        PHYSICAL_IMG_NR=number, WIDTH=page["width"], HEIGHT=page["height"],
                        PROCESSING="processing", QUALITY_DETAIL=_failure(page))
    space = _set(etree.SubElement(page_element, _a("PrintSpace")), HPOS=0, VPOS=0,
                 WIDTH=page["width"], HEIGHT=page["height"])
    line_number = 0
    for block_number, lines in enumerate(blocks, start=1):
        block = _alto_box(etree.SubElement(space, _a("TextBlock"), ID=f"p{number}_b{block_number}"), _union(lines))
        for line in lines:
            line_number += 1
            _alto_line(block, line, f"p{number}_l{line_number}")
    return root


def model_settings(document: dict) -> str | None:
    """The model that read a document's text, as its documents row names it, for the exports' processing
    metadata; None where no model read it (``detect``)."""
    if not document.get("model"):
        return None
    return f"model: {document['model']}" + (f", model_sha256: {document['model_sha256']}"
                                            if document.get("model_sha256") else "")


def _alto_description(root: etree._Element, image: str, model: str | None, turn: int) -> None:
    """Pixel units, the page's image, and the processing step (referenced by each Page), with the model's
    settings; the turn of the image, a step before it."""
    description = etree.SubElement(root, _a("Description"))
    etree.SubElement(description, _a("MeasurementUnit")).text = "pixel"
    image_information = etree.SubElement(description, _a("sourceImageInformation"))
    etree.SubElement(image_information, _a("fileName")).text = xml_text(image)
    if turn:
        turning = etree.SubElement(description, _a("Processing"), ID="turning")
        etree.SubElement(turning, _a("processingCategory")).text = "preOperation"
        etree.SubElement(turning, _a("processingStepDescription")).text = TURN_NOTE.format(turn=turn)
        etree.SubElement(turning, _a("processingStepSettings")).text = f"rotation: {turn}"
    processing = etree.SubElement(description, _a("Processing"), ID="processing")
    etree.SubElement(processing, _a("processingCategory")).text = "contentGeneration"
    etree.SubElement(processing, _a("processingStepDescription")).text = (
        "text line detection (OpenCV) and line recognition (TrOCR)")
    if model:
        etree.SubElement(processing, _a("processingStepSettings")).text = xml_text(model)
    software = etree.SubElement(processing, _a("processingSoftware"))
    etree.SubElement(software, _a("softwareName")).text = SOFTWARE
    etree.SubElement(software, _a("softwareVersion")).text = _software_version()


def _alto_box(element: etree._Element, bbox: Sequence[int]) -> etree._Element:
    x0, y0, x1, y1 = bbox
    return _set(element, HPOS=x0, VPOS=y0, WIDTH=x1 - x0, HEIGHT=y1 - y0)


def _alto_line(block: etree._Element, line: dict, line_id: str) -> None:
    element = _alto_box(etree.SubElement(block, _a("TextLine"), ID=line_id), line["bbox"])
    if len(line["baseline"]) >= 2:
        _set(element, BASELINE=_points(line["baseline"]))
    shape = etree.SubElement(element, _a("Shape"))
    etree.SubElement(shape, _a("Polygon"), POINTS=_points(_outline(line)))
    words = line.get("words")
    strings = ([(word["text"], word["bbox"], _word_confidence(word, line)) for word in words] if words
               else [(text, None, line["confidence"]) for text in line["text"].split()]
               or [("", None, line["confidence"])])
    for index, (text, bbox, confidence) in enumerate(strings, start=1):
        if index > 1:
            etree.SubElement(element, _a("SP"))
        string = etree.SubElement(element, _a("String"), ID=f"{line_id}_w{index}", CONTENT=xml_text(text))
        if bbox is not None:
            _alto_box(string, bbox)
        _set(string, WC=_confidence(confidence))


# --- PAGE XML 2019-07-15 --------------------------------------------------------------------


def _page_files(pages: Rows, document: dict, stem: str, images: set[int] | None) -> Rendered:
    for page in pages:
        yield _page_file(stem, page["page"], "page.xml"), _xml_bytes(page_xml(page, _image_name(page, stem, images),
                                                                              document))


def page_xml(page: dict, image: str, document: dict | None = None) -> etree._Element:
    """One page as a PAGE XML document: regions in a reading order, line polygons, Words, TextEquivs; with its
    ``document``'s row, the model that read it."""
    root = etree.Element(_p("PcGts"), nsmap={None: PAGE_NS, "xsi": XSI_NS})
    root.set(f"{{{XSI_NS}}}schemaLocation", f"{PAGE_NS} {PAGE_SCHEMA}")
    _page_metadata(root, _failure(page), document or {}, _turn(page, image))
    number = page["page"]
    element = etree.SubElement(root, _p("Page"), imageFilename=xml_text(image),
                               imageWidth=str(page["width"]), imageHeight=str(page["height"]))
    if page["dpi"]:
        _set(element, imageXResolution=page["dpi"], imageYResolution=page["dpi"], imageResolutionUnit="PPI")
    blocks = _blocks(page)
    if blocks:
        group = etree.SubElement(etree.SubElement(element, _p("ReadingOrder")), _p("OrderedGroup"),
                                 id=f"p{number}_ro", caption="Regions reading order")
        for index in range(len(blocks)):
            etree.SubElement(group, _p("RegionRefIndexed"), index=str(index), regionRef=f"p{number}_r{index + 1}")
    line_number = 0
    for block_number, lines in enumerate(blocks, start=1):
        region = etree.SubElement(element, _p("TextRegion"), id=f"p{number}_r{block_number}")
        etree.SubElement(region, _p("Coords"), points=_points(_rectangle(_union(lines))))
        for line in lines:
            line_number += 1
            _page_line(region, line, f"p{number}_l{line_number}")
        _text_equiv(region, "\n".join(line["text"] for line in lines), None)
    return root


def _page_metadata(root: etree._Element, failure: str | None, document: dict, turn: int) -> None:
    """Creator and the time of writing in UTC; a failed page's error goes into the Comments; the model that read the
    text, and the turn of the image, as OCR-D processors give their parameters (a processingStep's labels)."""
    metadata = etree.SubElement(root, _p("Metadata"))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    etree.SubElement(metadata, _p("Creator")).text = f"{SOFTWARE} {_software_version()}"
    etree.SubElement(metadata, _p("Created")).text = stamp
    etree.SubElement(metadata, _p("LastChange")).text = stamp
    if failure:
        etree.SubElement(metadata, _p("Comments")).text = xml_text(failure)
    if document.get("model"):
        step = etree.SubElement(metadata, _p("MetadataItem"), type="processingStep",
                                name="recognition/text-recognition", value=SOFTWARE)
        labels = etree.SubElement(step, _p("Labels"), externalModel="ocrd-tool", externalId="parameters")
        for key in ("model", "model_sha256"):
            if document.get(key):
                etree.SubElement(labels, _p("Label"), type=key, value=xml_text(document[key]))
    if turn:
        step = etree.SubElement(metadata, _p("MetadataItem"), type="processingStep",
                                name="preprocessing/optimization/deskewing", value=SOFTWARE)
        labels = etree.SubElement(step, _p("Labels"), externalModel="ocrd-tool", externalId="parameters")
        etree.SubElement(labels, _p("Label"), type="rotation", value=str(turn), comments=TURN_NOTE.format(turn=turn))


def _page_line(region: etree._Element, line: dict, line_id: str) -> None:
    """A TextLine whose Baseline and Words lie within its polygon, as PAGE consumers check: cut to it."""
    element = etree.SubElement(region, _p("TextLine"), id=line_id)
    polygon = _outline(line)
    etree.SubElement(element, _p("Coords"), points=_points(polygon))
    outline = line_outline(polygon)
    baseline = polyline_within(line["baseline"], outline)
    if baseline:
        etree.SubElement(element, _p("Baseline"), points=_points(baseline))
    confidence = _confidence(line["confidence"])
    for index, word in enumerate(line.get("words") or [], start=1):
        word_element = etree.SubElement(element, _p("Word"), id=f"{line_id}_w{index}")
        points = box_within(word["bbox"], outline) or _rectangle(word["bbox"])
        etree.SubElement(word_element, _p("Coords"), points=_points(points))
        _text_equiv(word_element, word["text"], _confidence(_word_confidence(word, line)))
    _text_equiv(element, line["text"], confidence)


def _text_equiv(parent: etree._Element, text: str, confidence: str | None) -> None:
    equiv = _set(etree.SubElement(parent, _p("TextEquiv")), conf=confidence)
    etree.SubElement(equiv, _p("Unicode")).text = xml_text(text)


# --- hOCR 1.2 -------------------------------------------------------------------------------


def _hocr_files(pages: Rows, document: dict, stem: str, images: set[int] | None) -> Rendered:
    names = {page["page"]: _image_name(page, stem, images) for page in pages}
    yield f"{stem}.hocr", _xml_bytes(hocr_document(pages, document, names), doctype=XHTML_DOCTYPE)


def hocr_document(pages: Rows, document: dict, images: Mapping[int, str]) -> etree._Element:
    """All pages of a document as one hOCR 1.2 XHTML file: page, content area, paragraph, line, word. ``images``:
    page number -> the image each page's ``image`` property names."""
    root = etree.Element(_h("html"), nsmap={None: XHTML_NS})
    head = etree.SubElement(root, _h("head"))
    etree.SubElement(head, _h("title")).text = xml_text(document["source"])
    etree.SubElement(head, _h("meta"), {"http-equiv": "Content-Type", "content": "text/html; charset=utf-8"})
    etree.SubElement(head, _h("meta"), name="ocr-system", content=f"{SOFTWARE} {_software_version()}")
    etree.SubElement(head, _h("meta"), name="ocr-capabilities", content=HOCR_CAPABILITIES)
    etree.SubElement(head, _h("meta"), name="ocr-number-of-pages", content=str(len(pages)))
    body = etree.SubElement(root, _h("body"))
    for page in pages:
        _hocr_page(body, page, images[page["page"]])
    for element in body.iter():
        if len(element) == 0 and element.text is None:
            element.text = ""  # <div></div>, not <div/>, which HTML parsers read as an open tag
    return root


def _hocr_page(body: etree._Element, page: dict, image: str) -> None:
    number = page["page"]
    quoted = xml_text(image).replace('"', "%22")
    title = f'image "{quoted}"; bbox 0 0 {page["width"]} {page["height"]}; ppageno {number - 1}'
    if page["dpi"]:
        title += f"; scan_res {page['dpi']} {page['dpi']}"
    if turn := _turn(page, image):  # an engine's own property, as hOCR names them (x_)
        title += f"; x_rotation {turn}"
    element = etree.SubElement(body, _h("div"), {"class": "ocr_page", "id": f"page_{number}", "title": title})
    line_number = 0
    for block_number, lines in enumerate(_blocks(page), start=1):
        bbox = _hocr_bbox(_union(lines))
        area = etree.SubElement(element, _h("div"), {"class": "ocr_carea", "id": f"block_{number}_{block_number}",
                                                    "title": bbox})
        paragraph = etree.SubElement(area, _h("p"), {"class": "ocr_par", "id": f"par_{number}_{block_number}",
                                                    "title": bbox})
        for line in lines:
            line_number += 1
            _hocr_line(paragraph, line, f"{number}_{line_number}")


def _hocr_line(paragraph: etree._Element, line: dict, line_id: str) -> None:
    confidence = "" if line["confidence"] is None else f"; x_wconf {_percent(line['confidence'])}"
    title = _hocr_bbox(line["bbox"]) + _hocr_baseline(line["baseline"], line["bbox"]) + confidence
    element = etree.SubElement(paragraph, _h("span"), {"class": "ocr_line", "id": f"line_{line_id}", "title": title})
    words = line.get("words")
    if not words:
        element.text = xml_text(line["text"])
        return
    for index, word in enumerate(words, start=1):
        word_confidence = _word_confidence(word, line)
        word_title = _hocr_bbox(word["bbox"]) + ("" if word_confidence is None
                                                 else f"; x_wconf {_percent(word_confidence)}")
        span = etree.SubElement(element, _h("span"), {"class": "ocrx_word", "id": f"word_{line_id}_{index}",
                                                     "title": word_title})
        span.text = xml_text(word["text"])
        span.tail = " " if index < len(words) else ""  # not None: lxml would indent inside a one-word line


def _hocr_bbox(bbox: Sequence[int]) -> str:
    return "bbox " + " ".join(str(int(value)) for value in bbox)


def _hocr_baseline(baseline: Sequence[Sequence[int]], bbox: Sequence[int]) -> str:
    fitted = straight_baseline(baseline, bbox)
    return "" if fitted is None else f"; baseline {fitted[0]:.4f} {round(fitted[1])}"


def _percent(confidence: float) -> int:
    """hOCR confidences are 0-100."""
    return round(100 * min(1.0, max(0.0, confidence)))


# --- plain text -----------------------------------------------------------------------------


def _text_files(pages: Rows, document: dict, stem: str) -> Rendered:
    """Page texts in page order, each ending in a newline, separated by form feeds."""
    yield f"{stem}.txt", "\f".join(page["text"] + "\n" for page in pages).encode("utf-8")


# --- searchable PDF and METS -------------------------------------------------------------------


def _pdf_files(pages: Rows, document: dict, stem: str, pdfa: bool, config: RasterizeConfig) -> Rendered:
    from operators.formats.pdf import searchable_pdf  # OCRmyPDF and pikepdf.pdfa: only for PDF exports

    yield f"{stem}.pdf", searchable_pdf(pages, document["source"], pdfa, config)


def _image_files(pages: Rows, document: dict, stem: str, images: set[int], config: RasterizeConfig) -> Rendered:
    """The METS package's page images (PNG), each page's number added to ``images`` as it is made."""
    for number, png in page_images(pages, document["source"], config):
        images.add(number)
        yield _page_file(stem, number, "png"), png


def _mets_files(pages: Rows, document: dict, stem: str, formats: Sequence[str], images: set[int],
                digests: Mapping[str, str]) -> Rendered:
    """The METS pointing at the page images made (:func:`_image_files`) and at the ALTO and PAGE files, with the
    SHA-256 of each (``digests``: file name -> digest of the files written before it)."""
    numbers = [page["page"] for page in pages]
    groups = {IMAGE_GROUP: ("image/png", {number: _page_file(stem, number, "png") for number in images})}
    for export_format, use, mimetype in (("alto", "OCR-D-OCR-ALTO", "application/alto+xml"),
                                         ("page", "OCR-D-OCR-PAGE", "application/vnd.prima.page+xml")):
        if export_format in formats:
            groups[use] = (mimetype, {number: _page_file(stem, number, f"{export_format}.xml") for number in numbers})
    yield f"{stem}.mets.xml", _xml_bytes(mets_document(document, numbers, groups,
                                                       f"{SOFTWARE} {_software_version()}", digests,
                                                       model_settings(document)))
