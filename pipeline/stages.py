"""The per-page stage chain, wired once: the job (in Ray tasks), ``inspect`` (in this process) and
the benchmarks all call these, so a page goes through the same steps with the same settings.

rasterize -> :func:`detect_page` -> :func:`cut_crops` (together :func:`layout_page`, one Ray task)
-> recognize (an actor: :class:`operators.recognize.TrOCRRecognizer`) -> write.
"""

from __future__ import annotations

from operators.crops import prepare_crops
from operators.detect import detect_lines
from operators.errors import DETECTION_FAILED
from operators.preprocess import LinePreprocessor
from operators.records import PageWork
from operators.settings import DetectConfig
from pipeline.config import JobConfig


def detect_page(work: PageWork, config: DetectConfig) -> PageWork:
    """Detect the lines of a page that rendered; a detector bug fails the page instead of losing it."""
    if work.status == "ok":
        try:
            work.lines = detect_lines(work.image, work.dpi, config)
        except Exception as exc:  # noqa: BLE001 - one page must never end the job
            work.fail(DETECTION_FAILED, f"line detection failed: {type(exc).__name__}: {exc}")
    return work


def cut_crops(work: PageWork, config: JobConfig, preprocessor: LinePreprocessor) -> PageWork:
    """Cut, fit and resize every detected line for the model (drops the page image)."""
    try:
        return prepare_crops(work, preprocessor, config.detect.crop_padding_px, config.recognize.split_long_lines)
    except Exception as exc:  # noqa: BLE001 - one page must never end the job
        return work.fail(DETECTION_FAILED, f"cutting the line crops failed: {type(exc).__name__}: {exc}")


def layout_page(work: PageWork, config: JobConfig, preprocessor: LinePreprocessor | None) -> PageWork:
    """The layout task: detect lines, then (recognize mode) cut model-ready crops; the page image stops here."""
    work = detect_page(work, config.detect)
    if preprocessor is not None:
        work = cut_crops(work, config, preprocessor)
    work.image = None
    return work
