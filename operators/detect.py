"""Classical text-line detection and reading order for one page image (OpenCV + numpy).

The page is analysed at a reduced working resolution (``WORK_DPI``): binarized with Sauvola
(survives uneven paper and faint bleed-through), cleaned of specks, rules and scan borders, and
measured: the line pitch (distance between baselines, from the autocorrelation of row profiles)
is the unit of every later threshold, so the method adapts to the script size. The page is then
deskewed by a projection-profile search, cut into blocks by a recursive XY-cut on whitespace,
and each block is split into lines by thresholding an ink-density map smoothed along the text
direction. Every ink pixel of a block goes to its nearest line core, so a line polygon follows
its own ascenders and descenders and stops where the neighbouring line begins. Polygons are
mapped back to the original page coordinates: callers never see the deskewed frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from operators.settings import DetectConfig
from operators.records import LineRecord

#: Resolution the analysis runs at: enough for line geometry, a quarter of the pixels of 300 dpi.
WORK_DPI = 150
#: At most this many pixels are analysed, whatever the page's size (24 Mpx is an A1 sheet at ``WORK_DPI``): a poster
#: or map of 15,000 x 15,000 px at 150 dpi had been analysed whole, at 31 bytes a pixel (7 GB, against a layout task's
#: 1 GB).
MAX_WORK_PIXELS = 24_000_000
#: Config pixel values are given at this resolution.
CONFIG_DPI = 300
#: Ink must lie where the local background is at least this share of the paper brightness.
PAPER_SHARE = 0.6
#: A separate piece of paper smaller than this share of the largest is no page (ruler, colour
#: chart, library banner, a sliver of the facing page).
SHEET_SHARE = 0.25
#: The least autocorrelation of the row profiles (per strip with ink) at a line pitch: the weakest page of
#: handwriting measured gives 0.13; a page of a single short line had taken a ripple at 0.07, four glyph heights
#: away, for its pitch, and lost the line to the padding that pitch gave it.
MIN_PITCH_CORRELATION = 0.1
#: Window, in glyph heights, of the running mean removed from row profiles before the line
#: pitch is measured: several lines long, so the line rhythm itself stays.
TREND_GLYPHS = 6
#: A run of ink along one row at least this many glyph heights long is a rule (or part of one): no letter is.
RULE_GLYPHS = 4
#: A rule is at most this many glyph heights thick: the dark rows of a picture are runs as long.
RULE_THICKNESS = 0.5
#: A rule crosses a gutter where it covers at least this share of the gutter's width (it may be a pixel off).
RULE_CROSSING_SHARE = 0.95
#: The side of a gap at most this many pitches wide, whose every row of ink lies in a row of the other side's, holds
#: labels of the other side's lines (a list's numbers, a ledger's item marks), not a column.
LABEL_PITCHES = 2.0

Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass(frozen=True)
class _Frame:
    """Maps points of the deskewed working image back to original page pixels."""

    scale: float  # working pixels per page pixel
    to_work: np.ndarray  # 2x3 affine: deskewed working coords -> unrotated working coords
    page_shape: tuple[int, int]

    def to_page(self, points: np.ndarray) -> np.ndarray:
        work = points @ self.to_work[:, :2].T + self.to_work[:, 2]
        page = np.rint(work / self.scale).astype(np.int64)
        height, width = self.page_shape
        page[:, 0] = np.clip(page[:, 0], 0, width - 1)
        page[:, 1] = np.clip(page[:, 1], 0, height - 1)
        return page


@dataclass(frozen=True)
class _Line:
    """A line in the deskewed working frame: its outline and the extent used to order it."""

    polygon: np.ndarray  # (N, 2) float, clockwise in image coordinates
    baseline: np.ndarray  # (K, 2) float polyline, left to right
    x_start: float
    y_top: float
    y_bottom: float


def detect_lines(page: np.ndarray, dpi: int, config: DetectConfig) -> list[LineRecord]:
    """Text lines of an 8-bit grayscale page in reading order; [] when the page holds no text."""
    check_page(page)
    if dpi <= 0:
        raise ValueError(f"dpi must be positive, got {dpi}")
    scale = min(1.0, WORK_DPI / dpi, math.sqrt(MAX_WORK_PIXELS / page.size))
    work_dpi = dpi * scale
    small = cv2.resize(page, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else page
    ink, contrast = _binarize(small, _odd(config.sauvola_window_px * work_dpi / CONFIG_DPI), config.sauvola_k)
    min_height = max(2.0, config.min_line_height_px * work_dpi / CONFIG_DPI)
    text, glyph_height = _clean(ink, contrast, min_height, config.min_contrast)
    if glyph_height is None:
        return []
    angle = _estimate_skew(text, glyph_height, config.max_skew_deg)
    upright, to_work = _rotate(text, angle)
    rules = _horizontal_rules(ink, glyph_height)
    rules = rules if rules is None else _rotate(rules, angle)[0]
    pitch = _line_pitch(upright, glyph_height)
    frame = _Frame(scale=scale, to_work=to_work, page_shape=page.shape)
    records: list[LineRecord] = []
    block = 0
    letter_size = _letter_sizes(upright, glyph_height)
    for rect in _find_blocks(upright, letter_size, rules, pitch, config):
        lines = _lines_in_block(upright, letter_size, rect, pitch, glyph_height, config)
        for line in lines:
            records.append(_record(frame.to_page(line.polygon), frame.to_page(line.baseline), block, len(records)))
        block += bool(lines)
    return records


def check_page(page: np.ndarray) -> None:
    if not isinstance(page, np.ndarray):
        raise ValueError(f"page must be a numpy array, got {type(page).__name__}")
    if page.dtype != np.uint8:
        raise ValueError(f"page must be 8-bit grayscale (uint8), got dtype {page.dtype}")
    if page.ndim != 2:
        raise ValueError(f"page must be a 2-D grayscale array, got shape {page.shape}")
    if page.size == 0:
        raise ValueError(f"page has zero size: shape {page.shape}")


def _odd(value: float) -> int:
    size = max(3, int(round(value)))
    return size if size % 2 else size + 1


def _binarize(gray: np.ndarray, window: int, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Sauvola ink mask (uint8 0/1) and each pixel's contrast against the paper around it.

    Ink is darker than its window's adaptive threshold. Only pixels on the page's paper count:
    where the local background (the brightest value nearby) is far darker than the page's paper
    (scanner bed, book cover, shadows), Sauvola would turn texture into ink, and text on small
    separate pieces of paper beside the page (see :func:`_sheets`) is not the page's."""
    values = gray.astype(np.float32)
    mean = cv2.boxFilter(values, -1, (window, window), borderType=cv2.BORDER_REFLECT)
    mean_sq = cv2.boxFilter(values * values, -1, (window, window), borderType=cv2.BORDER_REFLECT)
    std = np.sqrt(np.maximum(mean_sq - mean * mean, 0))
    threshold = mean * (1 + k * (std / 128.0 - 1))
    square = cv2.getStructuringElement(cv2.MORPH_RECT, (window, window))
    paper = cv2.dilate(gray, square)
    level = PAPER_SHARE * float(np.percentile(paper, 90))
    on_paper = (paper > level) & _sheets(gray > level, square)
    return ((values < threshold) & on_paper).astype(np.uint8), paper.astype(np.float32) - values


