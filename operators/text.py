"""Text as the pipeline writes it: standard Unicode, without private-use characters."""

from __future__ import annotations

#: MUFI private-use characters that some ground truth (OCR-D's DTA transcriptions among the training
#: lines) writes for vowels with a small e above, which Unicode spells as the vowel and U+0364; a model
#: trained on them may write them, and archives' fonts and search indexes do not know them.
MUFI_TO_UNICODE = str.maketrans({"\ue42c": "a\u0364", "\ue644": "o\u0364", "\ue72b": "u\u0364"})


def standard_text(text: str) -> str:
    """``text`` with the MUFI characters of :data:`MUFI_TO_UNICODE` in standard Unicode."""
    return text.translate(MUFI_TO_UNICODE)
