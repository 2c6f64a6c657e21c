"""The recognition stage on real tiny TrOCR models: crop preparation and out-of-memory back-off."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoTokenizer

from helpers import build_tiny_random_trocr
from operators.crops import crop_line, prepare_crops
from operators.model import load_line_preprocessor, load_trocr
from operators.errors import RECOGNITION_FAILED
from operators.recognize import LineReading, LineRecognizer, TrOCRRecognizer, join_readings, read_tokens
from operators.words import fit_loose_crop
from operators.records import LinePiece, LineRecord, PageWork
from operators.settings import RecognizeConfig

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def _line(x0, y0, x1, y1, order) -> LineRecord:
    return LineRecord(bbox=(x0, y0, x1, y1), polygon=[(x0, y0), (x1, y0), (x1, y1), (x0, y1)],
                      baseline=[(x0, y1 - 1), (x1, y1 - 1)], block=0, order=order)


def test_prepare_crops_fits_every_shape_and_drops_empty_boxes(tiny_model):
    preprocessor = load_line_preprocessor(str(tiny_model))
    page = np.full((1200, 1600), 255, dtype=np.uint8)
    page[100:130, 100:900] = 0
    lines = [_line(100, 100, 900, 130, 0),      # ordinary line
             _line(50, 300, 50, 340, 1),        # zero width
             _line(0, 500, 1600, 506, 2),       # 1600 x 6: extreme wide
             _line(700, 0, 708, 1200, 3)]       # 8 x 1200: extreme tall
    work = prepare_crops(PageWork("d", "s", 1, 300, 1600, 1200, image=page, lines=lines), preprocessor, padding=4,
                         split_long_lines=True)
    assert [line.order for line in work.lines] == [0, 2, 3]
    assert [len(pieces) for pieces in work.line_pieces] == [1, 1, 1]  # a stretching model reads whole lines
    height, width = preprocessor.input_size
    assert all(piece.pixels.shape == (height, width) and piece.pixels.dtype == np.uint8
               for pieces in work.line_pieces for piece in pieces)
    assert work.image is None


@pytest.fixture(scope="module")
def keep_aspect_model(tmp_path_factory):
    return load_trocr(str(build_tiny_random_trocr(tmp_path_factory.mktemp("keep"), keep_aspect=True)), device="cpu")


def _page_with_lines(texts: list[str]) -> tuple[np.ndarray, list[LineRecord]]:
    font = ImageFont.truetype(FONT, 24)
    page = Image.new("L", (2400, 80 * len(texts) + 40), 255)
    lines = []
    for order, text in enumerate(texts):
        y = 40 + 80 * order
        ImageDraw.Draw(page).text((40, y), text, font=font, fill=0)
        x0, y0, x1, y1 = font.getbbox(text)
        lines.append(_line(40 + x0, y + y0, 40 + x1, y + y1, order))
    return np.array(page), lines


def test_a_line_wider_than_a_keep_aspect_input_is_read_in_pieces_that_fit(keep_aspect_model):
    preprocessor = keep_aspect_model.preprocessor  # 32 x 128: lines over 4:1 are cut
    texts = ["Short", "A much longer line of several words that does not fit the input at all"]
    page, lines = _page_with_lines(texts)
    work = prepare_crops(PageWork("d", "s", 1, 300, page.shape[1], page.shape[0], image=page, lines=lines),
                         preprocessor, padding=4, split_long_lines=True)
    short, long = work.line_pieces
    assert len(short) == 1 and len(long) >= 4
    assert all(piece.aspect <= 4.0 for piece in long)
    fitted = fit_loose_crop(crop_line(page, work.lines[1], 4))  # the pieces tile the whole crop, fitted to the ink
    assert fitted.shape[0] < work.lines[1].bbox[3] - work.lines[1].bbox[1] + 8
    assert sum(piece.aspect for piece in long) == pytest.approx(fitted.shape[1] / fitted.shape[0])
    whole = prepare_crops(PageWork("d", "s", 1, 300, page.shape[1], page.shape[0], image=page, lines=lines),
                          preprocessor, padding=4, split_long_lines=False)
    assert [len(pieces) for pieces in whole.line_pieces] == [1, 1]

    recognizer = LineRecognizer(keep_aspect_model, "fast", num_beams=1, max_new_tokens=6, line_batch_size=3)
    readings = recognizer(work.line_pieces)
    each = recognizer([[piece] for piece in long])
    assert len(readings) == 2
    joined = join_readings(each)  # the pieces, decoded with the short line, regroup to this line
    assert (readings[1].text, readings[1].truncated) == (joined.text, joined.truncated)
    # in other batches a row's products may round differently in the last bit
    assert readings[1].confidence == pytest.approx(joined.confidence, rel=1e-5)
    assert readings[1].word_confidences == pytest.approx(joined.word_confidences, rel=1e-5)
    assert len(joined.word_confidences) == len(joined.text.split())


def test_joined_reading_has_a_space_per_cut_and_the_weakest_confidence():
    parts = [LineReading("total", 0.9, False, (0.9,)), LineReading("", 0.5, False),
             LineReading("$12 net", 0.7, True, (0.6, 0.8))]
    assert join_readings(parts) == LineReading("total $12 net", 0.5, True, (0.9, 0.6, 0.8))
    assert join_readings([parts[0], None]) is None


def test_each_word_scores_the_tokens_it_starts(tiny_model):
    """Byte-level BPE marks a token that starts a word with 'Ġ': an oracle independent of read_tokens. The
    tokens of a character of several bytes ("é", "€": this tokenizer has only single bytes for them) all
    count for its word, also those that complete it and add no character of their own."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "Sphinx of black quartz, café judge 0123456789 €5 (again)"
    tokens = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    logprobs = [math.log(0.3 + 0.05 * (index % 10)) for index in range(len(tokens))]
    expected: list[list[float]] = []
    for index, piece in enumerate(tokenizer.convert_ids_to_tokens(tokens[:-1])):
        if index == 0 or piece.startswith("Ġ"):
            expected.append([])
        expected[-1].append(logprobs[index])
    assert len(expected) == len(text.split()) and any(len(word) > 1 for word in expected)

    read, confidences = read_tokens(tokenizer, tokens, logprobs, line_confidence=0.5)
    assert read == text
    assert confidences == pytest.approx([math.exp(sum(word) / len(word)) for word in expected])
    assert read_tokens(tokenizer, [tokenizer.eos_token_id], [-0.1], 0.5) == ("", ())


