"""Training data: labelled line images from folders, PAGE/ALTO pages and the synthetic line stream,
and the collator that turns their texts into decoder labels."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from operators.crops import cut_polygon
from operators.errors import ConfigError, DocumentError
from operators.formats.read import check_page_image, check_page_size, page_image, page_xml_files, read_page_xml
from operators.ingest import SUPPORTED_SUFFIXES, open_image
from operators.preprocess import LinePreprocessor
from operators.rasterize import upright_gray
from operators.text import standard_text
from operators.words import fit_loose_crop, fit_rows_to_ink
from pipeline.train.config import DataSource


log = logging.getLogger(__name__)

#: The image files the job reads by themselves (a PDF is no line image): a .webp or .gif line had been passed over.
LINE_IMAGE_SUFFIXES = tuple(suffix for suffix in SUPPORTED_SUFFIXES if suffix != ".pdf")
GT_SUFFIX = ".gt.txt"
#: Synthetic lines are rendered in chunks of this many; DataLoader workers take turns by chunk.
SYNTH_CHUNK = 256


#: The most pixels a line image may have: a long line at 600 dpi is about 20,000 x 300 px (6 Mpx).
MAX_LINE_PIXELS = 16_000_000
#: What Pillow raises on a damaged image file, and the job's reading of its 16-bit colour (:func:`upright_gray`).
IMAGE_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, DocumentError)


@dataclass(frozen=True)
class LabeledLine:
    """One line image and its transcription: a file on disk, or pixels already in memory."""

    name: str
    text: str
    source: str
    path: Path | None = None
    pixels: np.ndarray | None = None
    paint_out_neighbours: bool = False  # a file cut with a margin: see load_gray

    @classmethod
    def in_memory(cls, image: np.ndarray, text: str, name: str, source: str) -> "LabeledLine":
        return cls(name=name, text=text, source=source, pixels=image)

    def __post_init__(self):
        object.__setattr__(self, "text", standard_text(self.text))  # what the model is taught to write

    def load_gray(self) -> np.ndarray:
        """uint8 HxW grayscale pixels, a file's read as the job reads a page image (:func:`upright_gray`), its rows
        fitted to its ink as the pipeline fits the lines it reads, with ``paint_out_neighbours`` after the ink of the
        lines above and below is painted out (:func:`fit_loose_crop`: for images cut with a margin, which carry a
        neighbour's descenders; an image cut tight may have its own accents on its edge, and is only fitted)."""
        if self.pixels is not None:
            return self.pixels
        fit = fit_loose_crop if self.paint_out_neighbours else fit_rows_to_ink
        try:
            with open_image(str(self.path)) as image:
                if image.width * image.height > MAX_LINE_PIXELS:
                    raise ConfigError(f"line image {self.path} is {image.width} x {image.height} px, too large for "
                                      f"a line (at most {MAX_LINE_PIXELS:,} px): is it a page?")
                pixels = upright_gray(image, str(self.path))
        except IMAGE_READ_ERRORS as exc:
            raise ConfigError(f"line image {self.path} cannot be read: {type(exc).__name__}: {exc}") from exc
        return fit(pixels)


def read_line_folder(folder: Path, paint_out_neighbours: bool = False, warn: bool = True) -> list[LabeledLine]:
    """Every ``<stem>.gt.txt`` with its image beside it: ``<stem>.png`` (any of :data:`LINE_IMAGE_SUFFIXES`), else
    ``<stem>.<more>.png`` (e.g. UW3 ``x.bin.png``). A transcription with two images is refused, naming them (one had
    been taken, the other passed over without a word); ``x.b.png`` beside ``x.png`` is an image of its own stem, and
    left out as one without a transcription (it had been taken as one of ``x``'s). ``paint_out_neighbours``: see
    :meth:`LabeledLine.load_gray`; ``warn``: name, all of them, the images and transcriptions left out."""
    if not folder.is_dir():
        raise ConfigError(f"line folder {folder} does not exist or is not a folder")
    paths = sorted(folder.iterdir())
    stems = {path.name[: -len(GT_SUFFIX)] for path in paths if path.name.endswith(GT_SUFFIX)}
    images = [path for path in paths if path.suffix.lower() in LINE_IMAGE_SUFFIXES]
    own: dict[str, list[Path]] = {}  # x.png of x.gt.txt
    longer: dict[str, list[Path]] = {}  # x.bin.png of x.gt.txt: the longest stem with a transcription
    for image in images:
        parts = image.name.split(".")
        stem = next((".".join(parts[:end]) for end in range(len(parts) - 1, 0, -1) if ".".join(parts[:end]) in stems),
                    None)
        if stem is not None:
            (own if stem == image.stem else longer).setdefault(stem, []).append(image)
    lines, without_image, without_text, several_lines, several_images, other_copies = [], [], [], [], [], []
    taken: set[Path] = set()
    for stem in sorted(stems):
        gt = folder / f"{stem}{GT_SUFFIX}"
        candidates = own.get(stem) or longer.get(stem, [])
        taken.update(candidates)
        if stem not in own and len(candidates) > 1:
            # ocropy's x.bin.png beside x.nrm.png: one reading of the line is taken, the first by name, as it had been
            # (the folder had been refused whole); the others are named
            candidates, others = candidates[:1], candidates[1:]
            other_copies += [image.name for image in others]
        if not candidates:
            without_image.append(gt.name)
        elif len(candidates) > 1:
            several_images.append(f"{gt.name} ({', '.join(image.name for image in candidates)})")
        elif not (text := _transcription(gt)):  # as lines without text on PAGE/ALTO pages: nothing to learn or score
            without_text.append(gt.name)
        elif len(text.splitlines()) > 1:  # a line image holds one line (a second one had been taught and scored)
            several_lines.append(gt.name)
        else:
            lines.append(LabeledLine(name=candidates[0].name, text=text, source=str(folder), path=candidates[0],
                                     paint_out_neighbours=paint_out_neighbours))
    if several_images:
        raise ConfigError(f"{folder}: {len(several_images)} transcriptions have more than one image beside them: "
                          f"{'; '.join(several_images)}: keep one image for each")
    for left_out, what in ((without_image, "transcriptions have no image beside them"),
                           (without_text, "transcriptions are empty"),
                           (several_lines, "transcriptions hold more than one line"),
                           (other_copies, "images are other copies of a line whose first image is taken"),
                           ([image.name for image in images if image not in taken],
                            f"images have no {GT_SUFFIX} beside them")):
        if left_out and warn:
            log.warning("%s: %d %s and are left out: %s", folder, len(left_out), what, ", ".join(left_out))
    return lines


def _transcription(gt: Path) -> str:
    """The text of a ``.gt.txt``, a byte order mark and surrounding whitespace dropped."""
    try:
        return gt.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"transcription {gt} is not UTF-8 ({exc.reason} at byte {exc.start}): save it as UTF-8"
                          ) from exc


