"""Synthetic single-line training images, streamed (:func:`iter_lines`) or written to disk.

Line ``i`` of a set depends only on ``(seed, i)``: a set written in several chunks with
``start_index`` is identical to one written at once, and DataLoader workers can split a stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.synth.corpus import CorpusSampler, Language, check_languages
from pipeline.synth.degrade import scanned_line
from pipeline.synth.fonts import FontFace, discover_fonts, load_font

#: Font size in pixels (roughly the ascender-to-descender height of the ink).
FONT_PX_RANGE = (24, 48)
MAX_LINE_CHARS = 70
MANIFEST_HEADER = ("image", "text", "font", "font_kind")
#: Render padding so no glyph part (italic overhang, accents) is clipped before the tight crop.
RENDER_PAD_PX = 6


def derive_seed(seed: int, index: int) -> int:
    """An independent 63-bit seed for item ``index`` (a line, a document) of the set ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def render_mask(text: str, face: FontFace, font_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """White-on-black coverage mask of ``text`` in ``face``, padded by RENDER_PAD_PX.

    Also returns where the mask's top-left corner lies relative to the text origin (the left end
    of the ascender line, Pillow's default "la" anchor), so a caller can place it on a page.
    """
    font = load_font(face.path, font_px)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left + 2 * RENDER_PAD_PX, bottom - top + 2 * RENDER_PAD_PX), 0)
    ImageDraw.Draw(canvas).text((RENDER_PAD_PX - left, RENDER_PAD_PX - top), text, fill=255, font=font)
    return np.asarray(canvas), (left - RENDER_PAD_PX, top - RENDER_PAD_PX)


def pick_face(faces: tuple[FontFace, ...], text: str, rng: np.random.Generator) -> FontFace:
    """A random face with a glyph for every character of ``text``."""
    usable = [face for face in faces if face.covers(text)]
    if not usable:
        raise ValueError(f"no installed font has glyphs for every character of {text!r}")
    return usable[int(rng.integers(len(usable)))]


def synth_line(corpus: CorpusSampler, faces: tuple[FontFace, ...], seed: int) -> tuple[Image.Image, str, FontFace]:
    """One degraded line image with its text and face, fully determined by ``seed``."""
    corpus.reseed(seed)
    rng = np.random.default_rng(seed)
    text = corpus.line(MAX_LINE_CHARS)
    face = pick_face(faces, text, rng)
    text = face.shown(text)
    font_px = int(rng.integers(FONT_PX_RANGE[0], FONT_PX_RANGE[1] + 1))
    mask, _ = render_mask(text, face, font_px)
    pixels = scanned_line(mask, rng, font_px)
    return Image.fromarray(pixels), text, face


def iter_lines(count: int, seed: int, font_kind: str = "printed", start_index: int = 0,
               languages: Sequence[Language] = ("en",)) -> Iterator[tuple[Image.Image, str, str]]:
    """Stream ``count`` (grey image, text, font name) triples without touching the disk."""
    if count < 0 or start_index < 0:
        raise ValueError(f"count and start_index must be >= 0, got {count} and {start_index}")
    faces = discover_fonts(font_kind)
    corpus = CorpusSampler(seed, languages)
    for index in range(start_index, start_index + count):
        image, text, face = synth_line(corpus, faces, derive_seed(seed, index))
        yield image, text, face.name


def _manifest_row(*fields: str) -> str:
    return "\t".join(fields) + "\n"


def write_line_set(output_dir: Path, count: int, seed: int, font_kind: str = "printed",
                   start_index: int = 0, languages: Sequence[Language] = ("en",)) -> Path:
    """Write ``line_NNNNNN.png`` + ``.gt.txt`` pairs and ``manifest.tsv``; return the folder.

    ``start_index`` 0 starts a fresh manifest; a later chunk (``start_index`` > 0) appends to it.
    CHARSET has no tab or newline, so the manifest needs no quoting.
    """
    languages = check_languages(languages)  # before the manifest is opened (and truncated)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = output_dir / "manifest.tsv"
    fresh = start_index == 0 or not manifest.exists()
    faces = {face.name: face for face in discover_fonts(font_kind)}
    with manifest.open("w" if fresh else "a", encoding="utf-8") as rows:
        if fresh:
            rows.write(_manifest_row(*MANIFEST_HEADER))
        lines = iter_lines(count, seed, font_kind, start_index, languages)
        for index, (image, text, font_name) in enumerate(lines, start=start_index):
            stem = f"line_{index:06d}"
            image.save(output_dir / f"{stem}.png")
            (output_dir / f"{stem}.gt.txt").write_text(text, encoding="utf-8")
            rows.write(_manifest_row(f"{stem}.png", text, font_name, faces[font_name].kind))
    return output_dir
