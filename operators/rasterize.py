"""Rasterize: page ranges of a triaged document to 8-bit grayscale page images.

PDFs are rendered by poppler a few pages per call (``rasterize.pages_per_task``), so a 1,000-page
file never sits in memory whole and a hung poppler is killed after ``render_timeout_s``. Every page
that was planned comes out as exactly one :class:`PageWork`, rendered or failed with a reason.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from itertools import groupby
from typing import Sequence

import cv2
import numpy as np
import tifffile
from pdf2image import convert_from_path
from pdf2image.exceptions import PDFPageCountError, PDFPopplerTimeoutError, PDFSyntaxError
from PIL import Image, ImageOps

from operators.orientation import detect_orientation, turn
from operators.ingest import (DocumentKind, DocumentPlan, allow_pixels, check_unchanged, local_path, open_image,
                              page_frames, quiet_decoders, repaired_pdf)
from operators.pages import selected_pages
from operators.settings import RasterizeConfig
from operators.errors import (DocumentError, PAGE_COUNT_MISMATCH, PageTooLarge, RenderFailed, RenderTimeout,
                              SourceChanged)
from operators.records import PageWork
from operators.storage import scratch_space_full

log = logging.getLogger(__name__)

#: Scans often claim 72 dpi or nothing; outside this range the configured dpi is used instead.
_PLAUSIBLE_DPI = (100, 1200)


@dataclass(frozen=True)
class PageRange:
    """A unit of rendering work: pages first..last (1-based, inclusive) of one document."""

    doc_id: str
    source: str
    kind: DocumentKind
    first: int
    last: int
    repaired: bool = False
    rotations: tuple[int, ...] = ()  # /Rotate of pages first..last, as poppler applies it
    units: tuple[float, ...] = ()  # /UserUnit of pages first..last (1 where missing), which poppler ignores
    oversized: str | None = None  # a page over the pixel limit (first == last): why it is failed, not rendered
    stamp: tuple[int, int] | None = None  # the file's size and modification time at triage (None: not checked)


def page_ranges(plans: list[DocumentPlan], pages_per_task: int, pages: str | None = None) -> list[PageRange]:
    """Runs of consecutive selected pages (``rasterize.pages``; all when None), at most
    ``pages_per_task`` long; a page over the pixel limit is a range of its own, failed without rendering."""
    ranges = []
    for plan in plans:
        if plan.error is not None:
            continue
        oversized = dict(plan.oversized_pages)
        run: list[int] = []
        for number in selected_pages(pages, plan.num_pages) + [0]:  # 0 closes the last run
            if run and (number != run[-1] + 1 or len(run) == pages_per_task or number in oversized):
                ranges.append(PageRange(plan.doc_id, plan.source, plan.kind, run[0], run[-1], plan.repaired,
                                         plan.page_rotations[run[0] - 1:run[-1]], plan.page_units[run[0] - 1:run[-1]],
                                         stamp=plan.stamp))
                run = []
            if number in oversized:
                ranges.append(PageRange(plan.doc_id, plan.source, plan.kind, number, number, plan.repaired,
                                         plan.page_rotations[number - 1:number], plan.page_units[number - 1:number],
                                         oversized[number], plan.stamp))
            elif number:
                run.append(number)
    return ranges


def to_gray8(image: Image.Image) -> np.ndarray:
    """Any Pillow mode (1-bit, palette, alpha, CMYK, CIELab, 16-bit, float) to an 8-bit gray array.

    Integer samples of more than 8 bits are scaled from the bit depth they fill (16, or 12 and 10 from cameras
    and some scanners), not stretched from darkest to lightest: a blank page's paper noise would become
    full-contrast speckle, read as lines. A TIFF that says 0 is white (min-is-white) is inverted, which Pillow
    does for 8-bit samples only. Float samples are stretched from their range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        gray = _to_8_bits(values, _full_scale(values))
        min_is_white = getattr(image, "tag_v2", {}).get(TIFF_PHOTOMETRIC) == 0
        return 255 - gray if min_is_white else gray
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.full_like(values, 255.0)
        return scaled.round().astype(np.uint8)
    if image.mode == "LAB":
        return np.asarray(image.getchannel("L"), dtype=np.uint8)
    if image.mode == "La":  # gray with premultiplied alpha, as GIMP writes TIFF
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _full_scale(samples: np.ndarray) -> int:
    """The largest value of the bit depth that integer samples fill: 16, or 12 and 10 from cameras and some
    scanners (at least 8)."""
    return 2 ** max(8, int(samples.max()).bit_length()) - 1


