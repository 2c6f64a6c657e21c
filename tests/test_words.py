"""Word boxes from ink gaps, checked on lines rendered with real Debian fonts.

Each line is drawn word by word so that every word's true box is known (``font.getbbox`` at the
place it was drawn); the line crop is cut with the pipeline's own :func:`crop_line`. Word boxes
span their line's height by design (only columns survive the layout stage), so the truth box of a
word is its drawn horizontal extent over the line's vertical extent.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageFont

from operators.crops import crop_line
from operators.words import (
    INK_MARGIN,
    MIN_INK_MARGIN_PX,
    WORK_HEIGHT,
    Word,
    cut_points,
    fit_loose_crop,
    fit_rows_to_ink,
    ink_gaps,
    normalize_bbox,
    split_words,
)
from operators.records import WORD_TYPE
from operators.records import LineRecord

FONTS = {
    "sans": "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "monospace": "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "italic": "/usr/share/fonts/truetype/dejavu/DejaVuSerif-Italic.ttf",
    "garamond-italic": "/usr/share/fonts/opentype/ebgaramond/EBGaramond12-Italic.otf",
    "cursive-handwriting": "/usr/share/fonts/opentype/dancingscript/DancingScript-Regular.otf",
    "print-handwriting": "/usr/share/fonts/truetype/fifthhorseman/dkg.ttf",
    "slanted-handwriting": "/usr/share/fonts/truetype/kristi/Kristi.ttf",
}
LINES = (
    "The quick brown fox jumps over the lazy dog.",
    "Invoice No. 4711, dated 12 March 1987, total $1,250.00",
    'He said: "it is all in the archive, box 17"',
)
CROP_PADDING = 4
MIN_IOU = 0.7


def _render_line(text: str, font_path: str, slant: float = 0.0,
                 font_size: int = 36) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A page with one line drawn word by word, and each word's drawn x extent (``getbbox``).

    ``slant`` shears the page (x shift per pixel row up from the line's middle) the way slanted
    handwriting leans; a word's extent is then the ink of that word drawn alone and sheared alike."""
    font = ImageFont.truetype(font_path, font_size)
    size = (int(font.getlength(text)) + 160, 4 * font_size)
    top, middle = font_size, font_size * 3 // 2
    page = Image.new("L", size, 255)
    extents, position = [], 0
    for word in text.split(" "):
        start = text.index(word, position)
        position = start + len(word)
        x = 80 + font.getlength(text[:start])
        ImageDraw.Draw(page).text((x, top), word, font=font, fill=15)
        if slant:
            alone = Image.new("L", size, 255)
            ImageDraw.Draw(alone).text((x, top), word, font=font, fill=15)
            columns = np.flatnonzero((_shear(alone, slant, middle) < 128).any(axis=0))
            extents.append((int(columns[0]), int(columns[-1]) + 1))
        else:
            left, _, right, _ = font.getbbox(word)
            extents.append((round(x + left), round(x + right)))
    return _shear(page, slant, middle), extents


def _shear(image: Image.Image, slant: float, middle: int) -> np.ndarray:
    return np.array(image.transform(image.size, Image.AFFINE, (1, slant, -slant * middle, 0, 1, 0),
                                    resample=Image.BILINEAR, fillcolor=255))


def _ink_line(page: np.ndarray) -> LineRecord:
    """The line record a detector would give: the ink's box with a small margin."""
    rows, cols = np.nonzero(page < 128)
    x0, y0, x1, y1 = cols.min() - 3, rows.min() - 3, cols.max() + 4, rows.max() + 4
    return LineRecord(bbox=(x0, y0, x1, y1), polygon=[(x0, y0), (x1, y0), (x1, y1), (x0, y1)],
                      baseline=[(x0, y1 - 1), (x1, y1 - 1)], block=0, order=0)


