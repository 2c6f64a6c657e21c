"""``trocr-pipeline inspect``: PNG overlays of the detected lines, for a person to check layout by eye.

The stages of :mod:`pipeline.stages` run in this process, one page at a time, as the job runs them (no Ray): triage,
rasterize, detect and, with ``--recognize``, crop + decode. Each page becomes one PNG: the page with
every line polygon coloured by block and labelled ``order`` / ``b<block>``; with recognized text, a
panel on the right shows each line's text where the line sits on the page. Documents and pages that
fail are reported with their reason and written as no PNG, and so is a document with no page in ``--pages``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from operators.errors import ExitCode, NoInputError
from operators.formats.export import export_stem
from operators.ingest import find_inputs, triage
from operators.pages import selected_pages
from operators.rasterize import page_ranges, rasterize
from operators.recognize import TrOCRRecognizer
from operators.records import LineRecord, PageWork
from operators.storage import make_local_folder, writing
from pipeline.config import JobConfig, add_config_arguments, config_from_arguments
from pipeline.stages import cut_crops, detect_page
from pipeline.synth.fonts import FONT_ROOT, load_font

#: Longest side of an overlay in pixels: a whole page stays legible on screen and the PNG small.
OVERLAY_MAX_SIDE = 1600
#: Colours cycled over blocks (RGB), distinct on paper-white and on black ink.
BLOCK_COLOURS = ((230, 25, 75), (60, 140, 60), (0, 100, 220), (245, 130, 48), (145, 30, 180), (0, 150, 150))
LABEL_PX = 14
#: The face of the text panel: Pillow's own lacks the accented and historical letters the models read (ó, ü, ſ
#: were drawn as boxes); Debian's fonts-dejavu-core, which the Makefile installs, has them.
TEXT_FONT = FONT_ROOT / "truetype" / "dejavu" / "DejaVuSans.ttf"
MIN_TEXT_PX = 8


@dataclass(frozen=True)
class PageOutcome:
    """What inspect made of one planned page: its overlay, or the reason there is none."""

    source: str
    page: int | None  # None when the whole document failed before its pages were known
    lines: list[LineRecord]
    overlay: Path | None
    error: str | None = None  # "error_code: message" when the page failed
    unselected: str | None = None  # why a document has no page to draw: none of its pages is in rasterize.pages

    def describe(self) -> str:
        where = self.source if self.page is None else f"{self.source} page {self.page}"
        if self.error is not None:
            return f"failed  {where}: {self.error}"
        if self.unselected is not None:
            return f"skipped {where}: {self.unselected}"
        blocks = len({line.block for line in self.lines})
        found = f"{len(self.lines)} lines in {blocks} blocks" if self.lines else "0 lines (no text found)"
        return f"ok      {where}: {found} -> {self.overlay}"


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="files, folders or globs; local paths or URIs")
    parser.add_argument("--output", "-o", required=True, help="folder for the PNG overlays")
    add_config_arguments(parser, "detect.block_gap=1.5")
    parser.add_argument("--recognize", action="store_true", help="also decode each line with recognize.model")


def inspect_command(args: argparse.Namespace) -> int:
    from pipeline.cli import check_paths_outlive_the_job

    check_paths_outlive_the_job([args.output])
    config = config_from_arguments(args)
    make_local_folder(args.output)
    output = Path(args.output)
    # never its own overlays of an earlier run, wherever the output lies (in an input folder, or the folder itself)
    sources = [source for source in find_inputs(args.inputs).sources if not _is_overlay(source, output)]
    if not sources:
        raise NoInputError(f"the inputs hold only overlays that inspect wrote to {output}")
    written = failed = skipped = 0
    recognizer = TrOCRRecognizer(config.recognize) if args.recognize else None
    for outcome in inspect_documents(sources, output, config, recognizer):
        print(outcome.describe(), flush=True)
        failed += outcome.error is not None
        skipped += outcome.unselected is not None
        written += outcome.overlay is not None
    unselected = f", {skipped} document{'s' if skipped != 1 else ''} without a page in --pages" if skipped else ""
    print(f"{written} overlays written to {output}, {failed} failed{unselected}")
    return ExitCode.documents_failed if failed else ExitCode.ok


def _overlay_name(work: PageWork) -> str:
    """Named as the exports are (:func:`operators.formats.export.export_stem`: a long source name is cut)."""
    return f"{export_stem({'source': work.source, 'doc_id': work.doc_id})}-p{work.page:04d}.png"


#: What :func:`_overlay_name` gives, and the PNG text chunk every overlay carries (a scan may be named alike:
#: ``letter-2024010500000001-p0001.png``).
OVERLAY_NAME = re.compile(r".+-[0-9a-f]{16}-p[0-9]{4}\.png")
OVERLAY_MARK = "trocr-pipeline-inspect"


def _is_overlay(source: str, output: Path) -> bool:
    path = Path(source)
    if path.parent.resolve() != output.resolve() or OVERLAY_NAME.fullmatch(path.name) is None:
        return False
    try:
        with Image.open(path) as image:
            return OVERLAY_MARK in image.info
    except OSError:
        return False


def inspect_documents(sources: list[str], output: Path, config: JobConfig, recognizer: TrOCRRecognizer | None = None
                      ) -> Iterator[PageOutcome]:
    """Overlay the pages of ``sources`` the job would read (``rasterize.pages``) into ``output``, giving each
    outcome as soon as its page is done (a long inspect had said nothing until all its pages were); with a
    ``recognizer``, each line's text beside it."""
    make_local_folder(str(output))
    for source in sources:
        plan = triage(source, config.rasterize)
        if plan.error is not None:
            yield PageOutcome(plan.source, None, [], None, f"{plan.error.error_code}: {plan.error}")
            continue
        if not selected_pages(config.rasterize.pages, plan.num_pages):  # it had been passed over without a word
            yield PageOutcome(plan.source, None, [], None, unselected=(
                f"none of its {plan.num_pages} page{'s' if plan.num_pages != 1 else ''} is in --pages "
                f"{config.rasterize.pages}"))
            continue
        for task in page_ranges([plan], config.rasterize.pages_per_task, config.rasterize.pages):
            for work in rasterize(task, config.rasterize):
                yield _inspect_page(work, output, config, recognizer)


