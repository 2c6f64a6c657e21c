"""ALTO, PAGE, hOCR and text exports of page rows made by the real reassembly code.

Structure is checked with lxml; the official ALTO 4.4 and PAGE 2019 schemas are also applied when
the dev data checkout ``../shared/schemas`` sits next to the repository.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import img2pdf
import pyarrow.fs as pafs
import pytest
from lxml import etree
from PIL import Image

from conftest import official_schema
from operators.formats.export import (ALTO_NS, PAGE_NS, XHTML_NS, alto_page, export_stem, hocr_document, page_xml,
                                      write_exports)
from operators.formats.mets import IMAGE_GROUP, mets_document
from operators.write import page_row
from operators.records import LineRecord, PageWork

SIZE = (1240, 1754)
DOC_ID = "0123456789abcdef"
SOURCE = "scans/Box 3/letter.final.pdf"
TRICKY = 'Fish & Chips <cheap> "fresh"'
ALTO = {"a": ALTO_NS}
PAGE = {"p": PAGE_NS}
XHTML = {"h": XHTML_NS}


def _line(block: int, order: int, x0: int, y0: int, text: str, confidence: float | None) -> LineRecord:
    x1, y1 = x0 + 500, y0 + 40
    polygon = [(x0, y0 + 2), (x0 + 250, y0), (x1, y0 + 3), (x1, y1), (x0, y1 - 1)]
    baseline = [(x0, y1 - 9), (x0 + 250, y1 - 10), (x1, y1 - 8)]
    return LineRecord(bbox=(x0, y0, x1, y1), polygon=polygon, baseline=baseline, block=block, order=order, text=text,
                      confidence=confidence)


def _row(page: int, lines: list[LineRecord], status: str = "ok", with_words: bool = True) -> dict:
    """A pages row from :func:`page_row` (which splits each line into words), or with words removed."""
    work = PageWork(doc_id=DOC_ID, source=SOURCE, page=page, dpi=150, width=SIZE[0], height=SIZE[1], lines=lines)
    if status == "failed":
        work.fail("recognition_failed", "model ran out of memory <&>")
    row = page_row(work)
    if not with_words:
        for line in row["lines"]:
            line["words"] = []
    return row


@pytest.fixture()
def pages() -> list[dict]:
    """Page 1: two blocks given out of order; page 2: empty; page 3: failed; page 4: lines without words."""
    first = [
        _line(1, 2, 700, 200, "right column first line", 0.8),
        _line(0, 0, 100, 200, TRICKY, 0.9375),
        _line(0, 1, 100, 260, "second line of the left column", None),
    ]
    return [
        _row(3, [], status="failed"),
        _row(1, first),
        _row(2, []),
        _row(4, [_line(0, 0, 100, 100, "no word boxes here", 0.5)], with_words=False),
    ]


@pytest.fixture()
def document() -> dict:
    return {"doc_id": DOC_ID, "source": SOURCE, "status": "failed", "error_code": "recognition_failed",
            "error_message": "1 of 4 pages failed", "num_pages": 4, "model": "printed", "model_sha256": "5e" * 32}


@pytest.fixture()
def exported(tmp_path, pages, document) -> dict[str, Path]:
    paths = write_exports(pages, document, ["alto", "page", "hocr", "txt"], str(tmp_path))
    return {Path(path).name: Path(path) for path in paths}


def _parse(exported: dict[str, Path], suffix: str) -> etree._ElementTree:
    return etree.parse(str(exported[f"letter.final-0123456789abcdef{suffix}"]))


def test_one_file_per_page_for_alto_and_page_one_per_document_for_hocr_and_text(exported):
    stem = "letter.final-0123456789abcdef"
    expected = {f"{stem}.p{n:04d}.{kind}.xml" for n in range(1, 5) for kind in ("alto", "page")}
    assert set(exported) == expected | {f"{stem}.hocr", f"{stem}.txt"}
    assert export_stem({"doc_id": "ffee" * 8, "source": "s3://bucket/in/scan"}) == "scan-ffeeffeeffeeffee"
    # a URI's file is named as on a disk: "letter%20%232" had named the exports of s3://.../letter #2.pdf
    assert export_stem({"doc_id": "ffee" * 8, "source": "s3://bucket/in/letter%20%232%2Fb.pdf"}) == (
        "letter #2_b-ffeeffeeffeeffee")


def test_alto_page_holds_blocks_in_reading_order_with_polygons_words_and_confidences(exported, pages):
    tree = _parse(exported, ".p0001.alto.xml")
    assert tree.getroot().tag == f"{{{ALTO_NS}}}alto"
    assert tree.findtext("a:Description/a:MeasurementUnit", namespaces=ALTO) == "pixel"
    assert tree.findtext("a:Description/a:sourceImageInformation/a:fileName", namespaces=ALTO) == SOURCE
    assert tree.findtext(".//a:processingSoftware/a:softwareName", namespaces=ALTO) == "trocr-pipeline"
    # which model read the text, and which version of it: an archive re-reads what an older one read
    assert tree.findtext(".//a:processingStepSettings", namespaces=ALTO) == f"model: printed, model_sha256: {'5e' * 32}"
    page = tree.find("a:Layout/a:Page", ALTO)
    assert (page.get("WIDTH"), page.get("HEIGHT"), page.get("PHYSICAL_IMG_NR")) == ("1240", "1754", "1")
    blocks = page.findall(".//a:TextBlock", ALTO)
    refs = [ref.get("REF") for ref in tree.findall("a:ReadingOrder/a:OrderedGroup/a:ElementRef", ALTO)]
    assert refs == [block.get("ID") for block in blocks] and len(blocks) == 2
    lines = page.findall(".//a:TextLine", ALTO)
    row_lines = pages[1]["lines"]
    assert [len(block.findall("a:TextLine", ALTO)) for block in blocks] == [2, 1]
    assert [" ".join(s.get("CONTENT") for s in line.findall("a:String", ALTO)) for line in lines] == [
        TRICKY, "second line of the left column", "right column first line"]
    first = lines[0]
    assert first.find("a:Shape/a:Polygon", ALTO).get("POINTS") == "100,202 350,200 600,203 600,240 100,239"
    assert first.get("BASELINE") == "100,231 350,230 600,232"
    strings = first.findall("a:String", ALTO)
    assert len(strings) == len(row_lines[0]["words"]) == 5
    for string, word in zip(strings, row_lines[0]["words"]):
        x0, y0, x1, y1 = word["bbox"]
        assert [string.get(key) for key in ("HPOS", "VPOS", "WIDTH", "HEIGHT")] == [
            str(x0), str(y0), str(x1 - x0), str(y1 - y0)]
        assert string.get("WC") == "0.9375"
    assert all(string.get("WC") is None for string in lines[1].findall("a:String", ALTO))


def test_page_xml_holds_regions_in_reading_order_with_words_and_confidences(exported, pages):
    tree = _parse(exported, ".p0001.page.xml")
    [step] = tree.findall("p:Metadata/p:MetadataItem[@type='processingStep']", PAGE)
    assert {label.get("type"): label.get("value") for label in step.iterfind("p:Labels/p:Label", PAGE)} == {
        "model": "printed", "model_sha256": "5e" * 32}
    page = tree.find("p:Page", PAGE)
    assert (page.get("imageFilename"), page.get("imageWidth"), page.get("imageHeight")) == (SOURCE, "1240", "1754")
    refs = page.findall("p:ReadingOrder/p:OrderedGroup/p:RegionRefIndexed", PAGE)
    regions = page.findall("p:TextRegion", PAGE)
    assert [(ref.get("index"), ref.get("regionRef")) for ref in refs] == [
        (str(index), region.get("id")) for index, region in enumerate(regions)]
    lines = page.findall(".//p:TextLine", PAGE)
    assert [line.findtext("p:TextEquiv/p:Unicode", namespaces=PAGE) for line in lines] == [
        TRICKY, "second line of the left column", "right column first line"]
    assert lines[0].find("p:Coords", PAGE).get("points") == "100,202 350,200 600,203 600,240 100,239"
    assert lines[0].find("p:Baseline", PAGE).get("points") == "100,231 350,230 600,232"
    assert [line.find("p:TextEquiv", PAGE).get("conf") for line in lines] == ["0.9375", None, "0.8000"]
    words = lines[0].findall("p:Word", PAGE)
    assert [word.findtext("p:TextEquiv/p:Unicode", namespaces=PAGE) for word in words] == TRICKY.split()
    assert pages[1]["lines"][0]["words"][2]["bbox"] == [225, 200, 314, 240]
    # its pixels (x1, y1 exclusive) cut to the line's polygon, whose top edge slopes from 202 to 200 there
    assert words[2].find("p:Coords", PAGE).get("points") == "225,239 313,239 313,200 225,201"
    assert regions[0].findtext("p:TextEquiv/p:Unicode", namespaces=PAGE) == (
        f"{TRICKY}\nsecond line of the left column")
    # a region outlines its lines' pixels (boxes' x1, y1 exclusive): a corner had lain a pixel beyond them
    left, top, right, bottom = (f(line["bbox"][i] for line in pages[1]["lines"][:2])
                                for f, i in ((min, 0), (min, 1), (max, 2), (max, 3)))
    assert regions[0].find("p:Coords", PAGE).get("points") == (
        f"{left},{top} {right - 1},{top} {right - 1},{bottom - 1} {left},{bottom - 1}")


def test_hocr_holds_every_page_with_areas_lines_words_boxes_and_confidences(exported, pages):
    tree = _parse(exported, ".hocr")
    assert tree.docinfo.doctype.startswith("<!DOCTYPE html")
    meta = {m.get("name"): m.get("content") for m in tree.findall("h:head/h:meta", XHTML) if m.get("name")}
    assert meta["ocr-number-of-pages"] == "4" and meta["ocr-system"].startswith("trocr-pipeline")
    assert set(meta["ocr-capabilities"].split()) == {"ocr_page", "ocr_carea", "ocr_par", "ocr_line", "ocrx_word"}
    page_divs = tree.findall("h:body/h:div[@class='ocr_page']", XHTML)
    assert [div.get("id") for div in page_divs] == ["page_1", "page_2", "page_3", "page_4"]
    assert "bbox 0 0 1240 1754; ppageno 0; scan_res 150 150" in page_divs[0].get("title")
    assert len(page_divs[0].findall("h:div[@class='ocr_carea']/h:p[@class='ocr_par']", XHTML)) == 2
    lines = page_divs[0].findall(".//h:span[@class='ocr_line']", XHTML)
    assert [line.get("title") for line in lines] == [
        "bbox 100 200 600 240; baseline 0.0020 -9; x_wconf 94", "bbox 100 260 600 300; baseline 0.0020 -9",
        "bbox 700 200 1200 240; baseline 0.0020 -9; x_wconf 80"]
    words = lines[0].findall("h:span[@class='ocrx_word']", XHTML)
    assert "".join(lines[0].itertext()) == TRICKY
    assert words[0].get("title") == "bbox {} {} {} {}; x_wconf 94".format(*pages[1]["lines"][0]["words"][0]["bbox"])


def test_text_export_separates_pages_with_form_feeds(exported, pages):
    text = exported["letter.final-0123456789abcdef.txt"].read_text(encoding="utf-8")
    by_number = {row["page"]: row["text"] for row in pages}
    assert text.split("\f") == [by_number[n] + "\n" for n in (1, 2, 3, 4)]
    assert TRICKY in text


def test_lines_without_word_boxes_keep_their_text(exported):
    alto = _parse(exported, ".p0004.alto.xml")
    strings = alto.findall(".//a:TextLine/a:String", ALTO)
    assert [s.get("CONTENT") for s in strings] == "no word boxes here".split()
    assert all(s.get("HPOS") is None for s in strings)
    assert _parse(exported, ".p0004.page.xml").findall(".//p:Word", PAGE) == []
    line = _parse(exported, ".hocr").find(".//h:div[@id='page_4']//h:span[@class='ocr_line']", XHTML)
    assert line.text == "no word boxes here" and len(line) == 0


def test_empty_page_has_no_lines_and_failed_page_no_text(exported):
    for number in ("0002", "0003"):
        alto, page = _parse(exported, f".p{number}.alto.xml"), _parse(exported, f".p{number}.page.xml")
        assert alto.find("a:Layout/a:Page", ALTO) is not None
        assert alto.findall(".//a:TextBlock", ALTO) == [] and alto.find("a:ReadingOrder", ALTO) is None
        assert page.findall(".//p:TextRegion", PAGE) == [] and page.find(".//p:ReadingOrder", PAGE) is None
    assert _parse(exported, ".p0002.alto.xml").find("a:Layout/a:Page", ALTO).get("QUALITY_DETAIL") is None
    failure = "page failed (recognition_failed): model ran out of memory <&>"
    assert _parse(exported, ".p0003.alto.xml").find("a:Layout/a:Page", ALTO).get("QUALITY_DETAIL") == failure
    assert _parse(exported, ".p0003.page.xml").findtext("p:Metadata/p:Comments", namespaces=PAGE) == failure
    hocr = _parse(exported, ".hocr")
    assert len(hocr.find(".//h:div[@id='page_3']", XHTML)) == 0


def test_a_one_word_line_holds_its_word_alone_in_hocr(tmp_path, document):
    """lxml's pretty printing had put whitespace around the word of a line that has only one ("P17")."""
    [path] = write_exports([_row(1, [_line(0, 0, 100, 100, "P17", 0.9)])], document, ["hocr"], str(tmp_path))
    line = etree.parse(path).find(".//h:span[@class='ocr_line']", XHTML)
    assert "".join(line.itertext()) == "P17"


