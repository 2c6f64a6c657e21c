"""Cut + resize line crops: the CPU half of recognition, run in the layout task beside detection.

Training (:func:`cut_polygon`) and inference (:func:`prepare_crops`) cut and mask a line with the
same :func:`crop_line`, and both fit the crop to its ink rows, so the model trains on what it reads
(inference's crop is padded, so the ink of the lines above and below is painted out first:
:func:`operators.words.fit_loose_crop`; a polygon crop for training is blank outside its polygon).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from operators.detect import check_page
from operators.preprocess import LinePreprocessor
from operators.records import LinePiece, LineRecord, PageWork
from operators.words import cut_points, fit_loose_crop, ink_gaps

WHITE = 255


def crop_line(page: np.ndarray, line: LineRecord, padding: int, paper: int | None = None) -> np.ndarray:
    """The line's padded bbox crop with everything outside its padded polygon set to paper.

    Masking keeps the ascenders and descenders of neighbouring lines out of the recognizer's
    input; the paper value is the crop's median (which is background for any text line) unless
    ``paper`` is given.
    """
    check_page(page)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    x0, y0, x1, y1 = line.bbox
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"line bbox {line.bbox} has zero size")
    height, width = page.shape
    cx0, cy0 = max(0, x0 - padding), max(0, y0 - padding)
    cx1, cy1 = min(width, x1 + padding), min(height, y1 + padding)
    if cx1 <= cx0 or cy1 <= cy0:
        raise ValueError(f"line bbox {line.bbox} lies outside the {width}x{height} page")
    crop = page[cy0:cy1, cx0:cx1].copy()
    mask = np.zeros(crop.shape, np.uint8)
    outline = np.asarray(line.polygon, np.int32).reshape(-1, 1, 2) - np.array([cx0, cy0], np.int32)
    cv2.fillPoly(mask, [outline], 255)
    if padding > 0:
        cv2.polylines(mask, [outline], True, 255, thickness=2 * padding + 1)
    crop[mask == 0] = np.uint8(np.median(crop) if paper is None else paper)
    return crop


def cut_polygon(gray: np.ndarray, polygon: np.ndarray) -> np.ndarray | None:
    """A ground-truth line for training: :func:`crop_line` of the polygon's bounding box, unpadded,
    everything outside the polygon white; None if it has no area."""
    if len(polygon) < 3:
        return None
    height, width = gray.shape
    left, top = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, [width, height])
    right, bottom = np.clip(np.ceil(polygon.max(axis=0)).astype(int) + 1, 0, [width, height])
    if right - left < 2 or bottom - top < 2:
        return None
    outline = [(int(x), int(y)) for x, y in np.round(polygon).astype(np.int32)]
    line = LineRecord(bbox=(int(left), int(top), int(right), int(bottom)), polygon=outline, baseline=[], block=0, order=0)
    return crop_line(gray, line, padding=0, paper=WHITE)


def line_pieces(crop: np.ndarray, gaps: Sequence[tuple[int, int]], preprocessor: LinePreprocessor,
                split_long_lines: bool) -> list[LinePiece]:
    """The pieces the model reads for one line crop, left to right.

    A keep-aspect model shrinks a line wider than its input to fit, and shrunken glyphs are misread,
    so such a line is cut at word gaps (``gaps``: its :func:`ink_gaps` in crop x coordinates) into
    pieces that fit; :func:`join_readings` puts their texts back together. Stretching models (the
    official 384 x 384 checkpoints) were trained on whole lines and always get the whole line.
    """
    height, width = crop.shape[:2]
    cuts = []
    if split_long_lines and preprocessor.keep_aspect:
        cuts = cut_points(gaps, width, height, preprocessor.max_aspect)
    bounds = [0, *cuts, width]
    return [LinePiece(preprocessor.resize(crop[:, start:end]), (end - start) / max(1, height))
            for start, end in zip(bounds, bounds[1:])]


def prepare_crops(work: PageWork, preprocessor: LinePreprocessor, padding: int, split_long_lines: bool) -> PageWork:
    """Cut each detected line from the page, measure its word gaps, fit it to its ink's rows (its
    neighbours' ink painted out: :func:`operators.words.fit_loose_crop`) and
    resize it (or its pieces, see :func:`line_pieces`) to model input; drop the page image.

    A line whose box has no area holds no pixels and so no text: it is dropped here rather than
    handed to the model.
    """
    if work.status == "ok" and work.image is not None:
        work.lines = [line for line in work.lines if line.bbox[2] > line.bbox[0] and line.bbox[3] > line.bbox[1]]
        work.line_pieces = []
        for line in work.lines:
            crop = crop_line(work.image, line, padding)
            left = max(0, line.bbox[0] - padding)
            line.gaps = ink_gaps(crop, (left, max(0, line.bbox[1] - padding)))
            crop_gaps = [(x0 - left, x1 - left) for x0, x1 in line.gaps]
            work.line_pieces.append(line_pieces(fit_loose_crop(crop), crop_gaps, preprocessor, split_long_lines))
    work.image = None
    return work
