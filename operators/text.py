"""Text as the pipeline writes it: standard Unicode, without private-use or control characters."""

from __future__ import annotations

import unicodedata

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


def printable_text(text: str) -> str:
    """``text`` with the characters of :data:`CONTROLS_AS_SPACES` as spaces (the same length)."""
    return text.translate(CONTROLS_AS_SPACES)