def _to_8_bits(samples: np.ndarray, full: int) -> np.ndarray:
    return (np.clip(samples, 0, full) * (255.0 / full)).round().astype(np.uint8)


def file_resolution(image: Image.Image) -> tuple[int, int] | None:
    """The frame's horizontal and vertical resolution as its file gives it, or None where the finer one is not
    plausible (the coarser may be half of it: a fax's 98 lines per inch) or not a number (a TIFF's 0/0): the
    configured dpi is taken for both then."""
    dpi = image.info.get("dpi")
    if not dpi or not all(math.isfinite(float(value)) for value in dpi[:2]):
        return None
    x, y = round(float(dpi[0])), round(float(dpi[1]))
    if _PLAUSIBLE_DPI[0] <= max(x, y) <= _PLAUSIBLE_DPI[1] and 2.5 * min(x, y) >= max(x, y):
        return x, y
    return None


def _square_pixels(gray: np.ndarray, dpi_x: int, dpi_y: int) -> np.ndarray:
    """An image of non-square pixels (a fax at 204 x 98 dpi is squashed to half height) stretched along its
    coarser axis to the finer one's resolution: lines and glyphs keep their shape, and the page keeps its
    size in inches (which the searchable PDF's page, from the file's own resolutions, has)."""
    if dpi_x == dpi_y:
        return gray
    dpi = max(dpi_x, dpi_y)
    height, width = gray.shape
    size = (round(width * dpi / dpi_x), round(height * dpi / dpi_y))
    return cv2.resize(gray, size, interpolation=cv2.INTER_CUBIC)


def _new_page(task: PageRange, number: int, dpi: int) -> PageWork:
    """Page ``number`` of ``task``, with its /Rotate (a PDF's): a page that fails unrendered (too large, timed out)
    keeps it, so that its searchable PDF page shows as a viewer shows it."""
    rotations = dict(zip(range(task.first, task.last + 1), task.rotations))
    return PageWork(doc_id=task.doc_id, source=task.source, page=number, dpi=dpi, rotation=rotations.get(number, 0))


def _render_pdf(task: PageRange, path: str, config: RasterizeConfig) -> list[PageWork]:
    """The pages at ``config.dpi`` per real inch, recorded as that dpi: poppler takes a unit for a point whatever
    the page's /UserUnit, so each run of pages of one unit is rendered at ``config.dpi`` times it."""
    numbered = range(task.first, task.last + 1)
    units = dict(zip(numbered, task.units))
    pages = []
    for unit, run in groupby(numbered, key=lambda number: units.get(number, 1.0)):
        numbers = list(run)
        images = _poppler_pages(path, numbers[0], numbers[-1], config.dpi * unit, config)
        for offset, number in enumerate(numbers):
            work = _new_page(task, number, config.dpi)
            if offset >= len(images):
                work.fail(PAGE_COUNT_MISMATCH,
                          f"page {number} is declared but poppler rendered only {len(images)} of pages "
                          f"{numbers[0]}-{numbers[-1]}")
            else:
                work.image = to_gray8(images[offset])
                work.height, work.width = work.image.shape
            pages.append(work)
    return pages


def _poppler_pages(path: str, first: int, last: int, dpi: float, config: RasterizeConfig) -> list[Image.Image]:
    allow_pixels(config.max_page_pixels)  # pdf2image hands poppler's pages to Pillow, which refuses 179 Mpx and up
    try:
        return convert_from_path(
            path,
            dpi=dpi,
            first_page=first,
            last_page=last,
            grayscale=True,
            use_cropbox=True,  # the page as a viewer shows it, and where the searchable PDF lays its text
            timeout=config.render_timeout_s,
        )
    except PDFPopplerTimeoutError as exc:
        raise RenderTimeout(
            f"poppler took longer than {config.render_timeout_s:g} s on pages {first}-{last}; killed"
        ) from exc
    except (PDFPageCountError, PDFSyntaxError) as exc:
        raise RenderFailed(f"poppler failed on pages {first}-{last}: {exc}") from exc


