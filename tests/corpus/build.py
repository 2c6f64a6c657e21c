"""Build the broken-file corpus described in README.md beside this file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pikepdf
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"


@dataclass(frozen=True)
class Expected:
    status: str
    error_code: str | None = None
    pages_ok: int | None = None  # pages expected with status ok (None: not checked)
    pages_failed: int = 0
    repaired: bool = False
    lines: int | None = None  # lines on each ok page (None: not checked)
    rotation: int = 0  # rotation of each ok page, as recorded in the pages table
    duplicate_of: str | None = None  # the file with the same bytes that holds the pages


#: An awkward but legal file name: spaces, URI-special and shell-special characters, non-ASCII.
AWKWARD_NAME = "Brief #3 – 100% & Co (Zürich, 東京).png"
#: Over 200 characters, and over the 255 bytes a file name may have once an export suffix is added.
LONG_NAME = "Protokoll der Sitzung vom 3. März 1921 " * 6 + "Ende.png"

#: Files in the corpus folder that are not documents: counted by suffix in the run's summary.
LEFT_OUT = {".DS_Store": 1, "Thumbs.db": 1, "._*": 1, ".md5": 1, ".xml": 1}


#: file name -> expected outcome, as in README.md
EXPECTED: dict[str, Expected] = {
    "empty.pdf": Expected("failed", "empty_file"),
    "not-a-pdf.pdf": Expected("failed", "unsupported_format"),
    "truncated-head.pdf": Expected("failed", "corrupt_file"),
    "truncated-tail.pdf": Expected("ok", repaired=True),
    "broken-xref.pdf": Expected("ok", pages_ok=3, repaired=True),
    "encrypted-user.pdf": Expected("failed", "encrypted"),
    "owner-password-only.pdf": Expected("ok", pages_ok=1),
    "encrypted-certificate.pdf": Expected("failed", "encrypted"),
    "page-qpdf-cannot-parse.pdf": Expected("ok", pages_ok=3, lines=3),
    "count-too-low.pdf": Expected("failed", "page_count_mismatch", pages_ok=2, pages_failed=1),
    "huge-page.pdf": Expected("failed", "page_too_large", pages_ok=0, pages_failed=1),
    "bomb.png": Expected("failed", "page_too_large", pages_ok=0, pages_failed=1),
    "slow-render.pdf": Expected("failed", "render_timeout", pages_ok=0, pages_failed=1),
    "blank.pdf": Expected("ok", pages_ok=1),
    "cmyk.jpg": Expected("ok", pages_ok=1),
    "gray16.png": Expected("ok", pages_ok=1),
    "palette.png": Expected("ok", pages_ok=1),
    "rgba.png": Expected("ok", pages_ok=1),
    "bitonal.tif": Expected("ok", pages_ok=1),
    "dangling.pdf": Expected("failed", "unreadable"),
    "loop.pdf": Expected("failed", "unreadable"),
    "scan.jp2": Expected("ok", pages_ok=1, lines=3),
    "scan.bmp": Expected("ok", pages_ok=1, lines=3),
    "scan.webp": Expected("ok", pages_ok=1, lines=3),
    "scan.gif": Expected("ok", pages_ok=1, lines=3),
    "truncated-frame.tif": Expected("failed", "render_failed", pages_ok=2, pages_failed=1, lines=3),
    "empty-page-tree.pdf": Expected("failed", "no_pages"),
    "cut-off.gif": Expected("failed", "render_failed", pages_ok=0, pages_failed=1),
    "no-end-marker.jpg": Expected("ok", pages_ok=1, lines=3),
    "cut-off.jpg": Expected("failed", "render_failed", pages_ok=0, pages_failed=1),
    "tiny.png": Expected("ok", pages_ok=1, lines=0),
    "strip.png": Expected("ok", pages_ok=1),
    "bitonal-600dpi-letter.tif": Expected("ok", pages_ok=1, lines=3),
    "exif-orientation-6.jpg": Expected("ok", pages_ok=1, lines=3, rotation=90),
    "rotate-90.pdf": Expected("ok", pages_ok=1, lines=3, rotation=90),
    "in-a-folder-named-pdf.png": Expected("ok", pages_ok=1, lines=3),
    "copy-of-cmyk.jpg": Expected("duplicate", pages_ok=0, duplicate_of="cmyk.jpg"),
    "also-empty.png": Expected("failed", "empty_file"),
    AWKWARD_NAME: Expected("ok", pages_ok=1, lines=3),
    LONG_NAME: Expected("ok", pages_ok=1, lines=3),
}


def _text_image(lines: int = 3, size=(900, 600), title: str = "Line") -> Image.Image:
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(FONT, 30)
    for index in range(lines):
        draw.text((60, 60 + 60 * index), f"{title} {index + 1} of a damaged archive file", font=font, fill=0)
    return image


def _pdf(path: Path, pages: int = 3, dpi: int = 100) -> Path:
    images = [_text_image() for _ in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:], resolution=dpi)
    return path


def _slow_render_pdf(path: Path) -> None:
    pdf = pikepdf.new()
    pdf.add_blank_page(page_size=(200, 200))
    form = pikepdf.Stream(pdf, b"0 0 1 1 re f")
    for _ in range(7):
        form.Type, form.Subtype, form.BBox = pikepdf.Name.XObject, pikepdf.Name.Form, [0, 0, 200, 200]
        form = pikepdf.Stream(pdf, b" ".join([b"q /X Do Q"] * 10),
                              Resources=pikepdf.Dictionary(XObject=pikepdf.Dictionary(X=form)))
    form.Type, form.Subtype, form.BBox = pikepdf.Name.XObject, pikepdf.Name.Form, [0, 0, 200, 200]
    page = pdf.pages[0]
    page.Resources = pikepdf.Dictionary(XObject=pikepdf.Dictionary(X=form))
    page.Contents = pdf.make_stream(b"q /X Do Q")
    pdf.save(path)


def build_corpus(folder: Path) -> dict[str, Expected]:
    """Write every file of the corpus into ``folder``; returns file name -> expected outcome."""
    good = _pdf(folder / "_good.pdf", pages=3)
    data = good.read_bytes()
    good.unlink()

    (folder / "empty.pdf").write_bytes(b"")
    (folder / "not-a-pdf.pdf").write_text("Minutes of the meeting, typed in a text editor.\n")
    (folder / "truncated-head.pdf").write_bytes(data[: len(data) // 10])
    (folder / "truncated-tail.pdf").write_bytes(data[: len(data) * 3 // 4])

    compact = folder / "_compact.pdf"
    with pikepdf.open(_pdf(folder / "_plain.pdf")) as pdf:
        pdf.save(compact, object_stream_mode=pikepdf.ObjectStreamMode.generate)
    (folder / "_plain.pdf").unlink()
    packed = compact.read_bytes()
    compact.unlink()
    offset = re.search(rb"startxref\s+(\d+)", packed)
    (folder / "broken-xref.pdf").write_bytes(
        packed[: offset.start(1)] + b"9" * len(offset.group(1)) + packed[offset.end(1):])

    source = _pdf(folder / "_source.pdf", pages=1)
    with pikepdf.open(source) as pdf:
        pdf.save(folder / "encrypted-user.pdf", encryption=pikepdf.Encryption(owner="o-secret", user="u-secret"))
        pdf.save(folder / "owner-password-only.pdf", encryption=pikepdf.Encryption(owner="o-secret", user=""))
        pdf.save(folder / "_certificate.pdf", encryption=pikepdf.Encryption(owner="o-secret", user="", R=6))
    source.unlink()
    # what a file encrypted for its recipients' certificates names as its security handler
    certificate = (folder / "_certificate.pdf").read_bytes().replace(b"/Filter /Standard", b"/Filter /Adobe.PubSec")
    (folder / "encrypted-certificate.pdf").write_bytes(certificate)
    (folder / "_certificate.pdf").unlink()

    with pikepdf.open(_pdf(folder / "_three.pdf", pages=3)) as pdf:
        pdf.pages[1].obj.PieceInfo = 7
        pdf.save(folder / "_unparsable.pdf", object_stream_mode=pikepdf.ObjectStreamMode.disable)
    (folder / "_three.pdf").unlink()
    unparsable = (folder / "_unparsable.pdf").read_bytes().replace(b"/PieceInfo 7", b"/PieceInfo 99999999999999999999")
    (folder / "page-qpdf-cannot-parse.pdf").write_bytes(unparsable)
    (folder / "_unparsable.pdf").unlink()

    (folder / "count-too-low.pdf").write_bytes(data.replace(b"/Count 3", b"/Count 2"))

    huge = pikepdf.new()
    huge.add_blank_page(page_size=(14400, 14400))  # 200 inches square
    huge.save(folder / "huge-page.pdf")

    # A real PNG that declares 20,000 x 20,000 pixels; the pixel data is one zlib stream of zeros.
    Image.new("1", (20000, 20000), 1).save(folder / "bomb.png")

    _slow_render_pdf(folder / "slow-render.pdf")
    Image.new("L", (850, 1100), 255).save(folder / "blank.pdf", resolution=100)

    text = _text_image()
    text.convert("CMYK").save(folder / "cmyk.jpg", dpi=(100, 100))
    Image.fromarray(np.asarray(text, dtype=np.uint16) * 257).save(folder / "gray16.png", dpi=(100, 100))
    text.convert("P").save(folder / "palette.png", dpi=(100, 100))
    rgba = Image.new("RGBA", text.size, (0, 0, 0, 0))
    rgba.putalpha(Image.eval(text, lambda v: 255 - v))  # black ink, fully transparent paper
    rgba.save(folder / "rgba.png", dpi=(100, 100))
    text.convert("1").save(folder / "bitonal.tif", compression="group4", dpi=(100, 100))
    (folder / "dangling.pdf").symlink_to(folder / "does-not-exist.pdf")
    (folder / "loop.pdf").symlink_to(folder / "loop.pdf")

    text.save(folder / "scan.jp2")
    text.save(folder / "scan.bmp")
    text.save(folder / "scan.webp", lossless=True)
    text.save(folder / "scan.gif")
    frames = folder / "_frames.tif"
    text.save(frames, save_all=True, append_images=[text, text], compression="tiff_lzw", dpi=(100, 100))
    cut = frames.read_bytes()
    frames.unlink()
    (folder / "truncated-frame.tif").write_bytes(cut[: len(cut) * 9 // 10])  # the last frame's directory is cut
    pikepdf.new().save(folder / "empty-page-tree.pdf")
    text.save(folder / "_whole.gif")
    whole = (folder / "_whole.gif").read_bytes()
    (folder / "_whole.gif").unlink()
    (folder / "cut-off.gif").write_bytes(whole[: len(whole) * 7 // 10])  # an interrupted copy
    text.save(folder / "_whole.jpg", quality=90, dpi=(100, 100))
    whole = (folder / "_whole.jpg").read_bytes()
    (folder / "_whole.jpg").unlink()
    (folder / "no-end-marker.jpg").write_bytes(whole[:-2])
    (folder / "cut-off.jpg").write_bytes(whole[: len(whole) * 6 // 10])
    Image.new("L", (8, 8), 255).save(folder / "tiny.png")
    strip = Image.new("L", (9000, 220), 255)
    ImageDraw.Draw(strip).text((40, 60), "A long strip " * 40, font=ImageFont.truetype(FONT, 60), fill=0)
    strip.save(folder / "strip.png", dpi=(300, 300))
    letter = Image.new("1", (5100, 6600), 1)  # US letter at 600 dpi
    letter.paste(text.resize((3600, 2400)).convert("1"), (600, 600))
    letter.save(folder / "bitonal-600dpi-letter.tif", compression="group4", dpi=(600, 600))
    sideways = text.rotate(90, expand=True)  # stored turned a quarter left; metadata says turn it right
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(folder / "exif-orientation-6.jpg", dpi=(100, 100), exif=exif)
    sideways.save(folder / "rotate-90.pdf", resolution=100)
    with pikepdf.open(folder / "rotate-90.pdf", allow_overwriting_input=True) as pdf:
        pdf.pages[0].Rotate = 90  # shown turned a quarter right, as a viewer (and poppler) does
        pdf.save(folder / "rotate-90.pdf")
    (folder / "folder.pdf").mkdir()
    _text_image(title="Leaf").save(folder / "folder.pdf" / "in-a-folder-named-pdf.png", dpi=(100, 100))
    (folder / "copy-of-cmyk.jpg").write_bytes((folder / "cmyk.jpg").read_bytes())
    (folder / "also-empty.png").write_bytes(b"")
    _text_image(title="Brief").save(folder / AWKWARD_NAME, dpi=(100, 100))
    _text_image(title="Protokoll").save(folder / LONG_NAME, dpi=(100, 100))

    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "._scan.pdf").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (folder / "checksums.md5").write_text("d41d8cd98f00b204e9800998ecf8427e  empty.pdf\n")
    (folder / "metadata.xml").write_text("<mets/>\n")
    return EXPECTED
