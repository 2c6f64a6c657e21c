"""Page orientation (0/90/180/270) of Latin-script pages that carry no metadata.

Run on a small binarized copy of the page (``WORK_PIXELS``), in two steps:

* sideways or not, from two kinds of evidence that fail in different places: closing the small
  gaps along a text line merges its letters into long, flat words and lines, while closing the
  same gaps across lines leaves letters or blocks (this holds on a page of one line, too); and
  on a page of many lines, the ink profile *across* the lines alternates between dense lines and
  empty gaps while the profile *along* them stays flat-ish (measured in strips, so a few degrees
  of skew or several columns do not blur it; it carries handwriting, whose broken strokes merge
  poorly).
* upright or upside down: Latin letters stand on a baseline with their x-height band above it;
  ascenders and capitals (above the band) far outnumber descenders (below it). Per line, the ink
  above the densest band minus the ink below it says which way is up. A few lines can be rich in
  descenders ("jumps over the lazy dog"), so a second cue must not say otherwise: most letters end
  on the baseline, while their tops lie at x-height or at cap height.

Only a confident answer turns the page: a wrong turn ruins a page that was fine, so an unsure page
(too little text, tables, all capitals, pictures) stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Pixels of the working copy (1000 x 1400 for a page): letters stay several pixels tall, the work
#: stays tens of milliseconds, and a long strip is not shrunk to a sliver.
WORK_PIXELS = 1_400_000
#: Letters (median component side) larger than this in the working copy are measured again in a copy shrunk to
#: bring them to ``LETTER_PX``: the threshold's window (25 pixels) then still spans a letter's strokes, and a strip
#: still spans several letters. A small card of three lines in large type had been turned upside down.
MAX_LETTER_PX = 24
LETTER_PX = 14
#: Strips per ink box side in which profiles are measured.
STRIPS = 6
#: Axis decision: log elongation ratio plus log profile peakiness ratio, at least this far from 0.
MIN_AXIS_SCORE = 0.4
#: Up/down decision: (above - below) / (above + below), summed over lines, at least this far from 0 ...
MIN_ASYMMETRY = 0.08
#: ... with at least this many line bands measured, and no baseline alignment of the other sign this far from 0.
MIN_LINES = 3
MAX_CONTRARY_ALIGNMENT = 0.05
#: A letter's bottom (top) within this share of its line band's height of the band's median bottom (top) is aligned.
ALIGNED_SHARE = 0.1


@dataclass(frozen=True)
class Orientation:
    """``rotation``: degrees clockwise to turn the page to read it upright (0 when unsure);
    ``confident``: whether the detector was sure; the scores are kept for benchmarks and logs."""

    rotation: int
    confident: bool
    axis_score: float  # evidence that the lines run horizontally as stored (>0) or vertically (<0)
    asymmetry: float  # ink above minus below the line cores, share of both, for the chosen axis
    alignment: float  # letters ending on a common baseline minus letters topped on a common line, share of letters
    lines: int


def turn(image: np.ndarray, rotation: int) -> np.ndarray:
    """``image`` turned ``rotation`` degrees clockwise (a multiple of 90)."""
    return np.ascontiguousarray(np.rot90(image, k=-(rotation // 90) % 4))


def _ink(gray: np.ndarray, pixels: float = WORK_PIXELS) -> np.ndarray:
    """A binarized copy of about ``pixels`` with only letter-sized components (no rules, pictures, specks)."""
    scale = float(np.sqrt(pixels / gray.size))
    small = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else gray
    ink = cv2.adaptiveThreshold(small, 1, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, 25, 15)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    limit = 0.05 * max(small.shape)
    w, h, area = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT], stats[:, cv2.CC_STAT_AREA]
    keep = (area >= 3) & (w <= limit) & (h <= limit) & (area < 0.8 * w * h + 1)  # solid blocks are not letters
    keep[0] = False
    return keep[labels].astype(np.uint8)


def _peakiness(ink: np.ndarray) -> float:
    """Mean, over vertical strips, of the normalized variance of the row profile (lines across rows)."""
    rows, cols = np.nonzero(ink)
    if rows.size < 200:
        return 0.0
    top, bottom = np.percentile(rows, [1, 99]).astype(int)
    left, right = np.percentile(cols, [1, 99]).astype(int)
    box = ink[top:bottom + 1, left:right + 1].astype(np.float32)
    scores, weights = [], []
    for strip in np.array_split(box, STRIPS, axis=1):
        profile = cv2.GaussianBlur(strip.sum(axis=1).reshape(-1, 1), (1, 3), 0).ravel()
        mean = float(profile.mean())
        if mean > 0:
            scores.append(float(profile.var()) / mean ** 2)
            weights.append(float(profile.sum()))
    return float(np.average(scores, weights=weights)) if scores else 0.0


def _elongation(ink: np.ndarray, reach: int) -> float:
    """Area-weighted mean log(width / height) of the ink after closing gaps up to ``reach`` along
    rows: letters of a horizontal line merge into long words and lines; stacked lines do not."""
    closed = cv2.morphologyEx(ink, cv2.MORPH_CLOSE, np.ones((1, reach), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    w, h, area = (stats[1:, key].astype(np.float64) for key in (cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT,
                                                                    cv2.CC_STAT_AREA))
    return float(np.average(np.log(w / h), weights=area)) if count > 1 else 0.0


def _up_down(ink: np.ndarray) -> tuple[float, float, int]:
    """(asymmetry, alignment, line bands) of lines running along rows; both positive when they are upright.
    Per line band of every strip: asymmetry is the ink above minus below the band's core, over both; alignment
    is the letters whose bottom is on the band's common bottom minus those whose top is on its common top, over
    the letters taller than a third of the band (commas, dots and specks say nothing)."""
    rows, cols = np.nonzero(ink)
    if rows.size < 200:
        return 0.0, 0.0, 0
    left, right = np.percentile(cols, [1, 99]).astype(int)
    above = below = 0.0
    on_bottom = on_top = letters = 0
    lines = 0
    for strip in np.array_split(ink[:, left:right + 1], STRIPS, axis=1):
        profile = strip.sum(axis=1, dtype=np.float32)
        if profile.max() <= 0:
            continue
        on = profile > 0.08 * profile.max()
        edges = np.flatnonzero(np.diff(np.concatenate(([0], on.astype(np.int8), [0]))))
        runs = list(zip(edges[::2], edges[1::2]))
        heights = np.array([end - start for start, end in runs])
        if heights.size == 0:
            continue
        typical = float(np.median(heights[heights >= 3])) if np.any(heights >= 3) else 0.0
        for (start, end), height in zip(runs, heights):
            if height < 3 or height > 2.5 * typical:  # specks, and bands of merged lines
                continue
            band = profile[start:end]
            core = np.flatnonzero(band >= 0.5 * band.max())
            above += float(band[:core[0]].sum())
            below += float(band[core[-1] + 1:].sum())
            lines += 1
            _, _, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(strip[start:end]), connectivity=8)
            tall = stats[1:, cv2.CC_STAT_HEIGHT] >= height / 3
            tops = stats[1:, cv2.CC_STAT_TOP][tall]
            bottoms = tops + stats[1:, cv2.CC_STAT_HEIGHT][tall]
            if tops.size >= 3:
                near = max(1.0, ALIGNED_SHARE * height)
                on_bottom += int(np.sum(np.abs(bottoms - np.median(bottoms)) <= near))
                on_top += int(np.sum(np.abs(tops - np.median(tops)) <= near))
                letters += tops.size
    total = above + below
    return ((above - below) / total if total else 0.0), ((on_bottom - on_top) / letters if letters else 0.0), lines


def _letter_size(ink: np.ndarray) -> float:
    """The median larger side of the ink's components; 0 when there is no ink."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    if count < 2:
        return 0.0
    return float(np.median(np.maximum(stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT])))