def read_page_lines(path: Path) -> list[LabeledLine]:
    """Lines cut from PAGE or ALTO pages (one XML file, or every .xml in a folder) by their polygons.

    Pixels outside a line's polygon (within its bounding box) are set to white, so neighbouring
    lines' ascenders and descenders do not leak into the crop. Lines without text are skipped, and so are the lines
    of a page whose image cannot be read, named in a warning (a damaged page image had ended the run in a traceback).
    """
    lines: list[LabeledLine] = []
    for xml_path in page_xml_files(path):
        page = read_page_xml(xml_path)
        image_path = page_image(xml_path, page.image_name)
        check_page_image(xml_path, page, image_path)
        try:
            with open_image(str(image_path)) as image:
                gray = upright_gray(image, str(image_path))
        except IMAGE_READ_ERRORS as exc:
            log.warning("%s: page image %s cannot be read (%s: %s), its lines are left out", xml_path, image_path,
                        type(exc).__name__, exc)
            continue
        check_page_size(xml_path, page, image_path, gray.shape)
        for number, line in enumerate(page.lines):
            crop, text = cut_polygon(gray, line.points), line.text
            if text and crop is not None:  # fitted as the pipeline fits the lines it reads
                lines.append(LabeledLine.in_memory(fit_rows_to_ink(crop), text, f"{xml_path.stem}:{number}",
                                                   str(xml_path)))
    return lines