def _sheets(bright: np.ndarray, square: np.ndarray) -> np.ndarray:
    """Where the pages lie: connected areas of bright paper of at least ``SHEET_SHARE`` of the
    largest, widened by ``square`` to take in the ink on them.

    Scanner targets, rulers and banners lie on the scan as separate small pieces of paper; both
    pages of an open book are large and both stay."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8), connectivity=4)
    if count <= 1:
        return np.zeros(bright.shape, bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    pages = np.concatenate([[False], areas >= SHEET_SHARE * areas.max()])
    # a piece of the size of a few words that only thin lines part from what lies around it is the page's paper:
    # the rules of a table or form cut it into cells, whose text had been left out with the scanner targets; a
    # piece beside dark areas wider than a rule (a card on the scanner bed, a book's fore-edge, the light parts of
    # a picture) stays out
    rule = cv2.getStructuringElement(cv2.MORPH_RECT, (_odd(square.shape[0] / 8),) * 2)
    reach = rule.shape[0] * 2
    for label in np.flatnonzero(~pages[1:] & (areas >= square.size)) + 1:
        left, top, width, height = stats[label, :4]
        rows = slice(max(0, top - reach), top + height + reach)
        cols = slice(max(0, left - reach), left + width + reach)
        wide_dark = cv2.morphologyEx((~bright[rows, cols]).astype(np.uint8), cv2.MORPH_OPEN, rule)
        pages[label] = not (cv2.dilate(wide_dark, rule).astype(bool) & (labels[rows, cols] == label)).any()
    return cv2.dilate(pages.astype(np.uint8)[labels], square) > 0


def _clean(
    ink: np.ndarray, contrast: np.ndarray, min_height: float, min_contrast: float
) -> tuple[np.ndarray, float | None]:
    """Keep glyph-like components: drop specks, components touching the scan edge (borders,
    shadows, cut-off neighbours), thin rules at any angle, blobs far larger than text, and
    components much fainter than the page's text (show-through from the back, stains): their
    mean contrast is below ``min_contrast`` of the typical component's.

    Returns the cleaned mask and the typical glyph height (area-weighted median), or None for
    the height when no text is left."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    left, top, widths, heights, areas = (stats[1:, i] for i in range(5))
    rows, cols = ink.shape
    touches_edge = (left == 0) | (top == 0) | (left + widths == cols) | (top + heights == rows)
    glyph_like = ~touches_edge & (areas >= max(2.0, (min_height / 3) ** 2)) & (heights >= min_height / 2)
    sized = glyph_like & (heights < rows / 8) & (widths < cols / 3)
    if not sized.any():
        return np.zeros_like(ink), None
    size = _weighted_median(heights[sized].astype(np.float64), areas[sized].astype(np.float64))
    strength = (np.bincount(labels.ravel(), weights=contrast.ravel(), minlength=count)[1:] / areas)
    faint = strength < min_contrast * _weighted_median(strength[sized], areas[sized].astype(np.float64))
    length = np.hypot(widths, heights)
    rule = (length > 6 * size) & (areas < 0.2 * size * length)
    for index in np.flatnonzero(rule):
        rule[index] = _is_straight_stroke(labels, index + 1, stats[index + 1], size)
    huge = ((heights > 5 * size) & (widths > 5 * size)) | (heights > 8 * size) | (widths > 40 * size)
    keep = glyph_like & ~rule & ~huge & ~faint
    if not keep.any():
        return np.zeros_like(ink), None
    return np.concatenate([[False], keep])[labels].astype(np.uint8), size