def detect_orientation(gray: np.ndarray) -> Orientation:
    """Which quarter turn clockwise makes ``gray`` (8-bit page) read upright; 0 when unsure."""
    ink = _ink(gray)
    letter = _letter_size(ink)
    if letter > MAX_LETTER_PX:
        ink = _ink(gray, min(WORK_PIXELS, ink.size) * (LETTER_PX / letter) ** 2)
        letter = _letter_size(ink)
    if not letter:
        return Orientation(0, False, 0.0, 0.0, 0.0, 0)
    reach = max(3, round(1.5 * letter))
    horizontal, vertical = _peakiness(ink), _peakiness(ink.T)
    peaks = float(np.log(horizontal / vertical)) if horizontal > 0 and vertical > 0 else 0.0
    axis = _elongation(ink, reach) - _elongation(ink.T, reach) + peaks
    sideways = axis < 0
    level = turn(ink, 90) if sideways else ink  # lines horizontal; upright or upside down
    asymmetry, alignment, lines = _up_down(level)
    rotation = (90 if sideways else 0) + (180 if asymmetry < 0 else 0)
    confident = (abs(axis) >= MIN_AXIS_SCORE and abs(asymmetry) >= MIN_ASYMMETRY and lines >= MIN_LINES
                 and alignment * (1.0 if asymmetry > 0 else -1.0) > -MAX_CONTRARY_ALIGNMENT)
    return Orientation(rotation if confident else 0, confident, axis, asymmetry, alignment, lines)