def read_line_sources(sources: Sequence["DataSource"], warn: bool = True) -> list[LabeledLine]:
    """Labelled lines from folder and page sources (synthetic sources are streamed, not read here); a source
    without any is an error, not a run that trains or validates on nothing. ``warn``: name what a folder leaves out
    (the training streams read again what :func:`check_training_lines` read, and had said it once each)."""
    lines: list[LabeledLine] = []
    for source in sources:
        if source.kind == "synth":
            continue
        found = (read_line_folder(source.path, source.paint_out_neighbours, warn) if source.kind == "folder"
                 else read_page_lines(source.path))
        if not found:  # what each kind holds (a folder's message had named three suffixes, and pages)
            raise ConfigError(f"{source.kind} source {source.path} holds no labelled lines "
                              + (f"(<name>.{'|'.join(suffix[1:] for suffix in LINE_IMAGE_SUFFIXES)} beside "
                                 f"<name>{GT_SUFFIX}){_subfolders_with_lines(source.path)}" if source.kind == "folder"
                                 else "(PAGE/ALTO lines with text and an outline)"))
        lines += found
    return lines


def _subfolders_with_lines(folder: Path) -> str:
    """What to say of a folder's subfolders that hold transcriptions: a folder's lines are read from it alone, and a
    set laid out as one folder per source had been refused with no word of them."""
    held = sorted(sub.name for sub in folder.iterdir() if sub.is_dir() and any(sub.glob(f"*{GT_SUFFIX}")))
    if not held:
        return ""
    return (f"; its subfolder{'s' if len(held) > 1 else ''} {', '.join(held[:3])}{', ...' if len(held) > 3 else ''} "
            f"hold{'' if len(held) > 1 else 's'} lines: give {'them' if len(held) > 1 else 'it'} (subfolders are not "
            "searched)")


def readable_lines(lines: Sequence[LabeledLine]) -> list[LabeledLine]:
    """The lines whose images can be read, the others named in a warning: a damaged file had stopped a run at the
    first validation, or when the shuffle first drew it, and the steps since the last checkpoint were lost (~0.4 ms
    an image: 14,000 lines in 6 s)."""
    readable, unreadable = [], []
    for line in lines:
        try:
            line.load_gray()
        except ConfigError as exc:
            unreadable.append(str(exc))
            continue
        readable.append(line)
    if unreadable and not readable:
        raise ConfigError(f"none of the {len(unreadable)} line images can be read: {'; '.join(unreadable)}")
    if unreadable:  # all of them (the first alone had been)
        log.warning("%d line images cannot be read and are left out: %s", len(unreadable), "; ".join(unreadable))
    return readable


def check_training_lines(sources: Sequence[DataSource], collator: "LabelCollator") -> None:
    """Read every folder and page source once in the training process before any step: an empty or missing source
    and a transcription that is not UTF-8 fail here in one line (in a loader worker they came as its traceback),
    unreadable images are named (the stream passes over them), and so are transcriptions the labels cannot hold
    whole: longer than a label (taught cut short, the model learns to stop mid-line) or holding characters the
    tokenizer has no token for (taught as unknown)."""
    texts = [line.text for line in readable_lines(read_line_sources(sources))]
    if not texts:  # synthetic sources only
        return
    tokenizer = collator.tokenizer
    encoded = tokenizer(texts).input_ids
    too_long = [text for text, ids in zip(texts, encoded) if len(ids) > collator.max_length]
    unknown = [text for text, ids in zip(texts, encoded) if tokenizer.unk_token_id in ids]
    if too_long:
        # the label's own tokens, as the config gives them (the <s> the decoder starts with is no part of it)
        log.warning("%d transcriptions are longer than a label's %d tokens and are taught cut short (e.g. %r)",
                    len(too_long), collator.max_length - collator.drop_bos, too_long[0][:80])
    if unknown:
        log.warning("%d transcriptions hold characters the tokenizer has no token for, taught as unknown "
                    "(e.g. %r)", len(unknown), unknown[0][:80])


