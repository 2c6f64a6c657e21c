"""Synthetic scanned documents with line-level ground truth, for tests, benchmarks and the demo.

Pages are typeset like ordinary documents (margins, one or two columns, 10-12 pt text, normal
leading, blank line between paragraphs), rendered as 8-bit grey at the target dpi with a light scan
look, and saved as an image-only PDF or a multi-page TIFF. ``NAME.gt.json`` beside each file holds
every line's text, tight ink box, column (``block``) and reading order. Boxes are
``[x0, y0, x1, y1]`` in page pixels with exclusive ``x1``/``y1``; a pixel counts as ink from
INK_THRESHOLD coverage on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFont

from pipeline.synth.corpus import ENGLISH_CHARSET, CorpusSampler
from pipeline.synth.degrade import add_noise, blur, ink_on_paper, warp_to_fit
from pipeline.synth.fonts import FontFace, discover_fonts, load_font
from pipeline.synth.lines import derive_seed, render_mask

PAGE_SIZES_IN = {"letter": (8.5, 11.0), "a4": (210 / 25.4, 297 / 25.4)}
BODY_PT = (10.0, 12.0)
TITLE_PT = (15.0, 20.0)
LEADING = (1.2, 1.6)  # line pitch over font size
MARGIN_IN = (0.75, 1.25)
GUTTER_IN = (0.25, 0.45)
PARAGRAPH_WORDS = (15, 110)
P_TITLE = 0.6
P_BITONAL = 0.3
P_PAGE_BLUR = 0.5
LAST_PAGE_FILL = (0.6, 1.0)  # share of the last page's line slots that get text
MAX_SPECKS = 30
INK_THRESHOLD = 64  # of 255
MAX_SKEW_DEG = 10.0
DOCUMENT_FORMATS = ("pdf", "tiff")
DPI_RANGE = (50, 600)


@dataclass(frozen=True)
class PageStyle:
    """One document's typesetting, shared by all its pages."""

    face: FontFace
    width: int
    height: int
    margin: int
    columns: int
    gutter: int
    body_px: int
    leading: int
    title_px: int

    @property
    def column_width(self) -> int:
        return (self.width - 2 * self.margin - (self.columns - 1) * self.gutter) // self.columns

    def column_left(self, block: int) -> int:
        return self.margin + block * (self.column_width + self.gutter)


@dataclass(frozen=True)
class PlacedLine:
    """A line of text at its typeset position: ``(x, y)`` is the left end of its ascender line."""

    text: str
    x: int
    y: int
    size_px: int
    block: int


def pt_to_px(points: float, dpi: int) -> int:
    return round(points * dpi / 72)


def ink_extent(font: ImageFont.FreeTypeFont) -> int:
    """Height from the highest to the lowest ink any glyph of English text reaches (documents are
    English): the least collision-free pitch."""
    _, top, _, bottom = font.getbbox(ENGLISH_CHARSET)
    return bottom - top


def choose_style(rng: np.random.Generator, dpi: int, faces: tuple[FontFace, ...], columns: int) -> PageStyle:
    face = faces[int(rng.integers(len(faces)))]
    width_in, height_in = PAGE_SIZES_IN[str(rng.choice(list(PAGE_SIZES_IN)))]
    body_px = pt_to_px(rng.uniform(*BODY_PT), dpi)
    leading = max(round(body_px * rng.uniform(*LEADING)), ink_extent(load_font(face.path, body_px)) + 2)
    return PageStyle(
        face=face, width=round(width_in * dpi), height=round(height_in * dpi),
        margin=pt_to_px(72 * rng.uniform(*MARGIN_IN), dpi), columns=columns,
        gutter=pt_to_px(72 * rng.uniform(*GUTTER_IN), dpi), body_px=body_px, leading=leading,
        title_px=pt_to_px(rng.uniform(*TITLE_PT), dpi),
    )


