"""Reassemble: a recognized page back into one ``pages`` row in reading order.

Detection already fixed each line's block and reading-order position; this stage joins the line
texts into the page text, splits each line into words at the ink gaps measured in the layout stage,
and maps the typed records onto the Arrow row of ``PAGES_SCHEMA``.
"""

from __future__ import annotations

from operators.words import split_words
from pipeline.records import LineRecord, PageWork


def page_text(lines: list[LineRecord]) -> str:
    """Page text: line texts in reading order, a blank line between blocks."""
    parts: list[str] = []
    previous_block = None
    for line in sorted(lines, key=lambda item: item.order):
        if previous_block is not None and line.block != previous_block:
            parts.append("")
        parts.append(line.text)
        previous_block = line.block
    return "\n".join(parts)


def page_row(work: PageWork) -> dict:
    """The Arrow row (matching PAGES_SCHEMA) of a finished page."""
    lines = sorted(work.lines, key=lambda item: item.order)
    page_size = (work.width, work.height)
    return {
        "doc_id": work.doc_id,
        "source": work.source,
        "page": work.page,
        "width": work.width,
        "height": work.height,
        "dpi": work.dpi,
        "text": page_text(lines),
        "lines": [
            {
                "text": line.text,
                "confidence": line.confidence,
                "bbox": list(line.bbox),
                "polygon": [list(point) for point in line.polygon],
                "baseline": [list(point) for point in line.baseline],
                "block": line.block,
                "order": line.order,
                "truncated": line.truncated,
                "words": [word.to_row() for word in split_words(line.text, line.bbox, line.gaps, page_size)],
            }
            for line in lines
        ],
        "status": work.status,
        "error_code": work.error_code,
        "error_message": work.error_message,
    }
