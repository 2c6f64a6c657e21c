"""Words: a recognized line split into words with pixel boxes, the input LayoutLM-style models need.

The work is split in two because the page image is gone after the layout stage and the text is only
known after recognition. :func:`ink_gaps` runs on each line crop in the layout stage and keeps the
blank column runs between the ink; :func:`split_words` runs once the text is known and picks as many
of those runs as the text has word breaks. Only columns are kept, so every word box spans the
line's height.
"""

from __future__ import annotations

import unicodedata
from itertools import groupby
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

Interval = tuple[int, int]  # x0, x1 (exclusive) in page pixels
BBox = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in page pixels

#: Crops at least twice this tall are halved until they are not: word gaps stay several pixels
#: wide and the cost per line stays well below a millisecond whatever the scan resolution.
WORK_HEIGHT = 32
#: Otsu's two classes must differ by this many gray levels, else the crop is blank paper.
MIN_INK_CONTRAST = 30
#: An ink pixel needs this many ink pixels in its 3x3 neighbourhood (itself included): drops
#: salt noise and pairs, keeps one-pixel strokes.
MIN_NEIGHBOURHOOD_INK = 3
#: Slants (x shift per row, positive leans right) tried to straighten italic and cursive script;
#: upright first so that ties keep the plain columns.
SLANTS = (0.0, 0.1, -0.1, 0.2, -0.2, 0.3, 0.4, 0.5)
#: Pixels of gap width a gap loses per pixel it lies away from where the character counts put
#: its word break: a tie-breaker that keeps one wrong pick from shifting every later word.
POSITION_WEIGHT = 0.05
#: Words between two placed breaks get at least this share of the width their characters take on the line: where
#: the text does not match the ink (a gap inside a letter, a word the model read twice), the break that would squeeze
#: them to a few pixels is let go, and they share a wider span by character count.
MIN_WORD_SHARE = 0.25
#: LayoutLM boxes are given on a 0-1000 grid of the page.
LAYOUT_SCALE = 1000
#: A blank run at least this many crop heights wide is taken for a space between words: a line too
#: long for the model is cut at such runs.
WORD_GAP_HEIGHTS = 0.25
#: A blank run at least this many crop heights wide is a tab or column stop (a catalogue's "Rheinfelden
#: (aquarelle).      80"): a line too long for the model is cut there first.
TAB_GAP_HEIGHTS = 1.0
#: Margin left above and below a line's ink by :func:`fit_rows_to_ink`, in ink heights, and its least.
INK_MARGIN = 0.1
MIN_INK_MARGIN_PX = 2
#: A line's body (its x-height band) is its longest run of rows holding at least this share of the inkiest
#: row's ink: ink from a neighbouring line stays outside it.
BODY_ROW_SHARE = 0.5



@dataclass(frozen=True)
class Word:
    """One word of a recognized line and where it is."""

    text: str
    bbox: BBox  # page pixels
    bbox_norm: BBox  # 0-1000 of the page width / height, as LayoutLM processors expect
    confidence: float | None = None  # from the word's tokens; None before recognition

    def to_row(self) -> dict:
        """The Arrow row of :data:`operators.records.WORD_TYPE`."""
        return {"text": self.text, "bbox": list(self.bbox), "bbox_norm": list(self.bbox_norm),
                "confidence": self.confidence}


def ink_gaps(crop: np.ndarray, origin: tuple[int, int]) -> list[Interval]:
    """Blank column runs of an 8-bit grayscale line crop, in page x coordinates, widest first.

    ``origin`` is the crop's top-left corner in page pixels. The runs include the margins before
    the first and after the last ink, which :func:`split_words` uses to trim the line's ends.
    Returns [] when the crop holds no ink (blank, or too faint to tell from the paper).

    Ink is Otsu's dark class less specks (pixels with fewer than two ink neighbours). For slanted
    script the columns follow the slant that leaves the most blank columns, and a run is reported
    where it crosses the crop's middle row. Tall crops are measured halved (see
    :data:`WORK_HEIGHT`), so their run ends are multiples of the halving factor.
    """
    _check_crop(crop)
    work, factor = crop, 1
    while work.shape[0] >= 2 * WORK_HEIGHT and work.shape[1] >= 2:  # halving: OpenCV's fast area path
        work, factor = cv2.resize(work, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA), factor * 2
    ink = _ink_pixels(work)
    if ink is None:
        return []
    occupied = _column_profile(*ink, work.shape) > 0
    x_offset = int(origin[0])
    runs = [(x_offset + start * factor, x_offset + end * factor) for start, end in _runs(~occupied)]
    return sorted(runs, key=lambda run: (run[0] - run[1], run[0]))