def test_text_xml_cannot_hold_is_dropped_not_fatal(tmp_path, document):
    row = _row(1, [_line(0, 0, 100, 100, "bell\x07 and esc\x1bape", 0.7)])
    paths = write_exports([row], document, ["alto", "page", "hocr"], str(tmp_path))
    alto = etree.parse(paths[0])
    assert [s.get("CONTENT") for s in alto.findall(".//a:String", ALTO)] == ["bell", "and", "escape"]


def test_writes_through_a_given_filesystem(tmp_path, pages, document):
    filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    paths = write_exports(pages, document, ["txt", "txt"], "exports", filesystem)
    assert paths == ["exports/letter.final-0123456789abcdef.txt"]
    assert (tmp_path / "exports" / "letter.final-0123456789abcdef.txt").is_file()


def test_document_without_pages_writes_nothing(tmp_path, document):
    assert write_exports([], document, ["alto", "hocr"], str(tmp_path / "out")) == []
    assert not (tmp_path / "out").exists()


def test_rejects_unknown_formats_and_pages_of_another_document(tmp_path, pages, document):
    with pytest.raises(ValueError, match="unknown export formats \\['docx'\\]"):
        write_exports(pages, document, ["alto", "docx"], str(tmp_path))
    with pytest.raises(ValueError, match="pages of documents"):
        write_exports(pages, {**document, "doc_id": "another"}, ["txt"], str(tmp_path))