def _inspect_page(work: PageWork, output: Path, config: JobConfig, recognizer: TrOCRRecognizer | None) -> PageOutcome:
    """The page through the job's stages, its failures recorded as the job records them (a model error, running out
    of memory with a line alone) and kept to the page."""
    work = detect_page(work, config.detect)
    page = work.image  # the crops stage drops it from the PageWork, the overlay still needs it
    if recognizer is not None and work.status == "ok":
        work = cut_crops(work, config, recognizer.recognizer.bundle.preprocessor)
        if work.status == "ok":
            work, = recognizer.recognize_pages([work])
    if work.status != "ok":
        return PageOutcome(work.source, work.page, [], None, f"{work.error_code}: {work.error_message}")
    texts = [line.text for line in work.lines] if recognizer is not None else None
    path = output / _overlay_name(work)
    mark = PngImagePlugin.PngInfo()
    mark.add_text(OVERLAY_MARK, work.source)
    with writing(str(path)):
        draw_overlay(page, work.lines, texts).save(path, compress_level=1, pnginfo=mark)  # fast; throwaway
    return PageOutcome(work.source, work.page, work.lines, path)


def draw_overlay(page: np.ndarray, lines: list[LineRecord], texts: list[str] | None = None) -> Image.Image:
    """The page, scaled to fit :data:`OVERLAY_MAX_SIDE`, with each line's polygon, baseline, order and block drawn on it;
    with ``texts`` (one per line) a panel of the same size on the right shows them in place."""
    if page.ndim != 2 or page.dtype != np.uint8 or page.size == 0:
        raise ValueError(f"page must be a non-empty 8-bit grayscale array, got {page.dtype} {page.shape}")
    if texts is not None and len(texts) != len(lines):
        raise ValueError(f"{len(texts)} texts for {len(lines)} lines")
    scale = min(1.0, OVERLAY_MAX_SIDE / max(page.shape))
    size = (max(1, round(page.shape[1] * scale)), max(1, round(page.shape[0] * scale)))
    canvas = Image.fromarray(page).resize(size, Image.Resampling.LANCZOS).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    label_font = ImageFont.load_default(size=LABEL_PX)
    for line in lines:
        colour = BLOCK_COLOURS[line.block % len(BLOCK_COLOURS)]
        outline = [(x * scale, y * scale) for x, y in line.polygon]
        draw.polygon(outline, outline=colour, width=2)
        draw.line([(x * scale, y * scale) for x, y in line.baseline], fill=colour, width=1)
        x0, y0 = line.bbox[0] * scale, line.bbox[1] * scale
        draw.text((x0, y0), f"{line.order} b{line.block}", font=label_font, fill=colour, anchor="lb",
                  stroke_width=2, stroke_fill=(255, 255, 255))
    if texts is None:
        return canvas
    return _beside(canvas, _text_panel(canvas.size, lines, texts, scale))


def _text_panel(size: tuple[int, int], lines: list[LineRecord], texts: list[str], scale: float) -> Image.Image:
    """White panel with each text at its line's position, sized to the line's height."""
    panel = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for line, text in zip(lines, texts):
        x0, y0, _, y1 = (value * scale for value in line.bbox)
        font = text_font(max(MIN_TEXT_PX, round(0.6 * (y1 - y0))))
        colour = BLOCK_COLOURS[line.block % len(BLOCK_COLOURS)]
        draw.text((x0, (y0 + y1) / 2), f"{line.order}: {text}", font=font, fill=colour, anchor="lm")
    return panel


def text_font(size_px: int) -> ImageFont.FreeTypeFont:
    """:data:`TEXT_FONT`, else (not installed) Pillow's own."""
    try:
        return load_font(TEXT_FONT, size_px)
    except OSError:
        return ImageFont.load_default(size=size_px)


def _beside(left: Image.Image, right: Image.Image) -> Image.Image:
    combined = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (255, 255, 255))
    combined.paste(left, (0, 0))
    combined.paste(right, (left.width, 0))
    return combined
