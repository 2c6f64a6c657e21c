"""Synthetic training lines and synthetic scanned documents with ground truth.

``write_line_set`` / ``iter_lines`` feed recognizer training; ``write_document_set`` makes test and
demo documents for the whole pipeline. Both are deterministic for a seed on a given font install.
"""

from pipeline.synth.corpus import CHARSET, CorpusSampler
from pipeline.synth.docs import load_ground_truth, write_document_set
from pipeline.synth.fonts import FontsNotFound, discover_fonts
from pipeline.synth.lines import iter_lines, write_line_set

__all__ = [
    "CHARSET",
    "CorpusSampler",
    "FontsNotFound",
    "discover_fonts",
    "iter_lines",
    "load_ground_truth",
    "write_document_set",
    "write_line_set",
]