def test_alto_and_page_files_are_valid_against_the_official_schemas(exported):
    alto, page = official_schema("alto-4-4.xsd"), official_schema("pagecontent-2019-07-15.xsd")
    for name, path in exported.items():
        schema = alto if name.endswith(".alto.xml") else page if name.endswith(".page.xml") else None
        if schema is not None:
            assert schema.validate(etree.parse(str(path))), (name, schema.error_log.last_error)


def test_a_turned_page_says_so_where_its_file_names_the_source(document):
    """A page turned upright (EXIF, /Rotate, the orientation found) has coordinates of the turned image: ALTO, PAGE
    and hOCR naming the source file had said nothing of the turn (only the Parquet's rotation column did). Naming the
    METS image of the upright page, there is no turn to tell."""
    work = PageWork(doc_id=DOC_ID, source=SOURCE, page=1, dpi=150, width=SIZE[0], height=SIZE[1], rotation=270,
                    lines=[_line(0, 0, 100, 200, "a line", 0.9)])
    row = page_row(work)
    alto, page = alto_page(row, SOURCE, "model: printed"), page_xml(row, SOURCE, document)
    for root, schema in ((alto, "alto-4-4.xsd"), (page, "pagecontent-2019-07-15.xsd")):
        assert official_schema(schema).validate(etree.ElementTree(root)), official_schema(schema).error_log.last_error
    assert alto.xpath("//a:Processing[@ID='turning']/a:processingStepSettings/text()", namespaces=ALTO) == [
        "rotation: 270"]
    [label] = page.xpath("//p:MetadataItem[@name='preprocessing/optimization/deskewing']//p:Label", namespaces=PAGE)
    assert (label.get("type"), label.get("value")) == ("rotation", "270") and "turned 270 degrees" in label.get("comments")
    [hocr_page] = hocr_document([row], document, {1: SOURCE}).xpath("//h:div[@class='ocr_page']", namespaces=XHTML)
    assert hocr_page.get("title").endswith("; x_rotation 270")
    image = "letter-0123456789abcdef.p0001.png"  # a METS package's image of the upright page
    assert not alto_page(row, image).xpath("//a:Processing[@ID='turning']", namespaces=ALTO)
    assert not page_xml(row, image, document).xpath("//p:MetadataItem[@name='preprocessing/optimization/deskewing']",
                                                    namespaces=PAGE)
    assert "x_rotation" not in hocr_document([row], document, {1: image}).xpath("//h:div[@class='ocr_page']/@title",
                                                                                namespaces=XHTML)[0]


