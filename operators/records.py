"""Typed records that flow between stages, and the one explicit Arrow schema of the output.

Stages pass :class:`PageWork` objects (pickled into a single Ray Data column) so the page image
and its lines travel together with no shuffle; only the final text records become Arrow rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa

Status = Literal["ok", "failed", "duplicate"]
BBox = tuple[int, int, int, int]


@dataclass
class LineRecord:
    """One text line: geometry from detection, text from recognition."""

    bbox: BBox  # x0, y0, x1, y1 in page pixels
    polygon: list[tuple[int, int]]  # closed outline in page pixels
    baseline: list[tuple[int, int]]  # polyline the letters stand on, left to right, in page pixels
    block: int  # block (column / region) index in reading order
    order: int  # 0-based position of the line in the page's reading order
    text: str = ""
    confidence: float | None = None  # geometric mean of token probabilities; a line read in pieces: its lowest
    truncated: bool = False  # the decoder hit max_new_tokens before end-of-sequence
    gaps: list[tuple[int, int]] = field(default_factory=list)  # blank columns in the crop (page x), for words
    word_confidences: list[float] = field(default_factory=list)  # one per word of text.split(), once read


@dataclass(frozen=True)
class LinePiece:
    """A model-size crop of a whole line, or of one part of a line too long for the model's input."""

    pixels: np.ndarray
    aspect: float  # width / height before resizing: the expected-length hint that groups pieces in batches


@dataclass
class PageWork:
    """A page on its way through the stages."""

    doc_id: str
    source: str
    page: int  # 1-based
    dpi: int
    width: int = 0
    height: int = 0
    rotation: int = 0  # degrees clockwise the stored page was turned to read upright: 0, 90, 180, 270
    image: np.ndarray | None = None  # 8-bit grayscale page, upright, dropped once the crops are cut
    lines: list[LineRecord] = field(default_factory=list)
    line_pieces: list[list[LinePiece]] = field(default_factory=list)  # per line: what the model reads
    status: Status = "ok"
    error_code: str | None = None
    error_message: str | None = None
    seconds: float = 0.0  # stage time spent on this page (rasterize, layout, recognize)

    def fail(self, error_code: str, message: str) -> "PageWork":
        self.status = "failed"
        self.error_code = error_code
        self.error_message = message
        self.image = None
        self.line_pieces = []
        return self


@dataclass(frozen=True)
class DocumentRecord:
    doc_id: str
    source: str
    status: Status
    error_code: str | None
    error_message: str | None
    num_pages: int
    repaired: bool = False  # the file was damaged; qpdf rebuilt it and the pages it recovered were read
    duplicate_of: str | None = None  # status "duplicate": the doc_id of the document with the same bytes
    pages_selected: str | None = None  # the run's rasterize.pages (--pages); None: every page
    mode: str | None = None  # what the run did: "recognize" (run) or "detect" (layout only, no text)
    source_size: int | None = None  # the file's size and modification time when it was read: a rerun that finds
    source_mtime_ns: int | None = None  # them unchanged takes the document as done without reading it again
    model: str | None = None  # what read the text (operators.checkpoint.recorded_model); None: detect, or older rows
    model_sha256: str | None = None  # of its weights (operators.checkpoint.weights_sha256); None for a hub id
    # the export formats written for its pages (mets brings alto): empty when none were asked or they failed; None
    # for a document without pages, and in rows written before it was recorded
    exports: tuple[str, ...] | None = None


WORD_TYPE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("bbox", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("bbox_norm", pa.list_(pa.int32(), 4), nullable=False),  # 0-1000 of the page, as LayoutLM
        pa.field("confidence", pa.float32()),  # from the word's tokens; null in `detect` output
    ]
)

LINE_TYPE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("confidence", pa.float32()),
        pa.field("bbox", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("polygon", pa.list_(pa.list_(pa.int32(), 2)), nullable=False),
        pa.field("baseline", pa.list_(pa.list_(pa.int32(), 2)), nullable=False),
        pa.field("block", pa.int32(), nullable=False),
        pa.field("order", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("words", pa.list_(WORD_TYPE), nullable=False),
    ]
)

PAGES_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("page", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("dpi", pa.int32(), nullable=False),
        pa.field("rotation", pa.int32(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("lines", pa.list_(LINE_TYPE), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
    ]
)

DOCUMENTS_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("num_pages", pa.int32(), nullable=False),
        pa.field("repaired", pa.bool_(), nullable=False),
        pa.field("duplicate_of", pa.string()),
        pa.field("pages_selected", pa.string()),
        pa.field("mode", pa.string()),
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime_ns", pa.int64()),
        pa.field("model", pa.string()),
        pa.field("model_sha256", pa.string()),
        pa.field("exports", pa.list_(pa.string())),
    ]
)