def fit_loose_crop(crop: np.ndarray) -> np.ndarray:
    """A line crop cut with a margin around the line (a detected line's padded crop, a dataset's line
    image) as the model reads it: the ink of its neighbouring lines painted out
    (:func:`_without_neighbour_ink`), then fitted to its ink rows (:func:`fit_rows_to_ink`). A crop cut
    tight along the line's polygon, outside it blank, takes :func:`fit_rows_to_ink` alone: its own accents
    and dots may touch its edges."""
    _check_crop(crop)
    ink = _ink_pixels(crop)
    painted = _without_neighbour_ink(crop, ink)
    if painted is not None:  # the ink changed: measured again
        crop, ink = painted, _ink_pixels(painted)
    return _fit_rows(crop, ink)


def fit_rows_to_ink(crop: np.ndarray) -> np.ndarray:
    """The crop less the rows above and below its ink beyond a margin of ``INK_MARGIN`` ink heights
    (at least ``MIN_INK_MARGIN_PX``); unchanged when it holds no ink.

    Recognizers are trained on tight line crops (TrOCR on SROIE and IAM boxes, the bundled model on
    rendered lines with 2-10 px around 24-48 px text); a detected line's crop carries the polygon's
    padding and the crop padding on top, which shrinks the text in the model's input.
    """
    _check_crop(crop)
    return _fit_rows(crop, _ink_pixels(crop))