def test_mets_points_at_its_files_with_uri_references():
    """Export names come from source names, which may hold characters a URI reserves: the METS writes each
    file's name percent-encoded, so it is valid and resolves to the file (not to "Brief " before a "#")."""
    name = "Brief #2 (100%) [Kopie] é-01234567.p0001.png"
    mets = mets_document({"doc_id": DOC_ID, "source": SOURCE}, [1], {IMAGE_GROUP: ("image/png", {1: name})}, "test")
    [href] = [entry.get("{http://www.w3.org/1999/xlink}href") for entry in mets.iter("{*}FLocat")]
    assert unquote(urlsplit(href).path) == name
    schema = official_schema("mets.xsd")
    assert schema.validate(etree.ElementTree(mets)), schema.error_log.last_error
    # a time of creation with its offset, as PAGE and the PDF's XMP give it (without one it means no fixed instant)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", mets.find("{*}metsHdr").get("CREATEDATE"))


def test_a_source_name_with_a_control_character_still_gets_its_mets():
    """Linux file names may hold any byte but / and NUL: a name with an escape character had made the METS
    unwritable (lxml refuses what XML 1.0 cannot hold), and the document failed with export_failed."""
    mets = mets_document({"doc_id": DOC_ID, "source": "/scans/scan\x1b.png"}, [1],
                         {IMAGE_GROUP: ("image/png", {1: "scan\x1b-01234567.p0001.png"})}, "test")
    assert [url.text for url in mets.iter("{*}url")] == ["file:///scans/scan%1B.png"]
    schema = official_schema("mets.xsd")
    assert schema.validate(etree.ElementTree(mets)), schema.error_log.last_error