def test_control_characters_a_model_writes_are_spaces_between_words(tiny_model):
    """A byte-level vocabulary holds every byte: a form feed (the text export's page separator), NUL (no PDF font
    has a glyph) or ESC (XML cannot hold it) leaves the recognizer as a space, and words and their confidences
    are counted on that text, so every export splits the line into the same words."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokens = tokenizer("Invoice\x0c2024 total\x1b42 due\x00 \u2028now\x85", add_special_tokens=False).input_ids
    read, confidences = read_tokens(tokenizer, tokens, [-0.2] * len(tokens), line_confidence=0.5)
    assert read == "Invoice 2024 total 42 due   now" and len(confidences) == len(read.split()) == 6


def test_mufi_characters_a_model_learned_are_written_in_standard_unicode(tiny_model):
    """OCR-D's Fraktur ground truth writes a few vowels with a small e above as MUFI private-use
    characters; a model trained on them writes them, and the text that leaves the recognizer has the
    vowel and U+0364 instead, word for word."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokens = tokenizer("Aufkl\ue42crung h\ue644her \ue72bber", add_special_tokens=False).input_ids
    read, confidences = read_tokens(tokenizer, tokens, [-0.2] * len(tokens), line_confidence=0.5)
    assert read == "Aufkla\u0364rung ho\u0364her u\u0364ber" and len(confidences) == 3


OOM_PROBE = textwrap.dedent("""
    import os, resource, sys
    import numpy as np, torch
    from operators.recognize import TrOCRRecognizer
    from operators.records import LinePiece
    from operators.settings import RecognizeConfig

    torch.set_num_threads(1)
    count, headroom = int(sys.argv[2]), int(sys.argv[3])
    recognizer = TrOCRRecognizer(RecognizeConfig(model=sys.argv[1], line_batch_size=count, max_new_tokens=4,
                                                 device="cpu"))
    rng = np.random.default_rng(0)
    lines = [[LinePiece(rng.integers(0, 256, (32, 128, 3), dtype=np.uint8), 1.0)] for _ in range(count)]
    reference = [r.text for r in recognizer.recognizer(lines[:16])]
    # a real allocation limit, some MB above what the process maps now, far below what all lines at once need
    mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    readings = recognizer.decode_with_backoff(lines)
    print("batch", recognizer.recognizer.line_batch_size)
    print("unread", sum(r is None for r in readings), "of", len(readings))
    print("same", [r.text for r in readings[:16]] == reference)
""")


@pytest.mark.parametrize("count, headroom_mb", [
    (2048, 150),  # torch's allocator fails first (a RuntimeError)
    (8192, 60),  # numpy fails first, stacking the batch's 96 MB of crops (a MemoryError)
])
def test_out_of_memory_halves_the_batch_and_loses_no_line(tiny_model, count, headroom_mb):
    result = subprocess.run([sys.executable, "-c", OOM_PROBE, str(tiny_model), str(count), str(headroom_mb)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert int(lines["batch"]) < count, "the limit must have forced at least one back-off"
    assert lines["unread"] == f"0 of {count}"
    assert lines["same"] == "True"
    assert f"out of memory decoding {count} lines" in result.stderr


def test_a_batch_that_fails_for_another_reason_than_memory_fails_its_pages_not_the_job(tiny_model):
    """Any other error (here a crop of the wrong size, as another checkpoint's preprocessor would cut it) is
    recorded on each page of the call that was still ok, with its type and reason, so the job writes them as
    failed and goes on; a page that had failed before keeps its own error. Nothing is left behind."""
    recognizer = TrOCRRecognizer(RecognizeConfig(model=str(tiny_model), device="cpu", max_new_tokens=4))
    height, width = recognizer.recognizer.bundle.preprocessor.input_size

    def page(doc_id: str, pixels: np.ndarray) -> PageWork:
        line = LineRecord(bbox=(0, 0, width, height), polygon=[], baseline=[], block=0, order=0)
        return PageWork(doc_id, f"{doc_id}.png", 1, 300, width, height, lines=[line],
                        line_pieces=[[LinePiece(pixels, width / height)]])

    fitting = page("fits", np.full((height, width), 255, np.uint8))
    wrong_size = page("wrong", np.full((height // 2, width // 2), 255, np.uint8))
    earlier = page("earlier", np.full((height, width), 255, np.uint8)).fail("detection_failed", "no page")
    assert recognizer.recognize_pages([fitting]) == [fitting] and fitting.status == "ok"

    fitting = page("fits", np.full((height, width), 255, np.uint8))
    pages = recognizer.recognize_pages([fitting, wrong_size, earlier])
    assert pages == [fitting, wrong_size, earlier]
    assert [work.status for work in pages] == ["failed"] * 3
    for work in (fitting, wrong_size):
        assert work.error_code == RECOGNITION_FAILED
        assert work.error_message.startswith("recognition failed: ValueError: resized line 1 is uint8")
    assert (earlier.error_code, earlier.error_message) == ("detection_failed", "no page")
    assert all(work.line_pieces == [] for work in pages)
