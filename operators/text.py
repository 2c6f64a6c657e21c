"""Text as the pipeline writes it: standard Unicode, without private-use or control characters."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

from operators.errors import ConfigError

#: MUFI private-use characters that some ground truth (OCR-D's DTA transcriptions among the training
#: lines) writes for vowels with a small e above, which Unicode spells as the vowel and U+0364; a model
#: trained on them may write them, and archives' fonts and search indexes do not know them.
MUFI_TO_UNICODE = str.maketrans({"\ue42c": "a\u0364", "\ue644": "o\u0364", "\ue72b": "u\u0364"})


def standard_text(text: str) -> str:
    """``text`` in Unicode NFC (ground truth may spell "é" as "e" and a combining accent, and a model taught
    so writes it so), with the MUFI characters of :data:`MUFI_TO_UNICODE` in standard Unicode."""
    return unicodedata.normalize("NFC", text.translate(MUFI_TO_UNICODE))


#: Characters that no export can carry, each written as one space: C0 and C1 controls (XML 1.0 forbids most,
#: PDF fonts have no glyph for them, a form feed separates the text export's pages), the line and paragraph
#: separators, and the non-characters U+FFFE and U+FFFF. A byte-level vocabulary holds every byte, so a model
#: can write them; one for one, so that positions in the text stay where they were.
CONTROLS_AS_SPACES = str.maketrans(dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0xFFFE, 0xFFFF],
                                                 " "))


#: Characters XML 1.0 cannot hold (C0 controls but tab, newline and carriage return; U+FFFE, U+FFFF).
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(text: str) -> str:
    """``text`` without what XML 1.0 cannot hold: a file name or a reading must not make a document unwritable."""
    return NOT_XML.sub("", text)


def printable_text(text: str) -> str:
    """``text`` with the characters of :data:`CONTROLS_AS_SPACES` as spaces (the same length)."""
    return text.translate(CONTROLS_AS_SPACES)


#: What scoring may be told to ignore besides its fixed normalisation (``eval --normalize``).
NORMALIZATIONS = ("case", "punctuation")


def make_normalizer(options: Sequence[str]) -> Callable[[str], str]:
    """Text normaliser applied to both reference and prediction before scoring: always Unicode NFC (a "é" is a
    "é" however it is encoded) and whitespace runs as one space (line breaks and the blank line between a page's
    blocks are layout, and jiwer's words are split at spaces only); ``options`` add case folding and dropping
    punctuation."""
    unknown = set(options) - set(NORMALIZATIONS)
    if unknown:
        raise ConfigError(f"unknown --normalize option(s) {sorted(unknown)}; choose from {', '.join(NORMALIZATIONS)}")

    def normalize(text: str) -> str:
        text = unicodedata.normalize("NFC", text)
        if "case" in options:
            text = text.casefold()
        if "punctuation" in options:
            text = "".join(char for char in text if not unicodedata.category(char).startswith("P"))
        return " ".join(text.split())

    return normalize
