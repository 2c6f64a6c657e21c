"""Recognize: line crops to text with a TrOCR VisionEncoderDecoder model.

Two Ray stages, so CPU work overlaps the model: :func:`operators.crops.prepare_crops` (in the layout
task) cuts and resizes each line crop exactly as the checkpoint's image processor would;
:class:`TrOCRRecognizer` (an actor that loads the model once) reads the crops of several pages with
one :class:`LineRecognizer`, the predictor that normalizes, packs them by expected text length,
decodes and post-processes them.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, VisionEncoderDecoderModel

from operators.crops import line_pieces
from operators.decoding import DecodedLine, DecodingEngine, hf_generate
from operators.errors import RECOGNITION_FAILED
from operators.model import TrOCRBundle, load_trocr
from operators.preprocess import ink_columns
from operators.records import LinePiece, PageWork
from operators.settings import RecognizeConfig
from operators.text import printable_text, standard_text
from operators.utf8 import Utf8Guard
from operators.words import ink_gaps


Engine = Literal["fast", "hf"]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LineReading:
    text: str
    confidence: float  # geometric mean of the chosen tokens' probabilities, 0..1; a line read in pieces: its lowest
    truncated: bool  # no end-of-sequence within max_new_tokens
    word_confidences: tuple[float, ...] = ()  # one per word of text.split(), from the tokens that start it


def join_readings(readings: Sequence[LineReading | None]) -> LineReading | None:
    """One line's reading from its pieces' readings: texts joined by a space (pieces are cut at word
    gaps), the weakest piece's confidence, the pieces' word confidences in order; None when a piece
    has no reading."""
    if any(reading is None for reading in readings):
        return None
    return LineReading(text=" ".join(reading.text for reading in readings if reading.text),
                       confidence=min(reading.confidence for reading in readings),
                       truncated=any(reading.truncated for reading in readings),
                       word_confidences=tuple(value for reading in readings for value in reading.word_confidences))


def read_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int], logprobs: Sequence[float],
                line_confidence: float) -> tuple[str, tuple[float, ...]]:
    """A decoded line's text and each word's confidence: the geometric mean of the probabilities of
    the tokens whose first visible character lies in the word (a token that spans a space counts for
    the word it starts, a bare space for the word after it, a byte that completes a character for the word
    of the token before). Characters are mapped to tokens by decoding growing prefixes, which stays
    right for byte-level BPE pieces and tokenizer clean-up. A word that no token starts (a token
    running through it from the word before) takes the token that covers its first character. Control
    characters are spaces (:func:`operators.text.printable_text`): they part words, as they do in the exports."""
    text = printable_text(tokenizer.decode(tokens, skip_special_tokens=True))
    ends = list(itertools.accumulate(
        (min(len(text), len(tokenizer.decode(tokens[:count], skip_special_tokens=True)))
         for count in range(1, len(tokens) + 1)), max))
    spans = list(zip([0, *ends[:-1]], ends))
    words = [match.span() for match in re.finditer(r"\S+", text)]
    starts = [start for start, _ in words]
    owned: list[list[float]] = [[] for _ in words]
    special = set(tokenizer.all_special_ids)
    word = None
    for token, (start, end), logprob in zip(tokens, spans, logprobs):
        segment = text[start:end]
        if not segment:
            # a special token; or a byte that completes the character the token before began (its U+FFFD)
            if token not in special and word is not None and word < len(words):
                owned[word].append(logprob)
            continue
        if segment.strip():
            word = bisect.bisect_right(starts, start + len(segment) - len(segment.lstrip())) - 1
        else:  # a bare space starts the next word
            word = bisect.bisect_left(starts, end)
        if word < len(words):
            owned[word].append(logprob)
    confidences = []
    for (word_start, _), values in zip(words, owned):
        if not values:
            values = [logprob for (start, end), logprob in zip(spans, logprobs) if start <= word_start < end]
        confidences.append(_geometric_mean(values) if values else line_confidence)
    # after the word spans: a MUFI character becomes two characters of the same word
    return standard_text(text.strip()), tuple(confidences)


def _geometric_mean(logprobs: Sequence[float]) -> float:
    finite = [value for value in logprobs if math.isfinite(value)]
    return math.exp(sum(finite) / len(finite)) if finite else 0.0


class LineRecognizer:
    """The recognition predictor, in docTR's style: line pieces in, readings out.

    Holds what reading needs, built once from one checkpoint: the pre-processor (``bundle.preprocessor``:
    model-size crops to pixel values, on the model's device and dtype), the model, the decoding engine
    (``fast``: :class:`operators.decoding.DecodingEngine`, its weights merged once, so build a new
    recognizer after training the model further, and for keep-aspect models each line read over its own
    ink; ``hf``: transformers ``generate`` on full-width input, which the engine given the same input
    matches in fp32) and the post-processor (token ids to text, confidence, truncation and word confidences).
    """

    def __init__(self, bundle: TrOCRBundle, engine: Engine, num_beams: int, max_new_tokens: int, line_batch_size: int,
                 languages: Sequence[str] = ()):
        self.bundle = bundle
        # the engine refuses unsupported generation settings now, at start-up
        self.engine = DecodingEngine(bundle.model, bundle.encoder_dtype) if engine == "fast" else None
        self.utf8_guard = Utf8Guard.for_tokenizer(bundle.tokenizer, bundle.model.config.decoder.vocab_size,
                                                  bundle.model.generation_config.eos_token_id)
        self.word_scores = None
        if languages:
            if num_beams == 1:
                raise ValueError("languages rank the beams of a beam search: they need num_beams >= 2")
            from operators.lexicon import WordFrequencyBias  # here: wordfreq's import is paid only when used

            self.word_scores = WordFrequencyBias(bundle.tokenizer, languages, bundle.model.config.decoder.vocab_size)
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.line_batch_size = line_batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str = "auto", precision: str = "fp32", engine: Engine = "fast",
                        num_beams: int = 1, max_new_tokens: int | None = None,
                        line_batch_size: int = 32, languages: Sequence[str] = ()) -> "LineRecognizer":
        """Load a bundled short name, local folder or hub id through the one resolver; an unset
        ``max_new_tokens`` is the model's decode limit (:func:`resolve_max_new_tokens`)."""
        bundle = load_trocr(name_or_path, device, precision)
        return cls(bundle, engine, num_beams, resolve_max_new_tokens(max_new_tokens, bundle.model), line_batch_size,
                   languages)

    @classmethod
    def from_config(cls, config: RecognizeConfig) -> "LineRecognizer":
        return cls.from_pretrained(config.model, config.device, config.precision, config.engine, config.num_beams,
                                   config.max_new_tokens, config.line_batch_size, config.languages)

    def __call__(self, lines: Sequence[Sequence[LinePiece]],
                 on_batch: Callable[[int, int], None] | None = None) -> list[LineReading]:
        """One reading per line from its :func:`line_pieces`; the pieces of all lines are decoded
        together, in batches of similar expected length (their aspects), so short lines do not wait
        on long ones. ``on_batch`` hears before each batch how many pieces of how many are read (the progress of
        a long evaluation)."""
        pieces = [piece for line in lines for piece in line]
        readings: list[LineReading | None] = [None] * len(pieces)
        done = 0
        for chunk in line_batches(len(pieces), self.line_batch_size, [piece.aspect for piece in pieces]):
            if on_batch is not None:
                on_batch(done, len(pieces))
            for index, reading in zip(chunk, self._decode_batch([pieces[i].pixels for i in chunk])):
                readings[index] = reading
            done += len(chunk)
        return [join_readings(part) for part in _regroup(readings, [len(line) for line in lines])]

    def read_images(self, images: Sequence[np.ndarray],
                    on_batch: Callable[[int, int], None] | None = None) -> list[LineReading]:
        """Whole line images (training validation, ``eval --lines``), read exactly as the job reads a
        detected line (long lines in pieces); ``on_batch`` as for :meth:`__call__`."""
        return self([line_pieces(image, ink_gaps(image, (0, 0)), self.bundle.preprocessor, split_long_lines=True)
                     for image in images], on_batch)

    def _decode_batch(self, resized: Sequence[np.ndarray]) -> list[LineReading]:
        # the fast engine reads each line over its own ink, the batch cut at its widest line (encode_lines);
        # generate() gets what a transformers user gives it
        bundle = self.bundle
        width_step = bundle.width_step if self.engine is not None else None
        pixel_values = bundle.preprocessor.to_pixel_values(resized, bundle.device, bundle.dtype, width_step)
        if self.engine is not None:
            widths = [ink_columns(pixels) for pixels in resized] if width_step else None
            decoded = self.engine.decode(pixel_values, self.num_beams, self.max_new_tokens, widths, self.word_scores,
                                         self.utf8_guard)
        else:
            decoded = hf_generate(bundle.model, pixel_values, self.num_beams, self.max_new_tokens, bundle.encoder_dtype,
                                  self.word_scores, self.utf8_guard)
        return [self._read(line) for line in decoded]

    def _read(self, line: DecodedLine) -> LineReading:
        """The post-processor: a decoded line's tokens, less padding, to its reading."""
        pad_id = self.bundle.model.generation_config.pad_token_id
        kept = [(token, logprob) for token, logprob in zip(line.tokens, line.logprobs) if token != pad_id]
        text, word_confidences = read_tokens(self.bundle.tokenizer, [token for token, _ in kept],
                                             [logprob for _, logprob in kept], line.confidence)
        return LineReading(text=text, confidence=line.confidence, truncated=line.truncated,
                           word_confidences=word_confidences)


def _regroup(items: Sequence, counts: Sequence[int]) -> list[list]:
    """Split a flat list back into consecutive groups of the given sizes."""
    groups, start = [], 0
    for count in counts:
        groups.append(list(items[start:start + count]))
        start += count
    return groups


def line_batches(count: int, line_batch_size: int, length_hints: Sequence[float]) -> list[np.ndarray]:
    """Indices of ``count`` crops in the batches a :class:`LineRecognizer` decodes: consecutive runs of
    ``line_batch_size`` in order of their length hints (equal hints keep input order)."""
    if len(length_hints) != count:
        raise ValueError(f"{len(length_hints)} length hints for {count} crops")
    order = np.argsort(length_hints, kind="stable")
    return [order[start:start + line_batch_size] for start in range(0, count, line_batch_size)]


def decode_limit(model: VisionEncoderDecoderModel) -> int | None:
    """Tokens the decoder can produce: its learned position table's size; None when sinusoidal."""
    decoder_config = model.config.decoder
    if getattr(decoder_config, "use_learned_position_embeddings", False):
        return decoder_config.max_position_embeddings
    return None


#: Decode limit of a decoder with sinusoidal positions when ``recognize.max_new_tokens`` is not set.
DEFAULT_MAX_NEW_TOKENS = 128


def resolve_max_new_tokens(requested: int | None, model: VisionEncoderDecoderModel) -> int:
    """The decode limit: as configured, else what the model can produce. Only a configured limit
    beyond the decoder's learned positions warns (and is cut to them): the default always fits."""
    limit = decode_limit(model)
    if requested is None:
        return limit if limit is not None else DEFAULT_MAX_NEW_TOKENS
    if limit is not None and requested > limit:
        log.warning("recognize.max_new_tokens=%d is beyond the decoder's %d learned positions; lines longer "
                    "than %d tokens are cut and flagged truncated", requested, limit, limit)
        return limit
    return requested


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; torch's CPU allocator a plain RuntimeError; numpy (stacking a
    batch's crops) a MemoryError."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


class TrOCRRecognizer:
    """Ray Data actor: loads a :class:`LineRecognizer` once, then fills in the text of whole pages per call.

    Out of memory in a batch halves the line batch size (and keeps it halved for this actor) and
    retries; a line that does not fit even alone fails its page with ``recognition_failed``, the
    other lines keep their text.
    """

    def __init__(self, config: RecognizeConfig):
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.recognizer = LineRecognizer.from_config(config)

    def _release_memory(self) -> None:
        if self.recognizer.bundle.device.type == "cuda":
            torch.cuda.empty_cache()

    def decode_with_backoff(self, lines: list[list[LinePiece]]) -> list[LineReading | None]:
        """Readings in input order; None for a line that does not fit in memory even alone."""
        recognizer = self.recognizer
        while True:
            try:
                return recognizer(lines)
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                self._release_memory()
                if recognizer.line_batch_size == 1:
                    break
                recognizer.line_batch_size = max(1, recognizer.line_batch_size // 2)
                log.warning("out of memory decoding %d lines; line batch size now %d", len(lines),
                            recognizer.line_batch_size)
        readings: list[LineReading | None] = []
        for line in lines:
            try:
                readings.extend(recognizer([line]))
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                self._release_memory()
                readings.append(None)
        return readings

    def recognize_pages(self, pages: list[PageWork]) -> list[PageWork]:
        lines, owners = [], []
        for work in pages:
            for line, pieces in zip(work.lines, work.line_pieces):
                lines.append(pieces)
                owners.append((work, line))
            work.line_pieces = []
        try:
            readings = self.decode_with_backoff(lines)
        except Exception as exc:  # noqa: BLE001 - not memory: record it on the pages instead of losing them
            for work in pages:
                if work.status == "ok":
                    work.fail(RECOGNITION_FAILED, f"recognition failed: {type(exc).__name__}: {exc}")
            return pages
        unread: dict[int, list[int]] = {}
        for (work, line), reading in zip(owners, readings):
            if reading is None:
                unread.setdefault(id(work), []).append(line.order)
                continue
            line.text, line.confidence, line.truncated = reading.text, reading.confidence, reading.truncated
            line.word_confidences = list(reading.word_confidences)
        for work in pages:
            if id(work) in unread:
                orders = unread[id(work)]
                work.fail(RECOGNITION_FAILED,
                          f"{len(orders)} of {len(work.lines)} lines did not fit in memory even one at a time "
                          f"(line order {', '.join(map(str, orders))}); the other lines were read")
        return pages