def test_a_page_whose_mets_image_cannot_be_made_again_is_named_by_its_source_not_a_missing_image(tmp_path, pages):
    """The METS package renders the source's pages again; a page the job read that poppler cannot render now (it
    fails or times out on it, here a page the PDF does not hold) had no image, while its ALTO, PAGE and hOCR named
    ``….p0002.png``, a file that was never written."""
    source = tmp_path / "in" / "one page.pdf"
    source.parent.mkdir()
    buffer = io.BytesIO()
    Image.new("L", SIZE, 255).save(buffer, format="PNG", dpi=(150, 150))
    source.write_bytes(img2pdf.convert(buffer.getvalue()))
    rows = [dict(row, source=str(source)) for row in pages if row["page"] in (1, 2)]
    document = {"doc_id": DOC_ID, "source": str(source), "num_pages": 2}
    out = tmp_path / "out"
    written = {Path(path).name for path in write_exports(rows, document, ["page", "hocr", "mets"], str(out))}
    stem = export_stem(document)
    assert f"{stem}.p0001.png" in written and f"{stem}.p0002.png" not in written

    def named(image: str) -> bool:  # the image a file names is there, or is the source itself
        return image == str(source) or (out / unquote(image)).is_file()

    for number in (1, 2):
        alto = etree.parse(str(out / f"{stem}.p{number:04d}.alto.xml"))
        assert named(alto.findtext(".//a:fileName", namespaces=ALTO))
        page = etree.parse(str(out / f"{stem}.p{number:04d}.page.xml"))
        assert named(page.find(".//p:Page", PAGE).get("imageFilename"))
    titles = [div.get("title") for div in etree.parse(str(out / f"{stem}.hocr")).iterfind(".//h:div", XHTML)
              if div.get("class") == "ocr_page"]
    assert [named(title.split('"')[1]) for title in titles] == [True, True]
    mets = etree.parse(str(out / f"{stem}.mets.xml"))
    hrefs = [location.get("{http://www.w3.org/1999/xlink}href") for location in mets.iter("{*}FLocat")]
    assert all((out / unquote(href)).is_file() for href in hrefs)
    schema = official_schema("mets.xsd")
    assert schema.validate(mets), schema.error_log.last_error


