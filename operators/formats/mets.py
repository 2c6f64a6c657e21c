"""METS: one file per document tying each page's image to its ALTO and PAGE files, the way OCR-D
workspaces do (file groups named ``OCR-D-*``, file ids ``<group>_<page>``, local files located with
``LOCTYPE="OTHER" OTHERLOCTYPE="FILE"`` and paths relative to the METS file, a physical structMap of
``page`` divs ``PHYS_<page>`` inside one ``physSequence``).

The page images are the ones the job read, rendered again exactly as the rasterize stage renders
them (same dpi, 8-bit gray), turned as the job turned them (the page row's ``rotation``; orientation
is not detected again, so the job's own settings and findings hold) and written as lossless PNG, so
ALTO and PAGE coordinates are pixels of those very images.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping, Sequence
from urllib.parse import quote

from lxml import etree
from PIL import Image

from operators.ingest import local_path, pdf_pages, sniff_kind
from operators.orientation import turn
from operators.rasterize import PageRange, rasterize
from operators.settings import RasterizeConfig
from operators.storage import is_uri
from operators.text import xml_text

METS_NS = "http://www.loc.gov/METS/"
MODS_NS = "http://www.loc.gov/mods/v3"
XLINK_NS = "http://www.w3.org/1999/xlink"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
METS_SCHEMA = "http://www.loc.gov/standards/mets/mets.xsd"
IMAGE_GROUP = "OCR-D-IMG"


def _m(tag: str) -> str:
    return f"{{{METS_NS}}}{tag}"


def has_page_image(row: dict) -> bool:
    """Whether a page row gets an image in the METS package: one that rendered (a page that failed later still
    has its lines' boxes on it)."""
    return row["status"] == "ok" or bool(row["lines"])


def page_images(pages: Sequence[dict], source: str, config: RasterizeConfig = RasterizeConfig()
                ) -> Iterator[tuple[int, bytes]]:
    """(page number, PNG) of each page row that rendered, as the job's rasterize stage saw it: a PDF's page
    with its /Rotate and /UserUnit, from the repaired copy where the job needed one. ``config``: the job's
    ``rasterize`` settings, whose pdfinfo and render timeouts hold here too. A page is not held to
    ``max_page_pixels`` again: the job read it, and ALTO and PAGE name its image."""
    with local_path(source) as path:
        with open(path, "rb") as handle:
            kind = sniff_kind(handle.read(1024))
        repaired, rotations, units = pdf_pages(path, config)[1:4] if kind == "pdf" else (False, (), ())
        for row in filter(has_page_image, pages):
            task = PageRange(row["doc_id"], path, kind, row["page"], row["page"], repaired,
                             rotations[row["page"] - 1:row["page"]], units[row["page"] - 1:row["page"]])
            # the page's own size, with a pixel's rounding along each side when its pixels were made square
            pixels = max(config.max_page_pixels, row["width"] * row["height"] + row["width"] + row["height"])
            for work in rasterize(task, config.model_copy(update={"dpi": row["dpi"], "detect_orientation": False,
                                                                  "max_page_pixels": pixels})):
                if work.image is not None:
                    # work.rotation: what the file says (EXIF, /Rotate); the row's rotation adds what the job found
                    image = turn(work.image, (row["rotation"] - work.rotation) % 360)
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG", dpi=(work.dpi, work.dpi))
                    yield work.page, buffer.getvalue()


def mets_document(document: dict, page_numbers: Sequence[int],
                  groups: Mapping[str, tuple[str, Mapping[int, str]]], creator: str,
                  checksums: Mapping[str, str] = {}, creator_note: str | None = None) -> etree._Element:
    """The METS of one document. ``groups``: file group USE -> (MIME type, page -> path relative to
    the METS file, written percent-encoded); every page gets a ``page`` div with a pointer to each of its files.
    ``checksums``: path -> SHA-256, given as each file's CHECKSUM, which an archive checks its copies by.
    ``creator_note``: the creating software's settings (the model that read the text)."""
    root = etree.Element(_m("mets"), nsmap={"mets": METS_NS, "mods": MODS_NS, "xlink": XLINK_NS, "xsi": XSI_NS})
    root.set(f"{{{XSI_NS}}}schemaLocation", f"{METS_NS} {METS_SCHEMA}")
    header = etree.SubElement(root, _m("metsHdr"),
                              CREATEDATE=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    agent = etree.SubElement(header, _m("agent"), TYPE="OTHER", OTHERTYPE="SOFTWARE", ROLE="CREATOR")
    etree.SubElement(agent, _m("name")).text = creator
    if creator_note:
        etree.SubElement(agent, _m("note")).text = xml_text(creator_note)
    wrap = etree.SubElement(etree.SubElement(root, _m("dmdSec"), ID="DMDPHYS_0000"), _m("mdWrap"), MDTYPE="MODS")
    mods = etree.SubElement(etree.SubElement(wrap, _m("xmlData")), f"{{{MODS_NS}}}mods")
    etree.SubElement(mods, f"{{{MODS_NS}}}identifier", type="sha256").text = document["doc_id"]
    location = etree.SubElement(mods, f"{{{MODS_NS}}}location")
    source = document["source"]  # a URI as given, a local path as a file: URI (a bare path is no URL)
    etree.SubElement(location, f"{{{MODS_NS}}}url").text = (xml_text(source) if is_uri(source)
                                                        else Path(source).absolute().as_uri())

    file_section = etree.SubElement(root, _m("fileSec"))
    for use, (mimetype, files) in groups.items():
        group = etree.SubElement(file_section, _m("fileGrp"), USE=use)
        for number, href in sorted(files.items()):
            entry = etree.SubElement(group, _m("file"), ID=_file_id(use, number), MIMETYPE=mimetype)
            if href in checksums:
                entry.set("CHECKSUM", checksums[href])
                entry.set("CHECKSUMTYPE", "SHA-256")
            # a URI reference: a source named "Brief #2 (100%).png" gives file names that are not one as they are
            etree.SubElement(entry, _m("FLocat"), {"LOCTYPE": "OTHER", "OTHERLOCTYPE": "FILE",
                                                   f"{{{XLINK_NS}}}href": quote(href)})
    sequence = etree.SubElement(etree.SubElement(root, _m("structMap"), TYPE="PHYSICAL"), _m("div"),
                                TYPE="physSequence", ID="PHYS_0000", DMDID="DMDPHYS_0000")
    for number in page_numbers:
        page = etree.SubElement(sequence, _m("div"), TYPE="page", ID=f"PHYS_{number:04d}", ORDER=str(number),
                                ORDERLABEL=str(number))
        for use, (_, files) in groups.items():
            if number in files:
                etree.SubElement(page, _m("fptr"), FILEID=_file_id(use, number))
    return root


def _file_id(use: str, number: int) -> str:
    return f"{use}_{number:04d}"