#: Degrees clockwise that ``ImageOps.exif_transpose`` turns an image, per EXIF orientation (the
#: orientations in ``MIRRORED_EXIF`` are also mirrored, which it undoes too).
EXIF_ROTATION = {3: 180, 4: 180, 5: 90, 6: 90, 7: 270, 8: 270}
MIRRORED_EXIF = frozenset({2, 4, 5, 7})
EXIF_ORIENTATION_TAG = 0x0112
#: What ``ImageOps.exif_transpose`` does per EXIF orientation, for a frame decoded apart from Pillow.
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
#: TIFF PhotometricInterpretation: 0 means min-is-white, 2 RGB.
TIFF_PHOTOMETRIC = 262
_TIFF_RGB = 2
TIFF_WIDTH, TIFF_HEIGHT, TIFF_BITS_PER_SAMPLE = 256, 257, 258
#: PNG colour types of RGB and RGBA, whose samples the IHDR chunk gives the bit depth of.
_PNG_COLOUR_TYPES = (2, 6)


def upright_resolution(resolution: Sequence[float], orientation: int) -> tuple[float, float]:
    """A frame's (x, y) resolution once ``ImageOps.exif_transpose`` has undone its EXIF orientation."""
    x, y = resolution[:2]
    return (y, x) if EXIF_ROTATION.get(orientation, 0) in (90, 270) else (x, y)


def holds_deep_colour(image: Image.Image, path: str) -> bool:
    """Whether the current frame (of the image file ``path``) holds 16-bit RGB or RGBA samples, which Pillow cuts
    to their high byte as it decodes them: samples holding 12- or 8-bit values came out black, as a 16-bit gray
    frame's do not (:func:`to_gray8`)."""
    if image.format == "TIFF":
        return (image.mode in ("RGB", "RGBA") and image.tag_v2.get(TIFF_PHOTOMETRIC) == _TIFF_RGB
                and set(image.tag_v2.get(TIFF_BITS_PER_SAMPLE, ())) == {16})
    if image.format == "PNG":
        with open(path, "rb") as handle:
            header = handle.read(26)  # the signature, then IHDR: width, height, bit depth, colour type
        return header[24] == 16 and header[25] in _PNG_COLOUR_TYPES
    return False


def _deep_colour(image: Image.Image, path: str) -> Image.Image:
    """The current frame, which :func:`holds_deep_colour`, as 8-bit RGB(A) scaled from the bit depth its colour
    samples fill, as 16-bit gray is, and as stored (not turned by its orientation). tifffile reads a TIFF's samples
    exactly, whatever their compression and layout (separate planes, which OpenCV reads as if interleaved), OpenCV
    a PNG's."""
    width, height = (image.tag_v2[TIFF_WIDTH], image.tag_v2[TIFF_HEIGHT]) if image.format == "TIFF" else image.size
    if width * height > 2 * Image.MAX_IMAGE_PIXELS:  # what Pillow refuses (:func:`allow_pixels`), before decoding
        raise Image.DecompressionBombError(f"a frame of {width}x{height} px could be a decompression bomb")
    channels = len(image.getbands())
    if image.format == "TIFF":
        try:
            with tifffile.TiffFile(path) as tiff:
                page = tiff.pages[image.tell()]
                samples = page.asarray()
        except Exception as exc:  # noqa: BLE001 - codecs raise anything on damaged bytes: the page's failure
            raise RenderFailed(f"the page's 16-bit colour samples cannot be decoded: {type(exc).__name__}: {exc}") \
                from exc
        if page.axes.startswith("S"):  # separate planes: (samples, height, width)
            samples = np.moveaxis(samples, 0, -1)
    else:
        stored = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        samples = None if stored is None else stored[..., [2, 1, 0, 3][:stored.shape[-1]]]  # BGR(A) to RGB(A)
    if samples is None or samples.dtype != np.uint16 or samples.shape[:2] != (height, width) \
            or samples.ndim != 3 or samples.shape[2] < channels:
        raise RenderFailed("the page's 16-bit colour samples cannot be decoded exactly")
    full = _full_scale(samples[..., :3])
    colour = _to_8_bits(samples[..., :3], full)
    if channels == 3:
        return Image.fromarray(colour)
    alpha = _to_8_bits(samples[..., 3], max(full, _full_scale(samples[..., 3])))  # opaque at 16 bits over 12-bit colour
    return Image.fromarray(np.dstack([colour, alpha]))


