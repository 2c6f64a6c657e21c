"""Scores of read text against ground truth (jiwer), as ``eval`` gives them and training's validation takes them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jiwer


def line_cer(reference: str, hypothesis: str) -> float:
    """jiwer CER of one line; an empty reference scores 0 if the prediction is empty too, else 1."""
    if not reference:
        return 0.0 if not hypothesis else 1.0
    return float(jiwer.cer(reference, hypothesis))


def corpus_error_rates(references: Sequence[str], predictions: Sequence[str],
                       normalize: Callable[[str], str]) -> tuple[int, float, float]:
    """Lines scored, corpus CER and WER (total edits over total reference characters, words) of the lines whose
    reference is not empty after ``normalize`` (jiwer cannot score an empty one); NaN rates when none is."""
    pairs = [(normalize(reference), normalize(prediction)) for reference, prediction
             in zip(references, predictions, strict=True) if normalize(reference)]
    if not pairs:
        return 0, float("nan"), float("nan")
    scored, read = [reference for reference, _ in pairs], [prediction for _, prediction in pairs]
    return len(pairs), float(jiwer.cer(scored, read)), float(jiwer.wer(scored, read))