def _words_of(page: np.ndarray, line: LineRecord, text: str) -> list[Word]:
    x0, y0 = line.bbox[:2]
    origin = (max(0, x0 - CROP_PADDING), max(0, y0 - CROP_PADDING))
    gaps = ink_gaps(crop_line(page, line, CROP_PADDING), origin)
    return split_words(text, line.bbox, gaps, (page.shape[1], page.shape[0]))


def _iou(a, b) -> float:
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _share_matched(font_path: str, salt: float = 0.0, slant: float = 0.0, font_size: int = 36) -> float:
    """Share of words whose box overlaps the truth enough; ``salt``: share of pixels blackened."""
    matched = total = 0
    for text in LINES:
        page, extents = _render_line(text, font_path, slant, font_size)
        line = _ink_line(page)
        page[np.random.default_rng(7).random(page.shape) < salt] = 0
        _, y0, _, y1 = line.bbox
        words = _words_of(page, line, text)
        assert [word.text for word in words] == text.split()
        for word, (left, right) in zip(words, extents):
            matched += _iou(word.bbox, (left, y0, right, y1)) >= MIN_IOU
            total += 1
    return matched / total


@pytest.mark.parametrize("font", sorted(FONTS))
def test_word_boxes_match_the_drawn_words(font):
    assert _share_matched(FONTS[font]) >= 0.9


@pytest.mark.parametrize("font", ["sans", "italic", "cursive-handwriting"])
def test_word_boxes_survive_salt_noise(font):
    assert _share_matched(FONTS[font], salt=0.02) >= 0.9


@pytest.mark.parametrize("font", ["sans", "cursive-handwriting"])
def test_word_boxes_follow_strongly_slanted_script(font):
    """Sheared by 0.35 no blank column is left between many words: the slant search finds them."""
    assert _share_matched(FONTS[font], slant=0.35) >= 0.9


@pytest.mark.parametrize("font", ["sans", "cursive-handwriting"])
def test_word_boxes_from_tall_crops_measured_halved(font):
    """100 px type gives crops over twice WORK_HEIGHT tall: gaps are found on the halved crop."""
    page, _ = _render_line(LINES[0], FONTS[font], font_size=100)
    _, y0, _, y1 = _ink_line(page).bbox
    assert y1 - y0 >= 2 * WORK_HEIGHT
    assert _share_matched(FONTS[font], font_size=100) >= 0.9


@pytest.mark.parametrize("font", ["sans", "garamond-italic", "print-handwriting"])
def test_a_line_too_long_for_the_model_is_cut_between_words_into_pieces_that_fit(font):
    text = "Invoice No. 4711, dated 12 March 1987, total $1,250.00 paid in full by the archive office"
    page, extents = _render_line(text, FONTS[font])
    line = _ink_line(page)
    crop = crop_line(page, line, CROP_PADDING)
    height, width = crop.shape
    max_aspect = width / height / 3.5  # the line is 3.5 times too long
    cuts = cut_points(ink_gaps(crop, (0, 0)), width, height, max_aspect)
    bounds = [0, *cuts, width]
    assert len(cuts) >= 3 and cuts == sorted(cuts)
    assert all(end - start <= max_aspect * height for start, end in zip(bounds, bounds[1:]))
    left = max(0, line.bbox[0] - CROP_PADDING)
    for cut in cuts:  # in page x: between two drawn words, never through one
        assert not any(x0 < cut + left < x1 for x0, x1 in extents)