class TrainingLines(IterableDataset):
    """Endless stream of (resized uint8 image, text) drawn from the sources by weight.

    Synthetic lines continue at ``start_line``, the lines all sources gave before a resume, so a resumed run never
    repeats them (it skips some instead); every DataLoader worker of every Ray Train rank renders its own chunks, so
    no two of them repeat each other. Real lines are shuffled again from the resumed step's seed: a resumed run goes
    on with the same schedule but other batches than an uninterrupted one would have drawn.
    """

    def __init__(self, sources: Sequence[DataSource], preprocessor: LinePreprocessor, seed: int, start_line: int,
                 shard: tuple[int, int] = (0, 1)):
        self.sources = list(sources)
        self.preprocessor = preprocessor
        self.seed = seed
        self.start_line = start_line
        self.shard = shard

    def __iter__(self) -> Iterator[tuple[np.ndarray, str]]:
        worker = get_worker_info()
        loader_id, loaders = (worker.id, worker.num_workers) if worker else (0, 1)
        rank, world = self.shard
        worker_id, workers = rank * loaders + loader_id, world * loaders
        streams = [_source_stream(source, self.seed, self.start_line, worker_id, workers) for source in self.sources]
        weights = [source.weight for source in self.sources]
        rng = random.Random(self.seed * 1000 + self.start_line + worker_id)
        while True:
            image, text = next(rng.choices(streams, weights)[0])
            yield self.preprocessor.resize(image), text


def _source_stream(source: DataSource, seed: int, start_line: int, worker_id: int, workers: int) -> Iterator[tuple[np.ndarray, str]]:
    if source.kind == "synth":
        return _synth_stream(source, start_line, worker_id, workers)
    return _shuffled_forever(read_line_sources([source], warn=False), random.Random(seed + start_line + worker_id),
                             source.augment)


def _synth_stream(source: DataSource, start_line: int, worker_id: int, workers: int) -> Iterator[tuple[np.ndarray, str]]:
    """Synthetic lines in chunks of SYNTH_CHUNK; worker i of n renders chunks i, i+n, ... (no repeats)."""
    from pipeline.synth.lines import iter_lines

    chunk = start_line // SYNTH_CHUNK + worker_id
    while True:
        begin = max(chunk * SYNTH_CHUNK, start_line)  # a resumed run's first chunk from where the last run stopped
        end = (chunk + 1) * SYNTH_CHUNK if source.count is None else min((chunk + 1) * SYNTH_CHUNK, source.count)
        count = end - begin
        if count <= 0:
            return
        for image, text, _ in iter_lines(count, source.seed, source.font_kind, start_index=begin,
                                            languages=source.languages):
            yield np.asarray(image), text
        chunk += workers


def _shuffled_forever(lines: list[LabeledLine], rng: random.Random, augment: bool) -> Iterator[tuple[np.ndarray, str]]:
    from pipeline.synth.degrade import augment_scan

    pixel_rng = np.random.default_rng(rng.randrange(2**32))
    while lines:
        for line in rng.sample(lines, len(lines)):
            try:
                gray = line.load_gray()
            except ConfigError:  # named before the first step (check_training_lines)
                lines = [other for other in lines if other is not line]
                continue
            yield (augment_scan(gray, pixel_rng) if augment else gray), line.text
    raise ConfigError("no line image of a training source can be read any more")


def validation_lines(sources: Sequence[DataSource]) -> list[LabeledLine]:
    """Fixed validation set: files from folders/pages (those that can be read, :func:`readable_lines`), synthetic
    lines rendered once."""
    lines = readable_lines(read_line_sources([source for source in sources if source.kind != "synth"]))
    for source in sources:
        if source.kind == "synth":
            lines += [
                LabeledLine.in_memory(image, text, f"synth-{source.seed}-{index}", f"synth:{source.font_kind}:{source.seed}")
                for index, (image, text) in enumerate(_synth_stream(source, 0, 0, 1))
            ]
    return lines


@dataclass(frozen=True)
class Batch:
    pixels: list[np.ndarray]
    labels: torch.Tensor


class LabelCollator:
    """Tokenize texts into labels: padding -> -100, no leading <s> when the decoder starts with it."""

    def __init__(self, tokenizer, decoder_start_token_id: int, max_target_tokens: int):
        self.tokenizer = tokenizer
        self.drop_bos = decoder_start_token_id == tokenizer.bos_token_id
        self.max_length = max_target_tokens + (1 if self.drop_bos else 0)

    def __call__(self, items: list[tuple[np.ndarray, str]]) -> Batch:
        return Batch([pixels for pixels, _ in items], self.labels([text for _, text in items]))

    def labels(self, texts: list[str]) -> torch.Tensor:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        return labels[:, 1:] if self.drop_bos else labels