def _fit_rows(crop: np.ndarray, ink: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    if ink is None:
        return crop
    top, bottom = int(ink[0].min()), int(ink[0].max())
    margin = max(MIN_INK_MARGIN_PX, round(INK_MARGIN * (bottom - top + 1)))
    return crop[max(0, top - margin):bottom + 1 + margin]


def cut_points(gaps: Sequence[Interval], width: int, height: int, max_aspect: float) -> list[int]:
    """Columns at which to cut a line crop wider than ``max_aspect``:1 so that every piece fits.

    Why: a keep-aspect model shrinks a longer line to fit its input, and shrunken glyphs are misread.
    ``gaps`` are the crop's :func:`ink_gaps` in crop x coordinates. Each cut is the middle of a blank run
    in the span still too long, chosen in this order:

    - the tab stop (a run :data:`TAB_GAP_HEIGHTS` wide) nearest the span's middle: a piece that keeps a wide
      blank run between its words reads worse (a catalogue's "(aquarelle).      80");
    - else the word gap (a run :data:`WORD_GAP_HEIGHTS` wide) nearest the middle;
    - else (tightly set type) the widest run near the middle (where both pieces fit, or in the span's middle
      half): the pieces are read apart and joined by a space, so a cut between two letters splits a word,
      and a typewriter's letter gaps are nearly as wide as its tight word gaps;
    - else the run nearest the middle among those at least half as wide as the span's widest.

    Returns [] when the crop fits, and leaves a span whole when it has no blank run inside.
    """
    if max_aspect <= 0:
        raise ValueError(f"max_aspect must be positive, got {max_aspect}")
    return _cuts(gaps, 0, width, max_aspect * height, WORD_GAP_HEIGHTS * height, TAB_GAP_HEIGHTS * height)


def _cuts(gaps: Sequence[Interval], start: int, end: int, max_width: float, word_gap: float,
          tab_gap: float) -> list[int]:
    span = end - start
    if span <= max_width:
        return []
    inside = [gap for gap in gaps if gap[0] > start and gap[1] < end]
    if not inside:
        return []
    middle = (start + end) / 2

    def off_middle(gap: Interval) -> float:
        return abs((gap[0] + gap[1]) / 2 - middle)

    def nearest(candidates: list[Interval]) -> Interval:
        return min(candidates, key=lambda gap: (off_middle(gap), gap[0]))

    tabs = [gap for gap in inside if gap[1] - gap[0] >= tab_gap]
    wide = tabs or [gap for gap in inside if gap[1] - gap[0] >= word_gap]
    if wide:
        x0, x1 = nearest(wide)
    elif near := [gap for gap in inside if off_middle(gap) <= max(max_width - span / 2, span / 4)]:
        x0, x1 = min(near, key=lambda gap: (gap[0] - gap[1], off_middle(gap), gap[0]))
    else:
        least = max(x1 - x0 for x0, x1 in inside) / 2
        x0, x1 = nearest([gap for gap in inside if gap[1] - gap[0] >= least])
    cut = (x0 + x1) // 2
    return (_cuts(gaps, start, cut, max_width, word_gap, tab_gap) + [cut]
            + _cuts(gaps, cut, end, max_width, word_gap, tab_gap))


def split_words(text: str, line_bbox: Sequence[int], gaps: Sequence[Interval],
                page_size: tuple[int, int], confidences: Sequence[float] = ()) -> list[Word]:
    """The words of a line's text in its order, each with a box inside ``line_bbox``, not overlapping: left
    to right, or right to left for a line whose first strong character is right-to-left (Hebrew, Arabic), with
    runs of left-to-right words in it left to right (:func:`_visual_order`).

    ``gaps`` are the line's :func:`ink_gaps`. Gaps reaching the line's ends are margins and trim the
    first and last word. Of the others, one is placed at each word break, in x order: the widest
    gaps win, but a gap loses :data:`POSITION_WEIGHT` of a pixel of width per pixel it lies away
    from where the words' character counts put its break, so one wrong pick does not shift every
    later word. When there are fewer gaps than word breaks, every gap is placed that way and the
    words between two placed breaks share their span in proportion to their character counts (all
    of the line when there is no gap at all). Every box spans the line's height. Returns [] when
    the text has no words. ``confidences``, one per word, are kept on the words (else None).
    """
    words = text.split()
    x0, y0, x1, y1 = _check_line(line_bbox, page_size)
    if not words:
        return []
    left, right, inner = _trim_margins(x0, x1, gaps)
    x_order = _visual_order(words) if _strong_direction(text) == "R" else list(range(len(words)))
    breaks = _place_breaks([words[index] for index in x_order], left, right, inner)
    edges = [left, *[edge for cut in breaks for edge in cut], right]
    boxes: list[BBox] = [(0, 0, 0, 0)] * len(words)
    for position, index in enumerate(x_order):
        boxes[index] = (edges[2 * position], y0, edges[2 * position + 1], y1)
    scores = list(confidences) if len(confidences) == len(words) else [None] * len(words)
    return [_word(word, box, page_size, score) for word, box, score in zip(words, boxes, scores)]


def _visual_order(words: Sequence[str]) -> list[int]:
    """The indices of a right-to-left line's words from left to right: the line reversed, except that a run of
    left-to-right words (a name or title in Latin letters, with the neutral words between them) keeps its own
    order, as the Unicode bidi algorithm lays it out."""
    strong = [_strong_direction(word) for word in words]
    resolved = []
    for index, direction in enumerate(strong):
        before = next((d for d in reversed(strong[:index]) if d), None)
        after = next((d for d in strong[index + 1:] if d), None)
        resolved.append(direction or ("L" if before == after == "L" else "R"))
    runs = [list(group) for _, group in groupby(range(len(words)), key=resolved.__getitem__)]
    return [index for run in reversed(runs) for index in (run if resolved[run[0]] == "L" else reversed(run))]


def _strong_direction(text: str) -> str | None:
    """"R" or "L" for the text's first strong character (bidi class R or AL, or L), None when it has none."""
    for character in text:
        direction = unicodedata.bidirectional(character)
        if direction in ("R", "AL"):
            return "R"
        if direction == "L":
            return "L"
    return None


def normalize_bbox(bbox: BBox, page_size: tuple[int, int]) -> BBox:
    """A pixel box on LayoutLM's 0-1000 page grid, clipped to it."""
    width, height = page_size
    scales = (width, height, width, height)
    return tuple(min(LAYOUT_SCALE, max(0, int(LAYOUT_SCALE * value / scale)))
                 for value, scale in zip(bbox, scales))


def _check_crop(crop: np.ndarray) -> None:
    if not isinstance(crop, np.ndarray) or crop.dtype != np.uint8 or crop.ndim != 2:
        raise ValueError(f"line crop must be a 2-D uint8 array, got {getattr(crop, 'dtype', type(crop))} "
                         f"with shape {getattr(crop, 'shape', None)}")
    if crop.size == 0:
        raise ValueError(f"line crop has zero size: shape {crop.shape}")


def _without_neighbour_ink(crop: np.ndarray, ink: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
    """The crop (whose ``ink`` is given) with ink that only reaches in from the lines above and below painted as
    paper (the crop's median), or None when there is none: a connected piece of ink that touches the crop's top
    edge and ends above the line's body (a descender of the line above), or touches its bottom edge and starts below
    it (capitals and ascenders of the line below). Such ink is not this line's text, and fitted to, it shrinks the
    text in the model's input (on a 1993 magazine scan, "fortress walls" read as "fortress wals"); the line's own
    accents and dots do not reach the edge of a crop cut with a margin."""
    if ink is None:
        return None
    dark = np.zeros(crop.shape, np.uint8)
    dark[ink] = 1
    body_top, body_bottom = _body_rows(dark.sum(axis=1))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
    top, bottom = stats[:, cv2.CC_STAT_TOP], stats[:, cv2.CC_STAT_TOP] + stats[:, cv2.CC_STAT_HEIGHT] - 1
    foreign = ((top == 0) & (bottom < body_top)) | ((bottom == crop.shape[0] - 1) & (top > body_bottom))
    foreign[0] = False  # the background
    if not foreign.any():
        return None
    # grown by a pixel, for the anti-aliased edge; 8-connected, so no ink of the line's own lies within it
    painted = cv2.dilate(foreign[labels].astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    out = crop.copy()
    out[painted] = np.uint8(np.median(crop))
    return out


def _body_rows(row_ink: np.ndarray) -> tuple[int, int]:
    """First and last row of the longest run of rows with at least ``BODY_ROW_SHARE`` of the inkiest row's
    ink: the line's x-height band, not the bottom of the line above that a loose crop also holds."""
    start, end = max(_runs(row_ink >= BODY_ROW_SHARE * row_ink.max()), key=lambda run: run[1] - run[0])
    return start, end - 1


def _ink_pixels(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows and columns of Otsu's dark class, or None when the crop is blank paper."""
    _, dark = cv2.threshold(crop, 0, 1, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    dark_count = cv2.countNonZero(dark)
    if dark_count in (0, crop.size):
        return None
    dark_mean = cv2.mean(crop, mask=dark)[0]
    paper_mean = (cv2.sumElems(crop)[0] - dark_mean * dark_count) / (crop.size - dark_count)
    if paper_mean - dark_mean < MIN_INK_CONTRAST:
        return None
    neighbourhood = cv2.boxFilter(dark, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    dark[neighbourhood < MIN_NEIGHBOURHOOD_INK] = 0
    if not dark.any():
        return None
    points = cv2.findNonZero(dark).reshape(-1, 2).T.astype(np.intp)
    return points[1], points[0]


def _column_profile(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Ink pixels per column once the script is straightened by the slant that leaves the most
    blank columns (searched on every other ink pixel: the ranking needs no more)."""
    height, width = shape
    row_shifts = np.rint(np.outer(SLANTS, np.arange(height) - (height - 1) / 2)).astype(np.intp)
    blanks = _blank_columns(_sheared_profiles(rows[::2], cols[::2], row_shifts, width))
    best = int(np.argmax(blanks))
    return _sheared_profiles(rows, cols, row_shifts[best:best + 1], width)[0]


def _sheared_profiles(rows: np.ndarray, cols: np.ndarray, row_shifts: np.ndarray, width: int) -> np.ndarray:
    """Ink per column (one profile per row of ``row_shifts``) with each pixel row shifted sideways."""
    shifted = np.clip(cols + row_shifts[:, rows], 0, width - 1)
    shifted += width * np.arange(len(row_shifts))[:, None]
    return np.bincount(shifted.ravel(), minlength=width * len(row_shifts)).reshape(-1, width)


def _blank_columns(profiles: np.ndarray) -> np.ndarray:
    """Per profile, the columns without ink between its first and its last inked column."""
    inked = profiles > 0
    first = inked.argmax(axis=1)
    last = inked.shape[1] - 1 - inked[:, ::-1].argmax(axis=1)
    return last - first + 1 - inked.sum(axis=1)


def _runs(mask: np.ndarray) -> list[Interval]:
    """Half-open runs of True in a boolean column mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _check_line(line_bbox: Sequence[int], page_size: tuple[int, int]) -> BBox:
    if len(line_bbox) != 4:
        raise ValueError(f"line bbox must be (x0, y0, x1, y1), got {line_bbox}")
    x0, y0, x1, y1 = (int(value) for value in line_bbox)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"line bbox {tuple(line_bbox)} has zero size")
    if len(page_size) != 2 or min(page_size) <= 0:
        raise ValueError(f"page size must be (width, height) > 0, got {page_size}")
    return x0, y0, x1, y1


def _trim_margins(x0: int, x1: int, gaps: Sequence[Interval]) -> tuple[int, int, list[Interval]]:
    """The line's span less the margins among ``gaps``, and the gaps strictly inside that span."""
    left, right = x0, x1
    for start, end in gaps:
        if end <= start:
            raise ValueError(f"gap ({start}, {end}) is empty")
        if start <= x0:
            left = max(left, min(end, x1))
        if end >= x1:
            right = min(right, max(start, x0))
    if left >= right:  # gaps cover the whole line: nothing to trim by
        left, right = x0, x1
    inner = [(start, end) for start, end in gaps if left < start and end < right]
    return left, right, inner


def _place_breaks(words: list[str], left: int, right: int, gaps: list[Interval]) -> list[Interval]:
    """One (end of word, start of next word) cut per word break, in x order."""
    expected = [(start + end) / 2 for start, end in _proportional_cuts(words, left, right)]
    cuts: list[Interval | None] = [None] * len(expected)
    for gap, index in _match_gaps(sorted(gaps), expected, right - left):
        cuts[index] = gap
    _let_go_squeezing_breaks(words, left, right, expected, cuts)
    return _fill_proportionally(words, left, right, cuts)


def _let_go_squeezing_breaks(words: list[str], left: int, right: int, expected: list[float],
                             cuts: list[Interval | None]) -> None:
    """Unplace breaks (in ``cuts``) until the words between every two placed ones, and the line's ends, get
    :data:`MIN_WORD_SHARE` of their width by character count; of the two around squeezed words, the one
    further from where it was expected goes first."""
    unit = (right - left) / (sum(len(word) for word in words) + len(words) - 1)
    while True:
        bounds = [-1, *[index for index, cut in enumerate(cuts) if cut is not None], len(cuts)]
        for first, last in zip(bounds, bounds[1:]):
            start = left if first < 0 else cuts[first][1]
            end = right if last == len(cuts) else cuts[last][0]
            units = sum(len(word) for word in words[first + 1:last + 1]) + last - first - 1
            if end - start < MIN_WORD_SHARE * units * unit:
                placed = [index for index in (first, last) if 0 <= index < len(cuts)]
                cuts[max(placed, key=lambda index: abs(sum(cuts[index]) / 2 - expected[index]))] = None
                break
        else:
            return


def _match_gaps(gaps: list[Interval], expected: list[float], span: int) -> list[tuple[Interval, int]]:
    """Gaps (in x order) matched in order to distinct breaks: as many as possible, and among those
    the set with the most width less :data:`POSITION_WEIGHT` times each one's distance from its
    break's expected position (dynamic programming over gaps x breaks)."""
    if not gaps or not expected:
        return []
    widths = np.array([end - start for start, end in gaps], float)
    centers = np.array([(start + end) / 2 for start, end in gaps])
    more_matches_win = span * (1 + POSITION_WEIGHT * len(expected)) + 1
    pair_score = more_matches_win + widths[:, None] - POSITION_WEIGHT * np.abs(centers[:, None] - expected)
    best = np.zeros((len(gaps) + 1, len(expected) + 1))
    for i in range(1, len(gaps) + 1):
        take = np.maximum(best[i - 1, 1:], best[i - 1, :-1] + pair_score[i - 1])
        best[i, 1:] = np.maximum.accumulate(take)
    matches, i, j = [], len(gaps), len(expected)
    while i > 0 and j > 0:
        if best[i, j] == best[i - 1, j]:
            i -= 1
        elif best[i, j] == best[i, j - 1]:
            j -= 1
        else:
            matches.append((gaps[i - 1], j - 1))
            i, j = i - 1, j - 1
    return matches[::-1]


def _fill_proportionally(words: list[str], left: int, right: int,
                         cuts: list[Interval | None]) -> list[Interval]:
    """Fill the unplaced breaks: words between two placed breaks share the span by character count."""
    anchors = [-1] + [index for index, cut in enumerate(cuts) if cut is not None] + [len(cuts)]
    filled = list(cuts)
    for first, last in zip(anchors, anchors[1:]):
        start = left if first < 0 else cuts[first][1]
        end = right if last == len(cuts) else cuts[last][0]
        for offset, (cut_start, cut_end) in enumerate(_proportional_cuts(words[first + 1:last + 1], start, end)):
            filled[first + 1 + offset] = (round(cut_start), round(cut_end))
    return filled


def _proportional_cuts(words: list[str], start: float, end: float) -> list[tuple[float, float]]:
    """The spaces between ``words`` laid over [start, end), one unit per character and per space."""
    units = sum(len(word) for word in words) + len(words) - 1
    scale = (end - start) / units
    cuts, used = [], 0
    for word in words[:-1]:
        used += len(word)
        cuts.append((start + used * scale, start + (used + 1) * scale))
        used += 1
    return cuts


def _word(text: str, bbox: BBox, page_size: tuple[int, int], confidence: float | None = None) -> Word:
    return Word(text, bbox, normalize_bbox(bbox, page_size), confidence)