def test_cuts_prefer_word_gaps_and_leave_fitting_or_gapless_spans_whole():
    assert cut_points([(300, 310)], width=500, height=20, max_aspect=30) == []  # fits: 500 <= 600
    assert cut_points([], width=1000, height=20, max_aspect=10) == []  # no blank run to cut at
    # the 2 px run lies nearer the middle, but the 10 px run (a word gap at height 20) wins
    assert cut_points([(490, 492), (300, 310)], width=1000, height=20, max_aspect=40) == [305]
    # the 695 px right part still exceeds 600: cut again, at a letter gap when that is all there is
    assert cut_points([(490, 492), (300, 310)], width=1000, height=20, max_aspect=30) == [305, 491]
    # a tab stop (a run at least a line height wide) wins over a word gap nearer the middle: "74 Rheinfelden
    # (aquarelle).      80" is cut before "80", not before "(aquarelle)."
    assert cut_points([(480, 490), (700, 940)], width=1000, height=20, max_aspect=45) == [820]
    assert cut_points([(480, 490), (700, 715)], width=1000, height=20, max_aspect=45) == [485]
    # no word gap (16 px at height 64): the widest run near the middle, not a letter gap nearer it that is merely
    # half as wide as the line's widest run (typewriting: "Mes|ser" read as "Mes ser")
    assert cut_points([(996, 1004), (900, 912), (1800, 1814)], width=2000, height=64, max_aspect=20) == [906]
    with pytest.raises(ValueError, match="max_aspect"):
        cut_points([], width=10, height=10, max_aspect=0)


def test_gaps_are_widest_first_in_page_coordinates():
    page, _ = _render_line(LINES[0], FONTS["sans"])
    line = _ink_line(page)
    crop = crop_line(page, line, CROP_PADDING)
    at_zero = ink_gaps(crop, (0, 0))
    moved = ink_gaps(crop, (250, 40))
    assert moved == [(start + 250, end + 250) for start, end in at_zero]
    widths = [end - start for start, end in at_zero]
    assert widths == sorted(widths, reverse=True) and min(widths) > 0
    assert len(at_zero) >= len(LINES[0].split()) + 1  # word breaks plus both margins


def test_blank_and_faint_crops_have_no_gaps():
    assert ink_gaps(np.full((40, 300), 255, np.uint8), (0, 0)) == []
    scanner_texture = np.full((40, 300), 240, np.uint8)
    scanner_texture[:, ::9] = 228  # faint streaks: Otsu splits them off, yet they are paper
    assert ink_gaps(scanner_texture, (0, 0)) == []


@pytest.mark.parametrize("crop", [np.zeros((0, 10), np.uint8), np.zeros((10, 10), np.float32),
                                  np.zeros((10, 10, 3), np.uint8)])
def test_ink_gaps_rejects_what_is_not_a_grayscale_crop(crop):
    with pytest.raises(ValueError, match="line crop"):
        ink_gaps(crop, (0, 0))
    with pytest.raises(ValueError, match="line crop"):
        fit_rows_to_ink(crop)


@pytest.mark.parametrize("font", ["sans", "cursive-handwriting"])
def test_a_crop_is_fitted_to_its_ink_rows_with_a_small_margin(font):
    page, _ = _render_line(LINES[1], FONTS[font])
    rows = np.flatnonzero((page < 128).any(axis=1))
    padded = np.pad(page[rows[0]:rows[-1] + 1], ((40, 25), (0, 0)), constant_values=255)  # a detector's loose crop
    speck = padded.copy()
    speck[5, 10] = 0  # a single dark pixel is no ink
    ink_height = rows[-1] - rows[0] + 1
    margin = max(MIN_INK_MARGIN_PX, round(INK_MARGIN * ink_height))
    for crop in (padded, speck):
        fitted = fit_rows_to_ink(crop)
        assert fitted.shape[1] == crop.shape[1] and abs(len(fitted) - (ink_height + 2 * margin)) <= 2
        starts = [start for start in range(38 - margin, 43 - margin)
                  if np.array_equal(fitted, crop[start:start + len(fitted)])]
        assert starts, "not a slice of the crop's rows around its ink"  # anti-aliased edges may count or not