def _horizontal_rules(ink: np.ndarray, glyph_height: float) -> np.ndarray | None:
    """The ink of the page's horizontal rules, each thickened by a row on either side so that a rule a pixel
    off straight still crosses a gutter in one row; None when there is none. Rules are taken out of the text
    before the blocks are found (:func:`_clean`), but a rule across a gutter tells what goes first there
    (:func:`_split`); the grid of a ruled table is one component too large to be taken for a rule there."""
    run = cv2.getStructuringElement(cv2.MORPH_RECT, (_odd(RULE_GLYPHS * glyph_height), 1))
    runs = cv2.morphologyEx(ink, cv2.MORPH_OPEN, run)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(runs, connectivity=8)
    thin = stats[:, cv2.CC_STAT_HEIGHT] <= max(2.0, RULE_THICKNESS * glyph_height)  # a picture's dark rows are no rule
    thin[0] = False
    if not thin.any():
        return None
    return cv2.dilate(thin[labels].astype(np.uint8), np.ones((3, 1), np.uint8))


def _is_straight_stroke(labels: np.ndarray, label: int, stat: np.ndarray, size: float) -> bool:
    """A long sparse component is a rule when it is a stroke: thin across its own direction
    (its minimum-area rectangle under half a glyph high) or, per pixel column or row, only a tenth
    of a glyph thick. A word of cursive written with a thin pen is as long and sparse, but as high
    as its letters and thick where they loop."""
    x, y, width, height = stat[:4]
    ys, xs = np.nonzero(labels[y:y + height, x:x + width] == label)
    short_side = min(cv2.minAreaRect(np.column_stack([xs, ys]).astype(np.float32))[1])
    thickness = min(np.median(_spans(xs, ys)[1]), np.median(_spans(ys, xs)[1]))
    return bool(short_side < 0.5 * size or thickness < 0.1 * size)


def _spans(positions: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pixel ``positions`` (columns or rows, from 0) and their ``values`` (rows or columns): which
    positions hold ink, and the span of the values at each that does."""
    low = np.full(int(positions.max()) + 1, np.iinfo(np.int64).max)
    high = np.full(low.size, -1)
    np.minimum.at(low, positions, values)
    np.maximum.at(high, positions, values)
    occupied = high >= 0
    return occupied, (high - low + 1)[occupied]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _line_pitch(ink: np.ndarray, glyph_height: float) -> float:
    """Baseline-to-baseline distance in working pixels.

    Row profiles of four vertical strips (narrow enough to survive skew and columns) are
    autocorrelated; the pitch is the first strong peak after the correlation turns negative
    (between lines), not the highest, which can sit at two pitches. Each profile loses its
    running mean over ``TREND_GLYPHS`` glyph heights first: pictures, blank margins and text that
    fills only part of the page would otherwise keep the correlation positive far beyond one
    line. Without a periodic profile (one or two lines) it falls back to twice the typical
    glyph height.
    """
    rows = ink.shape[0]
    max_lag = max(4, min(rows // 3, 400))
    trend = np.ones(_odd(TREND_GLYPHS * glyph_height)) / _odd(TREND_GLYPHS * glyph_height)
    correlation, strips = np.zeros(max_lag), 0
    for strip in np.array_split(ink, 4, axis=1):
        profile = strip.sum(axis=1).astype(np.float64)
        profile -= np.convolve(profile, trend, mode="same")
        energy = float(np.dot(profile, profile))
        if energy > 0:
            full = np.correlate(profile, profile, "full")[rows - 1 : rows - 1 + max_lag]
            correlation += full / energy
            strips += 1
    inner = correlation[1:-1]
    periodic = inner >= MIN_PITCH_CORRELATION * max(strips, 1)  # a lone line's far ripples are no pitch
    peaks = np.flatnonzero((inner > correlation[:-2]) & (inner >= correlation[2:]) & periodic) + 1
    below_zero = np.flatnonzero(correlation < 0)
    peaks = peaks[peaks > below_zero[0]] if below_zero.size else peaks[:0]
    if peaks.size:
        strong = peaks[correlation[peaks] >= 0.5 * correlation[peaks].max()]
        return float(strong[0])
    return 2.0 * glyph_height


def _estimate_skew(ink: np.ndarray, glyph_height: float, max_skew_deg: float) -> float:
    """Skew in degrees that makes text lines horizontal: the angle whose projection of
    component centres onto the vertical axis is most peaked (coarse search, then fine)."""
    if max_skew_deg <= 0:
        return 0.0
    count, _, stats, centroids = cv2.connectedComponentsWithStats(ink, connectivity=8)
    if count < 3:
        return 0.0
    weights = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    xs, ys = centroids[1:, 0], centroids[1:, 1]
    bin_size = max(1.0, glyph_height / 3)

    def peakedness(angle: float) -> float:
        theta = np.deg2rad(angle)
        projected = ys * np.cos(theta) - xs * np.sin(theta)
        bins = np.floor((projected - projected.min()) / bin_size).astype(np.int64)
        histogram = np.bincount(bins, weights=weights)
        return float(np.dot(histogram, histogram))

    coarse = np.arange(-max_skew_deg, max_skew_deg + 1e-9, 0.5)
    best = max(coarse, key=peakedness)
    fine = np.arange(best - 0.5, best + 0.5 + 1e-9, 0.1)
    return float(max(fine, key=peakedness))


def _rotate(ink: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the mask by ``angle`` degrees onto a canvas large enough to hold all of it.

    Returns the upright mask and the affine map from upright coordinates back to ``ink``'s.
    """
    height, width = ink.shape
    if abs(angle) < 0.05:
        return ink, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    theta = np.deg2rad(angle)
    cos, sin = abs(np.cos(theta)), abs(np.sin(theta))
    new_width = int(np.ceil(width * cos + height * sin))
    new_height = int(np.ceil(width * sin + height * cos))
    forward = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)
    forward[0, 2] += (new_width - width) / 2
    forward[1, 2] += (new_height - height) / 2
    upright = cv2.warpAffine(ink, forward, (new_width, new_height), flags=cv2.INTER_NEAREST)
    return upright, cv2.invertAffineTransform(forward)


