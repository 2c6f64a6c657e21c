"""Geometry shared by the export formats."""

from __future__ import annotations

from typing import Sequence

from shapely.geometry import LineString, Polygon, box
from shapely.geometry.base import BaseGeometry


def straight_baseline(baseline: Sequence[Sequence[int]], bbox: Sequence[int]) -> tuple[float, float] | None:
    """hOCR's straight baseline through the polyline's ends: slope, and its height at the box's left
    edge counted from the box's bottom (negative: above it); None without a baseline."""
    if len(baseline) < 2:
        return None
    (first_x, first_y), (last_x, last_y) = baseline[0], baseline[-1]
    slope = (last_y - first_y) / (last_x - first_x) if last_x != first_x else 0.0
    return slope, first_y + slope * (bbox[0] - first_x) - bbox[3]


def line_outline(polygon: Sequence[Sequence[int]]) -> BaseGeometry:
    """A line's polygon as a valid area (``buffer(0)`` mends one that touches itself) to cut its words and its
    baseline to (:func:`box_within`, :func:`polyline_within`)."""
    return Polygon(polygon).buffer(0)


def box_within(bbox: Sequence[int], outline: BaseGeometry) -> list[tuple[int, int]] | None:
    """The pixels of ``bbox`` (x1, y1 exclusive) that lie in ``outline``: the largest piece, as whole points; None
    when they share no area. PAGE consumers check that a Word lies within its TextLine (OCR-D's validator, to
    1.5 px), and a line's polygon follows its ink, lower than the box around its words where no letter rises."""
    x0, y0, x1, y1 = bbox
    piece = _largest_piece(box(x0, y0, x1 - 1, y1 - 1), outline)
    points = [] if piece is None else list(dict.fromkeys(_whole(piece.exterior.coords[:-1])))
    return points if len(points) >= 3 else None


def polyline_within(points: Sequence[Sequence[int]], outline: BaseGeometry) -> list[tuple[int, int]] | None:
    """The longest piece of a polyline (a baseline) that lies in ``outline``, as whole points; None if none."""
    piece = _largest_piece(LineString(points), outline) if len(points) >= 2 else None
    return None if piece is None else _whole(piece.coords)


def _largest_piece(shape: BaseGeometry, outline: BaseGeometry) -> BaseGeometry | None:
    cut = shape.intersection(outline)
    pieces = [piece for piece in getattr(cut, "geoms", [cut])
              if piece.geom_type == shape.geom_type and not piece.is_empty]
    return max(pieces, key=lambda piece: piece.area or piece.length, default=None)


def _whole(coordinates: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    return [(round(x), round(y)) for x, y in coordinates]
