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


#: file name -> expected outcome, as in README.md
EXPECTED: dict[str, Expected] = {
    "empty.pdf": Expected("failed", "empty_file"),
    "not-a-pdf.pdf": Expected("failed", "unsupported_format"),
    "truncated-head.pdf": Expected("failed", "corrupt_file"),
    "truncated-tail.pdf": Expected("ok", repaired=True),
    "broken-xref.pdf": Expected("ok", pages_ok=3, repaired=True),
    "encrypted-user.pdf": Expected("failed", "encrypted"),
    "owner-password-only.pdf": Expected("ok", pages_ok=1),
    "count-too-low.pdf": Expected("failed", "page_count_mismatch", pages_ok=2, pages_failed=1),
    "huge-page.pdf": Expected("failed", "page_too_large"),
    "bomb.png": Expected("failed", "page_too_large"),
    "slow-render.pdf": Expected("failed", "render_timeout", pages_ok=0, pages_failed=1),
    "blank.pdf": Expected("ok", pages_ok=1),
    "cmyk.jpg": Expected("ok", pages_ok=1),
    "gray16.png": Expected("ok", pages_ok=1),
    "palette.png": Expected("ok", pages_ok=1),
    "rgba.png": Expected("ok", pages_ok=1),
    "bitonal.tif": Expected("ok", pages_ok=1),
    "dangling.pdf": Expected("failed", "unreadable"),
}


def _text_image(lines: int = 3, size=(900, 600)) -> Image.Image:
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(FONT, 30)
    for index in range(lines):
        draw.text((60, 60 + 60 * index), f"Line {index + 1} of a damaged archive file", font=font, fill=0)
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
    source.unlink()

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

    return EXPECTED