def decoded_upright(image: Image.Image, path: str) -> Image.Image:
    """The current frame of the image file ``path`` decoded, upright as its EXIF orientation says: 16-bit colour
    as :func:`_deep_colour` reads it, other frames as Pillow does."""
    orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    if holds_deep_colour(image, path):
        deep = _deep_colour(image, path)
        return deep.transpose(EXIF_TRANSPOSE[orientation]) if orientation in EXIF_TRANSPOSE else deep
    if orientation != 1:
        return ImageOps.exif_transpose(image)
    image.load()  # here, not where the caller uses it: what a damaged frame raises is the caller's to catch
    return image


def upright_gray(image: Image.Image, path: str) -> np.ndarray:
    """The current frame of the image file ``path`` as the job reads it: upright, 8-bit gray. ``train`` and ``eval``
    read line images with it too, so a model learns and is scored on what the job gives it (they had used Pillow's
    ``convert("L")``: a line with transparency came out black, a 16-bit one white, a turned JPEG upside down)."""
    return to_gray8(decoded_upright(image, path))


def _render_frame(image: Image.Image, path: str, work: PageWork, config: RasterizeConfig) -> None:
    """Decode the current frame into ``work``, upright as its EXIF orientation says, in square pixels."""
    orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    work.rotation = EXIF_ROTATION.get(orientation, 0)
    dpi_x, dpi_y = upright_resolution(file_resolution(image) or (config.dpi, config.dpi), orientation)
    work.dpi = max(dpi_x, dpi_y)
    if image.width * image.height * work.dpi ** 2 / (dpi_x * dpi_y) > config.max_page_pixels:
        raise PageTooLarge(f"page {work.page} has {image.width}x{image.height} px at {dpi_x}x{dpi_y} dpi, "
                           "over the limit once its pixels are square")
    work.image = _square_pixels(upright_gray(image, path), dpi_x, dpi_y)
    work.height, work.width = work.image.shape


def _render_image(task: PageRange, path: str, config: RasterizeConfig) -> list[PageWork]:
    """Each frame on its own: a damaged frame fails its page, the frames that decode are kept."""
    pages = []
    allow_pixels(config.max_page_pixels)
    with open_image(path) as image:
        frames = page_frames(image, task.last)
        for number in range(task.first, task.last + 1):
            work = _new_page(task, number, config.dpi)
            try:
                if number > len(frames):
                    raise SourceChanged(f"page {number} is no longer in the file: it was changed after triage")
                if frames[number - 1].damage is not None:
                    raise RenderFailed(f"page {number} cannot be decoded: {frames[number - 1].damage}")
                image.seek(frames[number - 1].index)
                _render_frame(image, path, work, config)
            except DocumentError as error:
                work.fail(error.error_code, str(error))
            except Exception as exc:  # noqa: BLE001 - decoders raise anything on damaged bytes
                if not (image.format == "JPEG" and _render_completed_jpeg(path, work, config)):
                    work.fail(RenderFailed.error_code, f"page {number} cannot be decoded: {type(exc).__name__}: {exc}")
            pages.append(work)
    return pages


#: The end-of-image marker a JPEG ends with.
JPEG_END = b"\xff\xd9"
#: Bytes laid between a JPEG's data and an end marker given to it: a decoder that still needs data reads them, one
#: that has all it needs does not.
JPEG_FILLERS = (b"\x55" * 2048, b"\x93\x2c" * 1024)