def _letter_sizes(ink: np.ndarray, glyph_height: float) -> np.ndarray:
    """Per ink pixel, the height of its connected component in typical glyph heights (0 off ink):
    gaps between letters and words grow with the letters, so gap thresholds are scaled by it."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    heights = stats[:, cv2.CC_STAT_HEIGHT].astype(np.float32) / glyph_height
    heights[0] = 0
    return heights[labels]


def _find_blocks(ink: np.ndarray, letter_size: np.ndarray, rules: np.ndarray | None, pitch: float,
                 config: DetectConfig) -> list[Rect]:
    """Blocks in reading order by a recursive XY-cut.

    A vertical cut (column gutter) is tried first so that columns are read one after the other;
    it needs a gap of ``column_gap`` pitches with ``column_lines`` lines of text on both sides,
    or a gap of ``wide_gap`` pitches. Both widths grow with the size of the letters on either side
    of the gap (relative to the page's typical glyph height), so the letter and word gaps of a
    large, letter-spaced heading are not taken for gutters. A gap between rows that a rule crosses the gutter in
    goes first, though (a ruled table is read row by row, a newspaper's stories above and below a rule across its
    columns one after the other). Otherwise the widest horizontal gap of
    ``block_gap`` pitches splits the region top/bottom. Then a narrower gutter, ``narrow_gutter``
    pitches, with ``narrow_gutter_lines`` pitches of text on both sides and smaller type on the narrower
    (marginal notes set close to the column: word gaps do not line up down that many lines), then a
    gutter that a few marks cross (:func:`_soft_gutter`); a region with none of these is a block.
    """
    blocks: list[Rect] = []
    pending = [_trim(ink, (0, 0, ink.shape[1], ink.shape[0]))]
    while pending:
        rect = pending.pop(0)
        if rect is None:
            continue
        parts = _split(ink, letter_size, rules, rect, pitch, config)
        if parts is None:
            blocks.append(rect)
        else:
            pending = [_trim(ink, part) for part in parts] + pending
    return blocks


def _trim(ink: np.ndarray, rect: Rect) -> Rect | None:
    """The rectangle shrunk to the ink inside it; None when it holds no ink."""
    x0, y0, x1, y1 = rect
    region = ink[y0:y1, x0:x1]
    cols = np.flatnonzero(region.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(region.any(axis=1))
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def _gaps(profile: np.ndarray) -> list[tuple[int, int]]:
    """Runs (start, end) of empty positions in a profile whose ends hold ink."""
    empty = np.concatenate([[False], profile == 0, [False]])
    edges = np.flatnonzero(np.diff(empty.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _split(ink: np.ndarray, letter_size: np.ndarray, rules: np.ndarray | None, rect: Rect, pitch: float,
           config: DetectConfig) -> list[Rect] | None:
    x0, y0, x1, y1 = rect
    region = ink[y0:y1, x0:x1]
    sizes = letter_size[y0:y1, x0:x1]
    tall = config.column_lines * pitch
    column_gaps, narrow_gutters = [], []
    for start, end in _gaps(region.sum(axis=0)):
        unit = pitch * _gap_scale(sizes[:, start - 1], sizes[:, end])
        beside = min(_ink_height(region[:, :start]), _ink_height(region[:, end:]))
        if end - start >= config.wide_gap * unit or (end - start >= config.column_gap * unit and beside >= tall):
            found = column_gaps
        elif (end - start >= config.narrow_gutter * unit and beside >= config.narrow_gutter_lines * pitch
              and _glosses_beside(sizes[:, :start], sizes[:, end:], config.narrow_gutter_type)):
            found = narrow_gutters
        else:
            continue
        # looked at for a gap that would cut only (the many word gaps of a region are no gutter anyway)
        if not _labels_beside(region[:, :start], region[:, end:], end - start, pitch, config):
            found.append((start, end))
    text_row_gaps = _gaps(region.sum(axis=1))
    row_gaps = [(s, e) for s, e in text_row_gaps if e - s >= config.block_gap * pitch]
    if column_gaps:
        start, end = max(column_gaps, key=lambda gap: gap[1] - gap[0])
        ruled = _ruled_row_gaps(text_row_gaps, rules, rect, (start, end))
        if ruled:
            top, bottom = max(ruled, key=lambda gap: gap[1] - gap[0])
            return [(x0, y0, x1, y0 + top), (x0, y0 + bottom, x1, y1)]
        # notes in a margin beside part of the text: the heading above and the footer below them go first and
        # last, not after or before them. The widest gutter that is no margin's is cut: a speck of dirt in the
        # margin, beside a page of two columns, had made the page's row gaps go first, and a left column's last
        # paragraph, below the right column's end, was read after it
        for start, end in sorted(column_gaps, key=lambda gap: gap[0] - gap[1]):
            if not (row_gaps and _margin_beside(region[:, :start], region[:, end:], pitch)):
                return [(x0, y0, x0 + start, y1), (x0 + end, y0, x1, y1)]
    if row_gaps:
        start, end = max(row_gaps, key=lambda gap: gap[1] - gap[0])
        return [(x0, y0, x1, y0 + start), (x0, y0 + end, x1, y1)]
    if narrow_gutters:  # after the row cuts: a heading's word gap can line up with the gutter below it
        start, end = max(narrow_gutters, key=lambda gap: gap[1] - gap[0])
        return [(x0, y0, x0 + start, y1), (x0 + end, y0, x1, y1)]
    cut = _soft_gutter(region, pitch * _gap_scale(sizes), config)
    if cut is not None and not _labels_beside(region[:, :cut], region[:, cut:], 0, pitch, config):
        return [(x0, y0, x0 + cut, y1), (x0 + cut, y0, x1, y1)]
    return None


def _labels_beside(left: np.ndarray, right: np.ndarray, gap: int, pitch: float, config: DetectConfig) -> bool:
    """Whether one side of a gap narrower than lines are joined across holds labels of the other's lines: at most
    :data:`LABEL_PITCHES` wide, each of its rows of ink at most a pitch high and inside a row of the other's (with a
    quarter pitch to spare). A list's numbers set a third of a pitch or more from their text had been cut off as a
    column and lost, too narrow for lines of their own."""
    if gap >= config.line_merge_gap * pitch:
        return False
    label, text = sorted((left, right), key=_ink_width)
    if _ink_width(label) > LABEL_PITCHES * pitch:
        return False
    text_rows = _gaps(~text.any(axis=1))
    spare = pitch / 4
    return all(end - start <= pitch and any(top - spare <= start and end <= bottom + spare for top, bottom in text_rows)
               for start, end in _gaps(~label.any(axis=1)))


def _ruled_row_gaps(row_gaps: list[tuple[int, int]], rules: np.ndarray | None, rect: Rect,
                    gutter: tuple[int, int]) -> list[tuple[int, int]]:
    """Of the gaps between the region's rows of text (any height), those that hold a rule across ``gutter``."""
    if rules is None:
        return []
    x0, y0, x1, y1 = rect
    crossing = rules[y0:y1, x0 + gutter[0]:x0 + gutter[1]].mean(axis=1) >= RULE_CROSSING_SHARE
    return [(start, end) for start, end in row_gaps if crossing[start:end].any()]


