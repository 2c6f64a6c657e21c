"""Recognize: line crops to text with a TrOCR VisionEncoderDecoder model.

Two Ray stages, so CPU work overlaps the model: :func:`prepare_crops` (a plain task) cuts and resizes
each line crop exactly as the checkpoint's image processor would; :class:`TrOCRRecognizer` (an actor
that loads the model once) normalizes, packs the crops of several pages by expected text length and
decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from transformers import VisionEncoderDecoderModel

from operators.decoding import DecodedLine, DecodingEngine, sequence_confidence
from operators.detect import crop_line
from pipeline.config import RecognizeConfig
from pipeline.errors import RecognitionFailed
from pipeline.model import LinePreprocessor, TrOCRBundle, load_trocr
from pipeline.records import PageWork


Engine = Literal["fast", "hf"]


@dataclass(frozen=True)
class LineReading:
    text: str
    confidence: float  # geometric mean of the chosen tokens' probabilities, 0..1
    truncated: bool  # no end-of-sequence within max_new_tokens


def prepare_crops(work: PageWork, preprocessor: LinePreprocessor, padding: int) -> PageWork:
    """Cut each detected line from the page and resize it to model input; drop the page image."""
    if work.status == "ok" and work.image is not None:
        work.line_pixels = [preprocessor.resize(crop_line(work.image, line, padding)) for line in work.lines]
    work.image = None
    return work


def _decode_chunk(bundle: TrOCRBundle, resized: Sequence[np.ndarray], num_beams: int, max_new_tokens: int,
                  engine: Engine) -> list[LineReading]:
    pixel_values = bundle.preprocessor.to_pixel_values(resized, bundle.device, bundle.dtype)
    if engine == "fast":
        decoded = DecodingEngine(bundle.model).decode(pixel_values, num_beams, max_new_tokens)
    else:
        decoded = _generate(bundle.model, pixel_values, num_beams, max_new_tokens)
    pad_id = bundle.model.generation_config.pad_token_id
    return [LineReading(text=bundle.tokenizer.decode([t for t in line.tokens if t != pad_id],
                                                     skip_special_tokens=True).strip(),
                        confidence=line.confidence, truncated=line.truncated)
            for line in decoded]


def _generate(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor, num_beams: int,
              max_new_tokens: int) -> list[DecodedLine]:
    """transformers ``generate``: the reference the fast engine is tested against."""
    with torch.inference_mode():
        output = model.generate(
            pixel_values=pixel_values,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
        token_logprobs = model.compute_transition_scores(
            output.sequences, output.scores, getattr(output, "beam_indices", None), normalize_logits=num_beams == 1
        )
    generated = output.sequences[:, -token_logprobs.shape[1]:]
    eos_id = model.generation_config.eos_token_id
    decoded = []
    for tokens, logprobs in zip(generated.tolist(), token_logprobs.float().cpu()):
        length = tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
        decoded.append(DecodedLine(tokens[:length], sequence_confidence(logprobs[:length]),
                                   truncated=eos_id not in tokens))
    return decoded


def decode_lines(bundle: TrOCRBundle, resized: Sequence[np.ndarray], num_beams: int, max_new_tokens: int,
                 line_batch_size: int, length_hints: Sequence[float] | None = None,
                 engine: Engine = "fast") -> list[LineReading]:
    """Decode model-size crops in batches of similar expected length; results in input order.

    ``engine``: "fast" is :class:`operators.decoding.DecodingEngine`, "hf" is transformers ``generate``;
    in fp32 both give the same texts.

    ``length_hints`` (e.g. the crops' width/height before resizing) group lines that will decode to
    a similar number of tokens, so short lines do not wait on long ones.
    """
    if len(resized) == 0:
        return []
    if length_hints is not None and len(length_hints) != len(resized):
        raise ValueError(f"{len(length_hints)} length hints for {len(resized)} crops")
    order = np.argsort(length_hints, kind="stable") if length_hints is not None else np.arange(len(resized))
    readings: list[LineReading | None] = [None] * len(resized)
    for start in range(0, len(order), line_batch_size):
        chunk = order[start:start + line_batch_size]
        for index, reading in zip(chunk, _decode_chunk(bundle, [resized[i] for i in chunk], num_beams,
                                                       max_new_tokens, engine)):
            readings[index] = reading
    return readings


class TrOCRRecognizer:
    """Ray Data actor: loads the model once, then fills in the text of whole pages per call."""

    def __init__(self, config: RecognizeConfig):
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.bundle = load_trocr(config.model, device=config.device, precision=config.precision)

    def recognize_pages(self, pages: list[PageWork]) -> list[PageWork]:
        crops, hints, targets = [], [], []
        for work in pages:
            for line, pixels in zip(work.lines, work.line_pixels):
                crops.append(pixels)
                hints.append((line.bbox[2] - line.bbox[0]) / max(1, line.bbox[3] - line.bbox[1]))
                targets.append(line)
        try:
            readings = decode_lines(self.bundle, crops, self.config.num_beams, self.config.max_new_tokens,
                                    self.config.line_batch_size, hints, self.config.engine)
        except RuntimeError as exc:
            for work in pages:
                if work.status == "ok":
                    work.fail(RecognitionFailed.error_code, f"recognition failed: {exc}")
            return pages
        for line, reading in zip(targets, readings):
            line.text, line.confidence, line.truncated = reading.text, reading.confidence, reading.truncated
        for work in pages:
            work.line_pixels = []
        return pages