def test_ink_reaching_in_from_the_lines_above_and_below_is_painted_out():
    """A loose crop of a tightly set line holds the descenders of the line above (touching its top edge) and
    the capitals of the line below (its bottom edge): fitted as a loose crop, it is the crop of the line alone,
    its own umlaut dots and descenders kept; and a crop without foreign ink is returned as it is."""
    font = ImageFont.truetype(FONTS["sans"], 36)

    def page(lines: list[tuple[int, int, str]]) -> np.ndarray:
        image = Image.new("L", (1000, 300), 255)
        for x, y, text in lines:
            ImageDraw.Draw(image).text((x, y), text, font=font, fill=15)
        return np.asarray(image)

    line = (20, 110, "Über die Brücke, 1987 (gezählt)")
    alone = page([line])
    crowded = page([(650, 72, "quay gaps jig"), line, (20, 146, "HELD BY TOM")])
    rows = np.flatnonzero((alone < 128).any(axis=1))
    top, bottom = rows[0] - 6, rows[-1] + 7  # a detector's loose crop
    crop_alone, crop_crowded = alone[top:bottom], crowded[top:bottom]
    assert (crop_crowded[0] < 128).any() and (crop_crowded[-1] < 128).any()  # the premise: both edges touched
    assert np.array_equal(fit_loose_crop(crop_alone), fit_rows_to_ink(crop_alone))  # nothing to paint out
    assert np.array_equal(fit_loose_crop(crop_crowded), fit_rows_to_ink(crop_alone))
    # a crop cut tight along the ink: the dots of "Ü" touch its top edge and would be painted out, so such
    # crops (training lines cut along their polygons) are fitted only, every dot kept
    tight = alone[rows[0]:rows[-1] + 1]
    assert not np.array_equal(fit_loose_crop(tight), tight)
    assert np.array_equal(fit_rows_to_ink(tight), tight)


def test_blank_crops_are_not_fitted():
    blank = np.full((40, 300), 250, np.uint8)
    assert fit_rows_to_ink(blank) is blank


def test_words_without_usable_gaps_split_by_character_counts():
    words = split_words("aa bb cc", (0, 5, 90, 15), [], (100, 20))
    assert [word.bbox for word in words] == [(0, 5, 22, 15), (34, 5, 56, 15), (68, 5, 90, 15)]


def test_fewer_gaps_than_breaks_go_to_the_nearest_break():
    words = split_words("aa bb cc", (0, 5, 90, 15), [(60, 70)], (100, 20))
    assert [word.bbox[::2] for word in words] == [(0, 24), (36, 60), (70, 90)]


def test_a_slightly_wider_gap_far_from_any_break_loses_to_one_in_place():
    words = split_words("aaaa bbbb cccc", (0, 0, 140, 10), [(40, 50), (90, 99), (120, 130)], (200, 10))
    assert [word.bbox[::2] for word in words] == [(0, 40), (50, 90), (99, 140)]


def test_a_gap_that_would_squeeze_words_to_a_few_pixels_is_let_go():
    """Where the text does not match the ink (gaps inside the first letters), every gap had been placed at a break,
    and "hello" and "world" had got boxes 10 pixels wide on a line of 1,000."""
    words = split_words("hello world foo", (0, 0, 1000, 10), [(10, 20), (30, 40)], (1000, 10))
    assert [word.bbox[::2] for word in words] == [(0, 333), (400, 733), (800, 1000)]
    words = split_words("hello world foo", (0, 0, 1000, 10), [(10, 20), (700, 760)], (1000, 10))
    assert [word.bbox[::2] for word in words] == [(0, 318), (382, 700), (760, 1000)]


def test_margins_trim_the_line_ends():
    words = split_words("one two", (10, 0, 110, 10), [(6, 14), (50, 58), (104, 114), (30, 31)], (200, 10))
    assert [word.bbox[::2] for word in words] == [(14, 50), (58, 104)]


def test_a_right_to_left_line_gets_its_boxes_from_the_right():
    """Hebrew and Arabic are written from the right: the text's first word stands rightmost (digits and Latin
    words alone inside keep the line's direction)."""
    words = split_words("שלום עולם 1905", (0, 0, 300, 10), [(90, 110), (190, 210)], (400, 10), (0.9, 0.8, 0.7))
    assert [(word.text, word.bbox[::2], word.confidence) for word in words] == [
        ("שלום", (210, 300), 0.9), ("עולם", (110, 190), 0.8), ("1905", (0, 90), 0.7)]
    assert [word.bbox[::2] for word in split_words("1905 is left", (0, 0, 300, 10), [(90, 110), (190, 210)],
                                                   (400, 10))] == [(0, 90), (110, 190), (210, 300)]



