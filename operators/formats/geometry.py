"""Geometry shared by the export formats."""

from __future__ import annotations

from typing import Sequence


def straight_baseline(baseline: Sequence[Sequence[int]], bbox: Sequence[int]) -> tuple[float, float] | None:
    """hOCR's straight baseline through the polyline's ends: slope, and its height at the box's left
    edge counted from the box's bottom (negative: above it); None without a baseline."""
    if len(baseline) < 2:
        return None
    (first_x, first_y), (last_x, last_y) = baseline[0], baseline[-1]
    slope = (last_y - first_y) / (last_x - first_x) if last_x != first_x else 0.0
    return slope, first_y + slope * (bbox[0] - first_x) - bbox[3]