def test_mets_gives_each_file_its_sha256_and_the_source_as_a_file_uri(tmp_path, pages):
    """An archive checks its copies of a package by each file's checksum: the METS had given none, and its
    mods:url held a bare local path, which is no URL. METS comes last even when asked for first."""
    source = tmp_path / "in" / "Box #3" / "scan.pdf"
    source.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("L", SIZE, 255).save(buffer, format="PNG", dpi=(150, 150))
    source.write_bytes(img2pdf.convert(buffer.getvalue()))
    rows = [dict(row, source=str(source)) for row in pages if row["page"] == 1]
    document = {"doc_id": DOC_ID, "source": str(source), "num_pages": 1}
    out = tmp_path / "out"
    write_exports(rows, document, ["mets", "page"], str(out))
    mets = etree.parse(str(out / f"{export_stem(document)}.mets.xml"))
    files = list(mets.iter("{*}file"))
    assert len(files) == 3  # the page image, its ALTO and its PAGE
    for entry in files:
        href = entry.find("{*}FLocat").get("{http://www.w3.org/1999/xlink}href")
        assert entry.get("CHECKSUMTYPE") == "SHA-256"
        assert entry.get("CHECKSUM") == hashlib.sha256((out / unquote(href)).read_bytes()).hexdigest()
    assert [url.text for url in mets.iter("{*}url")] == [source.as_uri()]
    schema = official_schema("mets.xsd")
    assert schema.validate(mets), schema.error_log.last_error
