"""Page selection: ``--pages 1-3,7`` (OCRmyPDF's form) as 1-based page numbers of a document."""

from __future__ import annotations

import re

_PART = re.compile(r"^\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?$")

#: (first, last) 1-based inclusive; last None means "to the end of the document".
PageSpan = tuple[int, int | None]


def parse_pages(spec: str) -> tuple[PageSpan, ...]:
    """``"1-3,7,10-"`` -> ((1, 3), (7, 7), (10, None)); ValueError names the bad part."""
    spans = []
    for part in str(spec).split(","):
        match = _PART.match(part)
        if match is None:
            raise ValueError(f"page selection {spec!r}: {part.strip()!r} is not N, N-M or N-")
        first = int(match.group(1))
        last = None if match.group(2) and not match.group(3) else int(match.group(3) or first)
        if first < 1:
            raise ValueError(f"page selection {spec!r}: {part.strip()!r} names page 0; pages are counted from 1")
        if last is not None and last < first:
            raise ValueError(f"page selection {spec!r}: {part.strip()!r} ends before it starts (write {last}-{first})")
        spans.append((first, last))
    return tuple(spans)


def selected_pages(spec: str | None, num_pages: int) -> list[int]:
    """The document's pages that ``spec`` selects, ascending, each once; all pages when None."""
    if spec is None:
        return list(range(1, num_pages + 1))
    chosen = set()
    for first, last in parse_pages(spec):
        chosen.update(range(first, min(num_pages, last if last is not None else num_pages) + 1))
    return sorted(chosen)