def _jpeg_lacking_only_its_end(path: str) -> bytes | None:
    """The JPEG at ``path`` with its end marker, when that marker is all it lacks (some scanners and interrupted
    copies leave it off; Pillow refuses the file as truncated), else None. A file cut off inside its data decodes
    to other pixels with each filler laid before the marker; a whole one decodes alike with either, never reading
    them."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data.endswith(b"\xff"):  # a marker cut in two
        return None
    try:
        decoded = [_gray_pixels(data + filler + JPEG_END) for filler in (b"", *JPEG_FILLERS)]
    except (OSError, SyntaxError, ValueError):
        return None
    return data + JPEG_END if all(np.array_equal(decoded[0], other) for other in decoded[1:]) else None


def _render_completed_jpeg(path: str, work: PageWork, config: RasterizeConfig) -> bool:
    """Render the JPEG at ``path`` into ``work`` with the end marker it lacks (:func:`_jpeg_lacking_only_its_end`);
    False when it lacks more, or still cannot be decoded."""
    whole = _jpeg_lacking_only_its_end(path)
    if whole is None:
        return False
    try:
        with Image.open(io.BytesIO(whole)) as completed:
            _render_frame(completed, path, work, config)
    except (OSError, SyntaxError, ValueError, DocumentError):  # still damaged: the caller records the first error
        return False
    return True


def _gray_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


def _upright(pages: list[PageWork], config: RasterizeConfig) -> list[PageWork]:
    """Turn each rendered page that is still sideways or upside down after EXIF and /Rotate (only
    when the detector is sure), adding the turn to ``rotation``."""
    if config.detect_orientation:
        for work in pages:
            if work.status == "ok" and work.image is not None:
                try:
                    found = detect_orientation(work.image)
                except Exception as exc:  # noqa: BLE001 - a detector bug leaves the page as it was, never fails it
                    log.warning("orientation detection failed on %s page %d (%s: %s); the page is read as it was "
                                "rendered", work.source, work.page, type(exc).__name__, exc)
                    continue
                if found.rotation:
                    work.image = turn(work.image, found.rotation)
                    work.height, work.width = work.image.shape
                    work.rotation = (work.rotation + found.rotation) % 360
    return pages


def _render(task: PageRange, path: str, config: RasterizeConfig) -> list[PageWork]:
    if task.kind != "pdf":
        return _render_image(task, path, config)
    if not task.repaired:
        return _render_pdf(task, path, config)
    with repaired_pdf(path) as fixed:
        return _render_pdf(task, fixed, config)


def rasterize(task: PageRange, config: RasterizeConfig) -> list[PageWork]:
    """Render one page range upright; a failure fails every page of the range with the reason (``write_failed``
    when the temporary folder is full: the job stops on it, :func:`operators.storage.scratch_space_full`)."""
    if task.oversized is not None:
        return [_new_page(task, task.first, config.dpi).fail(PageTooLarge.error_code, task.oversized)]
    try:
        if task.stamp is not None:
            check_unchanged(task.source, task.stamp)
        quiet_decoders()
        with local_path(task.source, task.stamp) as path:
            pages = _render(task, path, config)
        if task.stamp is not None:
            check_unchanged(task.source, task.stamp)
        return _upright(pages, config)
    except DocumentError as error:
        reason = (error.error_code, str(error))
    except Exception as exc:  # noqa: BLE001 - one file must never end the job
        reason = (RenderFailed.error_code,
                  f"pages {task.first}-{task.last} cannot be decoded: {type(exc).__name__}: {exc}")
        if (full := scratch_space_full(exc, f"reading {task.source}")) is not None:
            # the job's to stop (a repaired PDF, a URI's copy are made there), not the pages': the driver stops
            # it on this code, which Ray Data would not carry as an exception, and records nothing
            reason = (full.error_code, str(full))
    return [_new_page(task, number, config.dpi).fail(*reason) for number in range(task.first, task.last + 1)]