def test_latin_words_in_a_right_to_left_line_keep_their_own_order():
    """A title in Latin letters inside Hebrew is laid out left to right, as a run: "Genesis Exodus" had got each
    other's boxes (all words reversed), in every export and the PDF text layer."""
    words = split_words("ספר Genesis Exodus פרק", (100, 0, 478, 10), [(154, 166), (292, 304), (412, 424)], (600, 10))
    assert [(word.text, word.bbox[0], word.bbox[2]) for word in words] == [
        ("ספר", 424, 478), ("Genesis", 166, 292), ("Exodus", 304, 412), ("פרק", 100, 154)]

def test_single_word_and_empty_text():
    assert split_words("   ", (0, 0, 50, 10), [(20, 30)], (100, 100)) == []
    assert split_words("", (0, 0, 50, 10), [], (100, 100)) == []
    [word] = split_words("alone", (5, 0, 50, 10), [(20, 30)], (100, 100))
    assert word.bbox == (5, 0, 50, 10) and word.text == "alone"


@pytest.mark.parametrize("seed", range(5))
def test_boxes_stay_inside_the_line_in_order_without_overlap(seed):
    rng = np.random.default_rng(seed)
    line = (40, 10, 640, 50)
    starts = np.sort(rng.choice(np.arange(30, 650, 12), size=rng.integers(0, 20), replace=False))
    gaps = [(int(start), int(start + rng.integers(1, 11))) for start in starts]
    text = " ".join("w" * int(length) for length in rng.integers(1, 9, size=rng.integers(1, 25)))
    words = split_words(text, line, gaps, (700, 100))
    assert len(words) == len(text.split())
    edges = [edge for word in words for edge in word.bbox[::2]]
    assert edges == sorted(edges) and edges[0] >= line[0] and edges[-1] <= line[2]
    assert all(word.bbox[1::2] == line[1::2] for word in words)


def test_normalized_boxes_use_the_layoutlm_grid_and_clip():
    assert normalize_bbox((500, 250, 1000, 500), (2000, 1000)) == (250, 250, 500, 500)
    assert normalize_bbox((1999, 0, 2500, 1000), (2000, 1000)) == (999, 0, 1000, 1000)
    [word] = split_words("x", (100, 100, 300, 200), [], (1000, 400))
    assert word.bbox_norm == (100, 250, 300, 500)


@pytest.mark.parametrize("line_bbox, page_size, gaps, message", [
    ((10, 0, 10, 5), (100, 100), [], "zero size"),
    ((0, 0, 10), (100, 100), [], "x0, y0, x1, y1"),
    ((0, 0, 10, 5), (0, 100), [], "page size"),
    ((0, 0, 10, 5), (100, 100), [(4, 4)], "empty"),
])
def test_split_words_rejects_bad_geometry(line_bbox, page_size, gaps, message):
    with pytest.raises(ValueError, match=message):
        split_words("a b", line_bbox, gaps, page_size)


def test_words_convert_to_the_arrow_word_type():
    words = split_words("Dear Sir,", (0, 0, 100, 20), [(40, 52)], (200, 100), confidences=[0.5, 0.25])
    rows = [word.to_row() for word in words]
    array = pa.array(rows, type=WORD_TYPE)
    assert array.to_pylist() == rows == [
        {"text": "Dear", "bbox": [0, 0, 40, 20], "bbox_norm": [0, 0, 200, 200], "confidence": 0.5},
        {"text": "Sir,", "bbox": [52, 0, 100, 20], "bbox_norm": [260, 0, 500, 200], "confidence": 0.25},
    ]
    assert [word.confidence for word in split_words("Dear Sir,", (0, 0, 100, 20), [(40, 52)], (200, 100))] == [
        None, None]