def _margin_beside(left: np.ndarray, right: np.ndarray, pitch: float) -> bool:
    """Whether one side is a margin beside the other: at most half as wide, and the other's ink reaches a line
    pitch above and below it (a column of text that starts lower and ends higher is as wide as the other)."""
    margin, text = sorted((left, right), key=lambda side: side.shape[1])
    (margin_top, margin_bottom), (text_top, text_bottom) = _ink_rows(margin), _ink_rows(text)
    return (margin.shape[1] <= 0.5 * text.shape[1] and text_top + pitch < margin_top
            and margin_bottom + pitch < text_bottom)


def _ink_rows(region: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero(region.any(axis=1))
    return int(rows[0]), int(rows[-1])


def _gap_scale(*sides: np.ndarray) -> float:
    """How many times the page's typical glyph height the letters of a region are (at least 1):
    the smallest of the median letter heights of its ``sides`` (letter-size maps)."""
    return max(1.0, min(_letter_height(side) for side in sides))


def _letter_height(sizes: np.ndarray) -> float:
    """Median letter height of a letter-size map's ink, in typical glyph heights."""
    return float(np.median(sizes[sizes > 0]))


def _glosses_beside(left: np.ndarray, right: np.ndarray, share: float) -> bool:
    """Whether the narrower side's letters are at most ``share`` of the wider side's high (letter-size
    maps): marginal notes are set smaller than the column they gloss, the numbers of a list with a
    hanging indent are not smaller than its text."""
    narrow, wide = sorted((left, right), key=lambda side: side.shape[1])
    return _letter_height(narrow) <= share * _letter_height(wide)


def _soft_gutter(region: np.ndarray, pitch: float, config: DetectConfig) -> int | None:
    """Column of a gutter that a few marks cross (line numbers, a stray heading, noise).

    A column is gutter when, with ink widened by ``column_gap`` pitches, at most ``gutter_noise``
    of the text rows touch it; both sides must hold a real column of text (ink in half of the text
    rows, ``column_lines`` pitches tall), so the ragged right edge of a single column never
    qualifies. ``pitch`` is the page's line pitch grown with the region's letter size
    (:func:`_gap_scale`), so the letter gaps of a block of large headings are no gutter.
    """
    widened = cv2.dilate(region, np.ones((1, _odd(config.column_gap * pitch)), np.uint8))
    text_rows = region.any(axis=1)
    touched = widened[text_rows].sum(axis=0)
    limit = config.gutter_noise * int(text_rows.sum())
    best = None
    for start, end in _gaps((touched > limit).astype(np.uint8)):
        if start == 0 or end == region.shape[1]:
            continue
        cut = (start + end) // 2
        left, right = region[:, :cut], region[:, cut:]
        supported = all(
            side.any(axis=1).sum() >= 0.5 * text_rows.sum() and _ink_height(side) >= config.column_lines * pitch
            for side in (left, right)
        )
        if supported and (best is None or touched[cut] < touched[best]):
            best = cut
    return best


def _ink_width(region: np.ndarray) -> int:
    return _ink_height(region.T)


def _ink_height(region: np.ndarray) -> int:
    rows = np.flatnonzero(region.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def _lines_in_block(ink: np.ndarray, letter_size: np.ndarray, rect: Rect, pitch: float, glyph_height: float,
                    config: DetectConfig) -> list[_Line]:
    """Lines of one block in reading order, as polygons in the deskewed working frame."""
    x0, y0, x1, y1 = rect
    block = ink[y0:y1, x0:x1]
    cores = _line_cores(block, letter_size[y0:y1, x0:x1], pitch, config)
    if cores.max() == 0:
        return []
    owner = _nearest_core(cores, max_distance=config.line_reach * pitch)
    ys, xs = np.nonzero(block & (owner > 0))
    labels = owner[ys, xs]
    order = np.argsort(labels, kind="stable")
    ys, xs, labels = ys[order], xs[order], labels[order]
    starts = np.flatnonzero(np.diff(labels, prepend=-1))
    lines = []
    min_area = config.min_line_ink * pitch * pitch
    for begin, end in zip(starts, [*starts[1:], labels.size]):
        if end - begin < min_area:
            continue
        if _is_rule(xs[begin:end], ys[begin:end], glyph_height, config):
            continue  # rules, double rules, underlines, dash fillers, paper edges
        polygon = _envelope(xs[begin:end], ys[begin:end], pitch, config.polygon_padding * pitch)
        width, height = np.ptp(polygon, axis=0)
        if width < config.min_line_aspect * height:
            continue  # page edges, stamps, stray marks: text lines are wider than tall
        polygon += np.array([x0, y0], np.float64)
        lines.append(
            _Line(
                polygon=polygon,
                baseline=_baseline(xs[begin:end], ys[begin:end], pitch) + np.array([x0, y0], np.float64),
                x_start=float(polygon[:, 0].min()),
                y_top=float(polygon[:, 1].min()),
                y_bottom=float(polygon[:, 1].max()),
            )
        )
    return _reading_order(lines)


def _is_rule(xs: np.ndarray, ys: np.ndarray, glyph_height: float, config: DetectConfig) -> bool:
    """A rule, not text: per pixel column, its ink is only a stroke high (median height under
    ``min_line_thickness`` glyph heights: a single rule however it wavers, a dash filler, a paper
    edge), or it is the same in nearly every column (a double or thick-thin rule, an underline:
    ink in ``rule_column_share`` of the columns, and the ink's height and amount each vary by less
    than ``rule_spread`` glyph heights from the 10th to the 90th percentile column). Text,
    capitals included, alternates stems with hairlines and gaps, so its columns vary."""
    columns = xs - xs.min()
    inked, heights = _spans(columns, ys)
    width = inked.size
    if np.median(heights) < config.min_line_thickness * glyph_height:
        return True
    if width < 4 * glyph_height or inked.mean() < config.rule_column_share:
        return False
    amounts = np.bincount(columns, minlength=width)[inked]
    return all(np.ptp(np.percentile(values, [10, 90])) < config.rule_spread * glyph_height
               for values in (heights, amounts))


def _line_cores(block: np.ndarray, letter_size: np.ndarray, pitch: float, config: DetectConfig) -> np.ndarray:
    """Label image of line cores: dense bands of ink after smoothing along the text direction.

    Ascenders, descenders and interline space are sparse, so a density threshold keeps the
    x-height bands of neighbouring lines apart even where their strokes touch. Pieces of one
    line that a wide word gap separates are merged afterwards (wider gaps between larger letters).
    """
    kernel = (_odd(config.smooth_width * pitch), _odd(config.smooth_height * pitch))
    density = cv2.blur(block.astype(np.float32), kernel, borderType=cv2.BORDER_CONSTANT)
    inked = density[block > 0]
    level = config.core_threshold * float(np.percentile(inked, 95))
    core_mask = _split_tall_cores(density, level, pitch)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(core_mask, connectivity=8)
    big = (stats[1:, cv2.CC_STAT_HEIGHT] >= 0.1 * pitch) & (stats[1:, cv2.CC_STAT_WIDTH] >= 0.3 * pitch)
    keep_ids = np.flatnonzero(big) + 1
    relabel = np.zeros(count, np.int32)
    if keep_ids.size:
        sizes = _core_letter_sizes(labels, letter_size, count)[keep_ids]
        relabel[keep_ids] = _merge_along_lines(stats[keep_ids], sizes, config.line_merge_gap * pitch, pitch)
    return _drop_fragments(relabel[labels], pitch)


def _split_tall_cores(density: np.ndarray, level: float, pitch: float) -> np.ndarray:
    """Core mask (uint8 0/1) at ``level``; a core taller than a line pitch, where touching
    lines ran together, is thresholded again at rising levels until it falls apart into
    line-wide pieces."""
    core_mask = (density > level).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(core_mask, connectivity=8)
    for label in np.flatnonzero(stats[1:, cv2.CC_STAT_HEIGHT] > 1.2 * pitch) + 1:
        x, y, width, height = stats[label, :4]
        window = (slice(y, y + height), slice(x, x + width))
        own = labels[window] == label
        for factor in (1.5, 2.0, 2.5):
            pieces = (own & (density[window] > factor * level)).astype(np.uint8)
            _, _, piece_stats, _ = cv2.connectedComponentsWithStats(pieces, connectivity=8)
            if (piece_stats[1:, cv2.CC_STAT_WIDTH] >= pitch).sum() >= 2:
                core_mask[window][own] = pieces[own]
                break
    return core_mask


def _drop_fragments(cores: np.ndarray, pitch: float) -> np.ndarray:
    """Remove short cores lying next to a long one: loops, accents and flourishes between
    lines, whose ink then joins the nearest real line. Isolated short cores (a page number,
    a one-word line) stay."""
    count = int(cores.max())
    if count == 0:
        return cores
    rows, cols = np.nonzero(cores)
    labels = cores[rows, cols]
    order = np.lexsort((cols, labels))  # by line id, then left to right
    labels, cols = labels[order], cols[order]
    present, first = np.unique(labels, return_index=True)
    last = np.append(first[1:], labels.size) - 1
    short = np.zeros(count + 1, bool)
    short[present] = cols[last] - cols[first] + 1 < pitch
    if not short.any() or short[present].all():
        return cores
    long_cores = (cores > 0) & ~short[cores]
    distance = cv2.distanceTransform((~long_cores).astype(np.uint8), cv2.DIST_L2, 5)
    near = np.zeros(count + 1, bool)
    near[np.unique(cores[(cores > 0) & (distance < 0.6 * pitch)])] = True
    drop = short & near
    return np.where(drop[cores], 0, cores)


def _core_letter_sizes(labels: np.ndarray, letter_size: np.ndarray, count: int) -> np.ndarray:
    """Per core label, the median letter size (:func:`_letter_sizes`, 0 off ink) of the ink under
    it, at least 1."""
    on_ink = letter_size > 0
    sizes = np.ones(count, np.float32)
    core_of_ink, values = labels[on_ink], letter_size[on_ink]
    order = np.argsort(core_of_ink, kind="stable")
    core_of_ink, values = core_of_ink[order], values[order]
    present, starts = np.unique(core_of_ink, return_index=True)
    for label, chunk in zip(present, np.split(values, starts[1:])):
        sizes[label] = max(1.0, float(np.median(chunk)))
    return sizes


def _merge_along_lines(stats: np.ndarray, sizes: np.ndarray, max_gap: float, pitch: float) -> np.ndarray:
    """1-based line ids for core pieces: pieces side by side on one line (overlapping rows,
    horizontal gap up to ``max_gap`` times the smaller of their letter ``sizes``) get the same id.

    Closest pairs are joined first, and never two groups holding long pieces (a pitch or more,
    times their letter size) stacked one above the other (sharing half the narrower one's
    columns, not rows): a marginal note or a tall mark beside two lines of a column overlaps the
    rows of both, and would otherwise chain them into one."""
    left = stats[:, cv2.CC_STAT_LEFT]
    right = left + stats[:, cv2.CC_STAT_WIDTH]
    top = stats[:, cv2.CC_STAT_TOP]
    bottom = top + stats[:, cv2.CC_STAT_HEIGHT]
    overlap = np.minimum.outer(bottom, bottom) - np.maximum.outer(top, top)
    smaller = np.minimum.outer(bottom - top, bottom - top)
    gap = np.maximum.outer(left, left) - np.minimum.outer(right, right)
    same_rows = overlap >= 0.5 * smaller
    size = np.minimum.outer(sizes, sizes)
    linked = same_rows & (gap <= max_gap * size)
    narrower = np.minimum.outer(right - left, right - left)
    stacked = ~same_rows & (-gap >= 0.5 * narrower) & (narrower >= pitch * size)
    first, second = np.nonzero(np.triu(linked, 1))
    parent = np.arange(len(stats))
    members = {i: [i] for i in range(len(stats))}
    for i, j in sorted(zip(first.tolist(), second.tolist()), key=lambda pair: gap[pair]):
        root_i, root_j = _root(parent, i), _root(parent, j)
        if root_i == root_j or stacked[np.ix_(members[root_i], members[root_j])].any():
            continue
        parent[root_i] = root_j
        members[root_j] += members.pop(root_i)
    roots = np.array([_root(parent, i) for i in range(len(stats))])
    _, ids = np.unique(roots, return_inverse=True)
    return ids.astype(np.int32) + 1


def _root(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return int(i)


def _nearest_core(cores: np.ndarray, max_distance: float) -> np.ndarray:
    """Line id of the nearest core for every pixel (0 beyond ``max_distance``)."""
    distance, nearest = cv2.distanceTransformWithLabels(
        (cores == 0).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP
    )
    lookup = np.zeros(int(nearest.max()) + 1, np.int32)
    seeds = cores > 0
    lookup[nearest[seeds]] = cores[seeds]
    owner = lookup[nearest]
    owner[distance > max_distance] = 0
    return owner


def _envelope(xs: np.ndarray, ys: np.ndarray, pitch: float, padding: float) -> np.ndarray:
    """Clockwise polygon around a line's ink pixels: top and bottom per bin of half a pitch,
    smoothed by a running median so single flourishes do not dominate, then padded."""
    bin_width = max(2.0, pitch / 2)
    bins = ((xs - xs.min()) / bin_width).astype(np.int64)
    order = np.lexsort((ys, bins))  # by bin, then top to bottom inside a bin
    bins, ys = bins[order], ys[order]
    used, first = np.unique(bins, return_index=True)
    last = np.append(first[1:], bins.size) - 1
    centers = xs.min() + (used + 0.5) * bin_width
    tops = _running_median(ys[first].astype(np.float64)) - padding
    bottoms = _running_median(ys[last].astype(np.float64) + 1) + padding
    x_left, x_right = xs.min() - padding, xs.max() + 1 + padding
    xs_path = np.concatenate([[x_left], np.clip(centers, x_left, x_right), [x_right]])
    upper = np.column_stack([xs_path, np.concatenate([[tops[0]], tops, [tops[-1]]])])
    lower = np.column_stack([xs_path, np.concatenate([[bottoms[0]], bottoms, [bottoms[-1]]])])
    return np.concatenate([upper, lower[::-1]])


def _baseline(xs: np.ndarray, ys: np.ndarray, pitch: float) -> np.ndarray:
    """Polyline the line's letters stand on, from its left to its right end: per stretch of about
    two pitches, the row below which the ink thins out most (the foot of the x-height band, since
    descenders are sparse), smoothed by a running median so that a stretch holding only a
    descender or a flourish does not bend it."""
    x_left, x_right = float(xs.min()), float(xs.max()) + 1
    top = int(ys.min())
    stretches = max(1, round((x_right - x_left) / (2 * pitch)))
    edges = np.linspace(x_left, x_right, stretches + 1)
    stretch_of = np.clip(np.searchsorted(edges, xs, side="right") - 1, 0, stretches - 1)
    centres, feet = [], []
    for stretch in range(stretches):
        rows = ys[stretch_of == stretch] - top
        if rows.size >= pitch / 2:
            centres.append((edges[stretch] + edges[stretch + 1]) / 2)
            feet.append(top + _foot(rows))
    if not feet:  # ink too thin in every stretch: one foot for the whole line
        centres, feet = [(x_left + x_right) / 2], [top + _foot(ys - top)]
    feet = _running_median(np.asarray(feet, np.float64), radius=1)
    xs_path = np.concatenate([[x_left], centres, [x_right]])
    return np.column_stack([xs_path, np.concatenate([[feet[0]], feet, [feet[-1]]])])


def _foot(rows: np.ndarray) -> int:
    """Row (from the top of the ink) just below the steepest fall of a row histogram of ink; the
    fall to the empty row below the ink counts too."""
    counts = np.append(np.bincount(rows), 0).astype(np.float64)
    profile = np.convolve(counts, [0.25, 0.5, 0.25], mode="same")
    return int(np.argmax(profile[:-1] - profile[1:])) + 1


def _running_median(values: np.ndarray, radius: int = 2) -> np.ndarray:
    padded = np.pad(values, radius, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1)
    return np.median(windows, axis=1)


def _reading_order(lines: list[_Line]) -> list[_Line]:
    """Top to bottom; lines sharing a row (overlapping by half a line, side by side) left to right."""
    ordered = sorted(lines, key=lambda line: (line.y_top + line.y_bottom) / 2)
    for i in range(1, len(ordered)):
        j = i
        while j > 0 and _same_row(ordered[j - 1], ordered[j]) and ordered[j].x_start < ordered[j - 1].x_start:
            ordered[j - 1], ordered[j] = ordered[j], ordered[j - 1]
            j -= 1
    return ordered


def _same_row(a: _Line, b: _Line) -> bool:
    """Pieces of one row (cut at a wide gap) lie side by side; of two lines of handwriting, one above the other,
    whose ascenders and descenders make them overlap by half a line, each spans much of the other's width."""
    overlap = min(a.y_bottom, b.y_bottom) - max(a.y_top, b.y_top)
    (a_left, a_right), (b_left, b_right) = ((line.polygon[:, 0].min(), line.polygon[:, 0].max()) for line in (a, b))
    across = min(a_right, b_right) - max(a_left, b_left)
    return (overlap >= 0.5 * min(a.y_bottom - a.y_top, b.y_bottom - b.y_top)
            and across < 0.5 * min(a_right - a_left, b_right - b_left))


def _record(polygon: np.ndarray, baseline: np.ndarray, block: int, order: int) -> LineRecord:
    x0, y0 = polygon.min(axis=0)
    x1, y1 = polygon.max(axis=0)
    return LineRecord(
        bbox=(int(x0), int(y0), int(x1) + 1, int(y1) + 1),
        polygon=[(int(x), int(y)) for x, y in polygon],
        baseline=[(int(x), int(y)) for x, y in baseline],
        block=block,
        order=order,
    )