def wrap_words(words: list[str], font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap: each line takes as many words as fit ``width`` pixels.

    Lines are filled by the sum of the word widths (measuring every growing line would cost
    quadratic time), then each is measured once and gives back words while kerning makes it overflow.
    """
    space = font.getlength(" ")
    extents = [font.getlength(word) for word in words]
    lines: list[str] = []
    start = 0
    while start < len(words):
        end, used = start + 1, extents[start]
        while end < len(words) and used + space + extents[end] <= width:
            used += space + extents[end]
            end += 1
        while end - start > 1 and font.getlength(" ".join(words[start:end])) > width:
            end -= 1
        lines.append(" ".join(words[start:end]))
        start = end
    return lines


def renderable_words(text: str, face: FontFace, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Words of ``text`` as ``face`` shows them, without those it lacks glyphs for or that overflow a column."""
    shown = (face.shown(word) for word in text.split() if face.covers(word))
    return [word for word in shown if font.getlength(word) <= width]


def line_flow(corpus: CorpusSampler, style: PageStyle, rng: np.random.Generator) -> Iterator[str | None]:
    """Endless body text wrapped to the column width; ``None`` marks the blank line between paragraphs."""
    font = load_font(style.face.path, style.body_px)
    while True:
        text = corpus.paragraph(int(rng.integers(PARAGRAPH_WORDS[0], PARAGRAPH_WORDS[1] + 1)))
        words = renderable_words(text, style.face, font, style.column_width)
        if words:
            yield from wrap_words(words, font, style.column_width)
            yield None


def fit_title(title: str, style: PageStyle) -> str:
    """Drop trailing words until the title fits one column (an empty result means no title)."""
    font = load_font(style.face.path, style.title_px)
    words = renderable_words(title, style.face, font, style.column_width)
    while words and font.getlength(" ".join(words)) > style.column_width:
        words.pop()
    return " ".join(words)


def layout_page(style: PageStyle, flow: Iterator[str | None], title: str, fill: float) -> list[PlacedLine]:
    """Place a title (if any) and then body lines column by column; the list order is the reading order."""
    placed: list[PlacedLine] = []
    body_top = [style.margin] * style.columns
    if title:
        placed.append(PlacedLine(title, style.column_left(0), style.margin, style.title_px, 0))
        title_bottom = load_font(style.face.path, style.title_px).getbbox(title)[3]
        body_top[0] = style.margin + title_bottom + style.leading
    last_top = style.height - style.margin - style.leading
    slots = [(block, y) for block in range(style.columns) for y in range(body_top[block], last_top + 1, style.leading)]
    for block, y in slots[: max(1, round(len(slots) * fill))]:
        line = next(flow)
        if line is None and y == body_top[block]:
            line = next(flow)  # a column never starts with the blank line between paragraphs
        if line is not None:
            placed.append(PlacedLine(line, style.column_left(block), y, style.body_px, block))
    return placed


def rotation_about_centre(width: int, height: int, angle_deg: float) -> np.ndarray:
    """3x3 matrix turning the page by ``angle_deg`` about its centre, as a skewed scan is."""
    return np.vstack([cv2.getRotationMatrix2D((width / 2, height / 2), angle_deg, 1.0), [0, 0, 1]])


def ink_box(mask: np.ndarray, origin: tuple[int, int], width: int, height: int) -> list[int] | None:
    """Axis-aligned box of the mask's ink in page pixels, clipped to the page; None if no ink."""
    rows = np.flatnonzero(mask.max(axis=1) >= INK_THRESHOLD)
    cols = np.flatnonzero(mask.max(axis=0) >= INK_THRESHOLD)
    if rows.size == 0:
        return None
    x0, y0 = max(0, origin[0] + int(cols[0])), max(0, origin[1] + int(rows[0]))
    x1, y1 = min(width, origin[0] + int(cols[-1]) + 1), min(height, origin[1] + int(rows[-1]) + 1)
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def paste_max(page: np.ndarray, mask: np.ndarray, origin: tuple[int, int]) -> None:
    """Add ``mask`` ink onto ``page`` at ``origin``, clipping whatever falls off the page."""
    x, y = origin
    top, left = max(0, y), max(0, x)
    bottom, right = min(page.shape[0], y + mask.shape[0]), min(page.shape[1], x + mask.shape[1])
    if bottom > top and right > left:
        region = page[top:bottom, left:right]
        np.maximum(region, mask[top - y : bottom - y, left - x : right - x], out=region)


def render_ink(placed: list[PlacedLine], style: PageStyle, skew_deg: float) -> tuple[np.ndarray, list[dict]]:
    """The page's ink mask and the ground-truth line records (text, box, baseline, block, order)."""
    page = np.zeros((style.height, style.width), dtype=np.uint8)
    turn = rotation_about_centre(style.width, style.height, skew_deg)
    records = []
    for line in placed:
        mask, (dx, dy) = render_mask(line.text, style.face, line.size_px)
        move = np.array([[1, 0, line.x + dx], [0, 1, line.y + dy], [0, 0, 1]], dtype=np.float64)
        warped, origin = warp_to_fit(mask, turn @ move)
        box = ink_box(warped, origin, style.width, style.height)
        if box is None:
            continue  # turned entirely off the page: nothing visible to annotate
        paste_max(page, warped, origin)
        records.append({"text": line.text, "bbox": box, "baseline": typeset_baseline(line, style.face, turn),
                        "block": line.block, "order": len(records)})
    return page, records


def typeset_baseline(line: PlacedLine, face: FontFace, turn: np.ndarray) -> list[list[int]]:
    """Ends of the line's baseline (its ink's left and right edge, the ascent below its origin) on the
    page, after the page's turn."""
    font = load_font(face.path, line.size_px)
    left, _, right, _ = font.getbbox(line.text)
    ascent = font.getmetrics()[0]
    ends = np.array([[line.x + left, line.y + ascent, 1], [line.x + right, line.y + ascent, 1]], np.float64)
    return np.rint(ends @ turn[:2].T).astype(int).tolist()


def add_specks(page: np.ndarray, rng: np.random.Generator) -> None:
    """A few dust specks, which a line detector must not mistake for text."""
    for _ in range(int(rng.integers(0, MAX_SPECKS + 1))):
        centre = (int(rng.integers(page.shape[1])), int(rng.integers(page.shape[0])))
        cv2.circle(page, centre, int(rng.integers(1, 3)), color=float(rng.uniform(40, 160)), thickness=-1)


def scan_look(ink: np.ndarray, rng: np.random.Generator, body_px: int, bitonal: bool) -> Image.Image:
    """Paper, ink tone, light blur and noise; thresholded to 1-bit for bitonal scans."""
    page = ink_on_paper(ink, rng)
    add_specks(page, rng)
    if rng.random() < P_PAGE_BLUR:
        page = blur(page, rng, body_px)
    grey = np.clip(add_noise(page, rng, max_sigma=6.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey >= 128) if bitonal else Image.fromarray(grey)


def save_document(pages: list[Image.Image], path: Path, dpi: int) -> None:
    first, rest = pages[0], pages[1:]
    if path.suffix == ".pdf":
        first.save(path, save_all=True, append_images=rest, resolution=dpi)
    else:
        compression = "group4" if first.mode == "1" else "tiff_lzw"
        first.save(path, save_all=True, append_images=rest, dpi=(dpi, dpi), compression=compression)


def write_document(path: Path, seed: int, dpi: int, page_count: int, columns: int,
                   faces: tuple[FontFace, ...], max_skew_deg: float) -> dict:
    """Typeset, render and save one document; return its ground truth."""
    rng = np.random.default_rng(seed)
    corpus = CorpusSampler(seed)
    style = choose_style(rng, dpi, faces, columns)
    flow = line_flow(corpus, style, rng)
    bitonal = rng.random() < P_BITONAL
    images, gt_pages = [], []
    for number in range(1, page_count + 1):
        title = fit_title(corpus.title(), style) if number == 1 and rng.random() < P_TITLE else ""
        fill = rng.uniform(*LAST_PAGE_FILL) if number == page_count else 1.0
        skew = float(rng.uniform(-max_skew_deg, max_skew_deg)) if max_skew_deg else 0.0
        ink, lines = render_ink(layout_page(style, flow, title, fill), style, skew)
        images.append(scan_look(ink, rng, style.body_px, bitonal))
        gt_pages.append({"page": number, "width": style.width, "height": style.height, "columns": columns,
                         "skew_deg": round(skew, 3), "lines": lines})
    save_document(images, path, dpi)
    return {"source": path.name, "dpi": dpi, "font": style.face.name, "bitonal": bool(bitonal), "pages": gt_pages}


def ground_truth_path(document: Path) -> Path:
    return Path(document).with_suffix(".gt.json")


def page_texts(ground_truth: dict) -> dict[int, str]:
    """Each page's text in reading order (block by block, lines in order), by page number."""
    def in_order(page: dict) -> list[dict]:
        return sorted(page["lines"], key=lambda line: (line["block"], line["order"]))

    return {page["page"]: "\n".join(line["text"] for line in in_order(page)) for page in ground_truth["pages"]}


def load_ground_truth(path: Path) -> dict:
    """The ground truth written beside a synthetic document (``NAME.pdf`` -> ``NAME.gt.json``)."""
    gt_path = ground_truth_path(path)
    if not gt_path.is_file():
        raise FileNotFoundError(f"no ground truth beside {path}: expected {gt_path}")
    return json.loads(gt_path.read_text(encoding="utf-8"))


def _check_document_args(count: int, dpi: int, formats: tuple[str, ...], pages_per_document: tuple[int, int],
                         two_column_share: float, max_skew_deg: float) -> None:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not DPI_RANGE[0] <= dpi <= DPI_RANGE[1]:
        raise ValueError(f"dpi must be from {DPI_RANGE[0]} to {DPI_RANGE[1]}, got {dpi}")
    if not formats or not set(formats) <= set(DOCUMENT_FORMATS):
        raise ValueError(f"formats must be a non-empty selection of {DOCUMENT_FORMATS}, got {formats}")
    low, high = pages_per_document
    if not 1 <= low <= high:
        raise ValueError(f"pages_per_document needs 1 <= min <= max, got {pages_per_document}")
    if not 0.0 <= two_column_share <= 1.0:
        raise ValueError(f"two_column_share must be in [0, 1], got {two_column_share}")
    if not 0.0 <= max_skew_deg <= MAX_SKEW_DEG:
        raise ValueError(f"max_skew_deg must be in [0, {MAX_SKEW_DEG}], got {max_skew_deg}")


def write_document_set(output_dir: Path, count: int, seed: int, dpi: int = 150,
                       formats: tuple[str, ...] = DOCUMENT_FORMATS, pages_per_document: tuple[int, int] = (1, 3),
                       two_column_share: float = 0.5, font_kind: str = "printed",
                       max_skew_deg: float = 0.0) -> list[Path]:
    """Write ``count`` documents ``doc_NNNN.pdf|tif`` (formats cycled) each with ``doc_NNNN.gt.json``.

    Document ``i`` depends only on ``(seed, i)`` and the arguments. Returns the document paths.
    """
    _check_document_args(count, dpi, tuple(formats), pages_per_document, two_column_share, max_skew_deg)
    faces = discover_fonts(font_kind)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    documents = []
    for index in range(count):
        document_seed = derive_seed(seed, index)
        choices = np.random.default_rng([document_seed, 1])
        page_count = int(choices.integers(pages_per_document[0], pages_per_document[1] + 1))
        columns = 2 if choices.random() < two_column_share else 1
        extension = {"pdf": "pdf", "tiff": "tif"}[formats[index % len(formats)]]
        path = output_dir / f"doc_{index:04d}.{extension}"
        gt = write_document(path, document_seed, dpi, page_count, columns, faces, max_skew_deg)
        ground_truth_path(path).write_text(json.dumps(gt, ensure_ascii=False, indent=1), encoding="utf-8")
        documents.append(path)
    return documents
