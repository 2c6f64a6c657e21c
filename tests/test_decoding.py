"""The fast decoding engine against transformers ``generate`` on real (tiny) TrOCR models built here.

Equality of argmax/top-k choices between two correct fp32 implementations only holds where the
model's choices are not near-ties: batched and per-line matrix products may round differently in
the last bit. An untrained model's logits sit within ~1e-6 of each other, so the random models here
get their output projection scaled up (same arithmetic, decisive choices), and the main checks use a
model fine-tuned in the fixture until it reads its lines back, with trained-like peaked
distributions and end-of-sequence tokens at very different steps.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import wordfreq
from PIL import Image, ImageDraw, ImageFont
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from transformers import (
    DeiTConfig,
    TrOCRConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from operators.decoding import DecodingEngine, encode_lines, hf_generate
from operators.lexicon import COMMON_ZIPF, UNKNOWN_WORD_ZIPF, WordFrequencyBias, token_texts
from operators.recognize import LineReading, LineRecognizer
from operators.records import LinePiece
from helpers import TINY_CORPUS, build_tiny_random_trocr
from pipeline.train.tokenizer import train_tokenizer
from operators.errors import ModelLoadError
from operators.model import TrOCRBundle, load_trocr, quantize_encoder
from operators.preprocess import ink_columns
from operators.settings import RecognizeConfig
from operators.utf8 import ACCEPT, BROKEN, Utf8Guard, byte_level_token_bytes, token_transitions

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
#: Very different lengths (1 to 20+ tokens), so lines leave the running batch at different steps.
TEXTS = ["Pack", "The quick brown fox jumps over", "0123456789", "How vexingly quick daft zebras jump", "dozen",
         "Sphinx of black quartz, judge my vow"]
FINE_TUNE_STEPS = 150
CONFIDENCE_TOLERANCE = 1e-4


def render_line(text: str, height: int = 32) -> np.ndarray:
    font = ImageFont.truetype(FONT, size=int(height * 0.6))
    image = Image.new("L", (int(font.getlength(text)) + 16, height), 255)
    ImageDraw.Draw(image).text((8, height * 0.15), text, font=font, fill=0)
    return np.asarray(image)


def decode_lines(bundle: TrOCRBundle, resized: list[np.ndarray], num_beams: int, max_new_tokens: int,
                 line_batch_size: int, engine: str = "fast") -> list[LineReading]:
    """Model-size crops read as whole lines, in input order, by the pipeline's recognizer."""
    recognizer = LineRecognizer(bundle, engine, num_beams, max_new_tokens, line_batch_size)
    return recognizer([[LinePiece(pixels, 1.0)] for pixels in resized])


def pixel_values(bundle: TrOCRBundle, texts: list[str]) -> torch.Tensor:
    resized = [bundle.preprocessor.resize(render_line(text)) for text in texts]
    return bundle.preprocessor.to_pixel_values(resized, "cpu", torch.float32)


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch: tiny ops on a shared 2-core machine run far faster without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> TrOCRBundle:
    """The tiny ViT/RoBERTa model fine-tuned on TEXTS until it reads them back."""
    bundle = load_trocr(str(build_tiny_random_trocr(tmp_path_factory.mktemp("trained"))), device="cpu")
    inputs = pixel_values(bundle, TEXTS)
    labels = bundle.tokenizer(TEXTS, padding=True, return_tensors="pt").input_ids
    labels[labels == bundle.tokenizer.pad_token_id] = -100
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(bundle.model.parameters(), lr=3e-3)
    bundle.model.train()
    for _ in range(FINE_TUNE_STEPS):
        loss = bundle.model(pixel_values=inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bundle.model.eval()
    return bundle


def assert_same_lines(fast, reference):
    assert [line.tokens for line in fast] == [line.tokens for line in reference]
    assert [line.truncated for line in fast] == [line.truncated for line in reference]
    for ours, theirs in zip(fast, reference):
        assert ours.confidence == pytest.approx(theirs.confidence, abs=CONFIDENCE_TOLERANCE)


def test_fine_tuned_model_reads_its_lines(trained):
    """Guards the premise of the tests below: peaked choices and end-of-sequence at different steps."""
    readings = decode_lines(trained, [trained.preprocessor.resize(render_line(t)) for t in TEXTS], num_beams=1,
                            max_new_tokens=32, line_batch_size=len(TEXTS), engine="hf")
    assert [reading.text for reading in readings] == TEXTS
    assert min(reading.confidence for reading in readings) > 0.5


@pytest.mark.parametrize("num_beams", [1, 4])
def test_same_as_generate_for_lines_of_very_different_lengths(trained, num_beams):
    """Greedy lines leave the running batch at their own end-of-sequence; results equal generate's and
    decoding each line alone."""
    inputs = pixel_values(trained, TEXTS)
    fast = DecodingEngine(trained.model).decode(inputs, num_beams, max_new_tokens=32)
    assert_same_lines(fast, hf_generate(trained.model, inputs, num_beams, max_new_tokens=32))
    lengths = [len(line.tokens) for line in fast]
    assert min(lengths) <= 5 and max(lengths) >= 20 and not any(line.truncated for line in fast)
    one_by_one = [DecodingEngine(trained.model).decode(inputs[i:i + 1], num_beams, 32)[0] for i in range(len(TEXTS))]
    assert_same_lines(fast, one_by_one)


@pytest.mark.parametrize("early_stopping, length_penalty", [(True, 1.0), ("never", 1.0), (False, 2.0)])
def test_beam_search_stopping_rules_match_generate(trained, early_stopping, length_penalty):
    """With early_stopping=True lines finish their search at different steps and leave the batch early."""
    generation = trained.model.generation_config
    generation.early_stopping, generation.length_penalty = early_stopping, length_penalty
    try:
        inputs = pixel_values(trained, TEXTS)
        fast = DecodingEngine(trained.model).decode(inputs, num_beams=4, max_new_tokens=32)
        assert_same_lines(fast, hf_generate(trained.model, inputs, num_beams=4, max_new_tokens=32))
    finally:
        generation.early_stopping, generation.length_penalty = None, None


@pytest.mark.parametrize("num_beams", [1, 3])
def test_truncation_flag_and_text_match_generate(trained, num_beams):
    resized = [trained.preprocessor.resize(render_line(text)) for text in TEXTS]
    fast = decode_lines(trained, resized, num_beams, max_new_tokens=6, line_batch_size=4, engine="fast")
    reference = decode_lines(trained, resized, num_beams, max_new_tokens=6, line_batch_size=4, engine="hf")
    assert [(r.text, r.truncated) for r in fast] == [(r.text, r.truncated) for r in reference]
    assert any(reading.truncated for reading in fast) and not all(reading.truncated for reading in fast)


def test_word_frequency_bias_is_applied_as_generate_applies_it(trained):
    """The word scores rewrite the line with a word English lacks ("vexingly", read by this tiny model that
    knows six lines: the test's premise); the engine's beams rank as ``generate``'s with the same logits
    processor, and the engine's confidences stay the model's own, also on a line whose rare words the
    scores charged ("Sphinx", "quartz") but did not change."""
    inputs = pixel_values(trained, TEXTS)
    word_scores = WordFrequencyBias(trained.tokenizer, ["en"], trained.model.config.decoder.vocab_size, weight=1.0)
    plain = DecodingEngine(trained.model).decode(inputs, num_beams=4, max_new_tokens=32)
    scored = DecodingEngine(trained.model).decode(inputs, num_beams=4, max_new_tokens=32, logits_processor=word_scores)
    reference = hf_generate(trained.model, inputs, num_beams=4, max_new_tokens=32, logits_processor=word_scores)
    assert [line.tokens for line in scored] == [line.tokens for line in reference]
    changed = [i for i, (ours, before) in enumerate(zip(scored, plain)) if ours.tokens != before.tokens]
    assert TEXTS.index("How vexingly quick daft zebras jump") in changed and len(changed) < len(TEXTS)
    sphinx = TEXTS.index("Sphinx of black quartz, judge my vow")
    assert sphinx not in changed
    assert scored[sphinx].confidence == pytest.approx(plain[sphinx].confidence, abs=CONFIDENCE_TOLERANCE)
    assert reference[sphinx].confidence < plain[sphinx].confidence - 0.01  # generate's include the scores
    with pytest.raises(ValueError, match="num_beams >= 2"):
        DecodingEngine(trained.model).decode(inputs, num_beams=1, max_new_tokens=32, logits_processor=word_scores)


@pytest.mark.parametrize("tokenizer_kind", ["roberta", "xlm-roberta"])
def test_word_frequency_bias_scores_the_word_a_token_would_end(tokenizer_kind):
    """Every token that can end a word (space, punctuation, end of line; byte-level BPE and sentencepiece
    alike) gets the score of the word before it: nothing for a common word, less the rarer it is, least for
    none; zero after no word; a token inside a word (letter, digit, apostrophe, hyphen) gets nothing."""
    tokenizer = train_tokenizer(TINY_CORPUS, tokenizer_kind, vocab_size=300)
    vocab = len(tokenizer)
    word_scores = WordFrequencyBias(tokenizer, ["en"], vocab, weight=1.0)
    texts = token_texts(tokenizer, vocab)
    space, comma, hyphen, letter, digit = (texts.index(text) for text in (" ", ",", "-", "a", "7"))
    start = tokenizer.bos_token_id
    prefixes = ["The black", "The quartz", "The qvzkx", "In 1905", "The qvzkx - a"]
    rows = [[start, *tokenizer(text, add_special_tokens=False).input_ids] for text in prefixes]
    length = max(map(len, rows))
    rows = [[start] * (length - len(row)) + row for row in rows]  # the start token ends no word
    scores = word_scores(torch.tensor(rows), torch.zeros((len(rows), vocab)))
    ends = torch.tensor(word_scores.ends_word)
    assert ends[space] and ends[comma] and ends[tokenizer.eos_token_id]
    assert not ends[letter] and not ends[digit] and not ends[hyphen]
    assert (scores[:, ~ends] == 0).all()
    common, rare, nonsense, number, after_dash = scores[:, comma].tolist()
    assert wordfreq.zipf_frequency("black", "en") > COMMON_ZIPF and common == 0.0
    assert rare == pytest.approx(wordfreq.zipf_frequency("quartz", "en") - COMMON_ZIPF) and rare < -0.5
    assert nonsense == UNKNOWN_WORD_ZIPF - COMMON_ZIPF and number == 0.0 and after_dash == 0.0
    assert (scores[1, ends] == rare).all()

    def score(text: str) -> float:
        return word_scores.word_score(tuple(tokenizer(text, add_special_tokens=False).input_ids))

    assert score(" qvzkx - ") == 0.0 and score(" qvzkx") == nonsense  # a spaced dash ends the word before it
    assert score(" qvzkx-black") == nonsense and score(" black-quartz") < 0  # compounds: wordfreq's parts
    assert score(" qvzkx-") == 0.0  # broken at the end of a line: its end is on the next
    assert score(" couldn't") == 0.0 and wordfreq.zipf_frequency("couldn", "en") < COMMON_ZIPF
    assert score(' "black",') == 0.0
    with pytest.raises(ValueError, match="no word list for language"):
        WordFrequencyBias(tokenizer, ["xx"], vocab)


def test_word_frequency_bias_reads_old_umlauts_and_curly_apostrophes():
    tokenizer = train_tokenizer(TINY_CORPUS, "roberta", vocab_size=300)  # byte-level: spells any character
    word_scores = WordFrequencyBias(tokenizer, ["de", "fr"], len(tokenizer), weight=1.0)

    def score(text: str) -> float:
        return word_scores.word_score(tuple(tokenizer(text, add_special_tokens=False).input_ids))

    assert score(" fu\u0364r") == score(" f\u00fcr") == 0.0 and score(" fur") < 0
    assert score(" l\u2019homme") == score(" l'homme") == 0.0


def test_languages_reach_the_recognizer_and_need_beams(tiny_model: Path):
    config = RecognizeConfig(model=str(tiny_model), device="cpu", num_beams=2, languages=("en", "fr"))
    assert LineRecognizer.from_config(config).word_scores.languages == ("en", "fr")
    assert LineRecognizer.from_config(RecognizeConfig(model=str(tiny_model), device="cpu")).word_scores is None
    with pytest.raises(ValueError, match="set num_beams"):
        RecognizeConfig(languages=("en",))
    with pytest.raises(ValueError, match="need num_beams >= 2"):
        LineRecognizer.from_pretrained(str(tiny_model), "cpu", engine="hf", languages=("en",))
    with pytest.raises(ValueError, match="no word list for language"):
        RecognizeConfig(num_beams=4, languages=("en", "klingon"))
    with pytest.raises(ValueError, match="no word list for language"):
        RecognizeConfig(num_beams=4, languages=("zh",))


def peaked(model: VisionEncoderDecoderModel) -> VisionEncoderDecoderModel:
    """Scale the output projection (and the input embeddings where they are tied to it): decisive,
    non-tied next-token choices, the same weights for both decoders."""
    with torch.no_grad():
        model.decoder.output_projection.weight.mul_(50.0)
    return model.eval()


@pytest.mark.parametrize("tokenizer_kind, encoder", [("roberta", "vit"), ("xlm-roberta", "deit")])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_random_models_of_both_kinds(tmp_path, one_thread, tokenizer_kind, encoder, num_beams):
    bundle = load_trocr(str(build_tiny_random_trocr(tmp_path / "model", tokenizer_kind, encoder)), device="cpu")
    model = peaked(bundle.model)
    inputs = pixel_values(bundle, TEXTS[:4])
    fast = DecodingEngine(model).decode(inputs, num_beams, max_new_tokens=12)
    assert_same_lines(fast, hf_generate(model, inputs, num_beams, max_new_tokens=12))


def test_utf8_automaton_accepts_exactly_the_byte_strings_python_decodes():
    """Random byte strings, weighted to lead and continuation bytes: the automaton is between characters
    exactly where Python decodes the bytes so far, and broken exactly where no continuation bytes would
    make them decode."""
    rng = np.random.default_rng(0)
    bytes_pool = np.concatenate([np.arange(256), np.arange(0x80, 0xC0), [0xC3, 0xE0, 0xED, 0xF0, 0xF4] * 20])
    tails = [bytes(tail) for length in range(4) for tail in itertools.product((0x80, 0x90, 0xA0, 0xBF), repeat=length)]
    for _ in range(3000):
        data = bytes(rng.choice(bytes_pool, size=rng.integers(1, 7)).astype(np.uint8))
        states = token_transitions([data[:end] for end in range(1, len(data) + 1)])[ACCEPT]
        for end, state in enumerate(states, start=1):
            assert (state == ACCEPT) == _decodes(data[:end]), data[:end]
            assert (state != BROKEN) == any(_decodes(data[:end] + tail) for tail in tails), data[:end]


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("num_beams", [1, 3])
def test_utf8_guard_keeps_lines_to_whole_characters_as_generate_does(trained, num_beams):
    """A model that often prefers the first byte of a two-byte character to the letter it reads breaks
    characters (the premise); with the guard no line does, nor ends inside a character, and the engine
    chooses and scores as ``generate`` given the same guard."""
    model = copy.deepcopy(trained.model)
    vocab = model.config.decoder.vocab_size
    token_bytes = byte_level_token_bytes(trained.tokenizer, vocab)
    inputs = pixel_values(trained, TEXTS)
    read = DecodingEngine(model).decode(inputs, num_beams, max_new_tokens=32)
    common = Counter(token for line in read for token in line.tokens if token_bytes[token]).most_common(3)
    lead_byte = token_bytes.index(b"\xc3")  # the first byte of "à", "é", "ü"
    with torch.no_grad():  # the lead byte outscores, wherever they lead, the model's three commonest tokens
        projection = model.decoder.output_projection.weight
        projection[lead_byte] = 2 * sum(projection[token] for token, _ in common)
    guard = Utf8Guard.for_tokenizer(trained.tokenizer, vocab, model.generation_config.eos_token_id)

    def whole_characters(line) -> bool:
        return _decodes(b"".join(token_bytes[token] for token in line.tokens))

    unguarded = DecodingEngine(model).decode(inputs, num_beams, max_new_tokens=32)
    assert sum(not whole_characters(line) for line in unguarded) >= 3
    guarded = DecodingEngine(model).decode(inputs, num_beams, max_new_tokens=32, utf8_guard=guard)
    assert_same_lines(guarded, hf_generate(model, inputs, num_beams, max_new_tokens=32, utf8_guard=guard))
    assert all(whole_characters(line) for line in guarded if not line.truncated)
    assert sum(not line.truncated for line in guarded) >= 3
    assert any(token_bytes[token].startswith(b"\xc3") for line in guarded for token in line.tokens)
    resized = [trained.preprocessor.resize(render_line(text)) for text in TEXTS]
    readings = decode_lines(dataclasses.replace(trained, model=model), resized, num_beams, 32, len(TEXTS))
    assert not any("\ufffd" in reading.text for reading in readings if not reading.truncated)


def test_utf8_guard_only_for_byte_level_tokenizers(tmp_path):
    """Sentencepiece pieces are whole characters: no guard. The bundled models' byte-level BPE gets one."""
    sentencepiece = load_trocr(str(build_tiny_random_trocr(tmp_path / "spm", "xlm-roberta")), device="cpu")
    assert LineRecognizer(sentencepiece, "fast", 1, 8, 4).utf8_guard is None
    byte_level = load_trocr(str(build_tiny_random_trocr(tmp_path / "bpe", "roberta")), device="cpu")
    assert LineRecognizer(byte_level, "fast", 1, 8, 4).utf8_guard is not None


def test_sinusoidal_positions_scaled_embeddings_and_projected_encoder(one_thread):
    """The other TrOCR decoder variants: sinusoidal positions, sqrt(d) embedding scale, relu, no embedding
    layer norm, and an encoder wider than the decoder (enc_to_dec_proj)."""
    encoder = DeiTConfig(image_size=[32, 128], patch_size=16, hidden_size=48, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=96)
    decoder = TrOCRConfig(vocab_size=97, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                          activation_function="relu", use_learned_position_embeddings=False, scale_embedding=True,
                          layernorm_embedding=False, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(3)
    model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    model.generation_config.decoder_start_token_id = 2
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 1, 2
    assert hasattr(model, "enc_to_dec_proj")
    model = peaked(model)
    inputs = torch.randn(5, 3, 32, 128)
    for num_beams in (1, 3):
        fast = DecodingEngine(model).decode(inputs, num_beams, max_new_tokens=10)
        assert_same_lines(fast, hf_generate(model, inputs, num_beams, max_new_tokens=10))


def test_empty_input_and_bad_shapes(trained):
    engine = DecodingEngine(trained.model)
    assert engine.decode(torch.zeros((0, 3, 32, 128)), num_beams=1, max_new_tokens=8) == []
    assert decode_lines(trained, [], num_beams=1, max_new_tokens=8, line_batch_size=4) == []
    with pytest.raises(ValueError, match="lines, 3, height, width"):
        engine.decode(torch.zeros((2, 32, 128)), num_beams=1, max_new_tokens=8)
    with pytest.raises(ValueError, match="must be >= 1"):
        engine.decode(torch.zeros((1, 3, 32, 128)), num_beams=0, max_new_tokens=8)


def test_lines_stop_at_the_last_learned_position(tiny_model: Path, one_thread):
    """generate() raises IndexError past the learned positions; the engine returns truncated lines."""
    bundle = load_trocr(str(tiny_model), device="cpu")
    positions = bundle.model.config.decoder.max_position_embeddings
    lines = DecodingEngine(bundle.model).decode(pixel_values(bundle, ["dozen"]), 1, max_new_tokens=positions + 10)
    assert lines[0].truncated and len(lines[0].tokens) == positions


def test_refuses_generation_settings_it_does_not_implement(tiny_model: Path):
    bundle = load_trocr(str(tiny_model), device="cpu")
    bundle.model.generation_config.no_repeat_ngram_size = 3
    with pytest.raises(ModelLoadError, match="no_repeat_ngram_size.*engine=hf"):
        DecodingEngine(bundle.model)


def test_fast_is_the_default_engine():
    assert RecognizeConfig().engine == "fast"


@pytest.mark.parametrize("encoder", ["vit", "deit"])
def test_encoder_at_ink_width_equals_full_width_with_the_other_patches_masked(tmp_path, one_thread, encoder):
    """Each line attends to its own patches only, which keep their own positions: transformers' own
    encoder at full width, with every other patch masked out of attention, gives the same output for them."""
    model = load_trocr(str(build_tiny_random_trocr(tmp_path / encoder, encoder=encoder, keep_aspect=True)),
                       device="cpu").model.encoder  # 32 x 128 input, 16 x 16 patches: a grid of 2 rows x 8
    images = torch.randn(3, 3, 32, 128)
    memory, own = encode_lines(model, images)
    assert own is None and torch.equal(memory, model(pixel_values=images).last_hidden_state)
    specials, kept, widths = (2 if encoder == "deit" else 1), 5, [80, 33, 1]  # 5, 3 and 1 columns of patches
    memory, own = encode_lines(model, images[..., :kept * 16], widths)
    for line, columns in enumerate((5, 3, 1)):
        mask = torch.ones(1, specials + 16, dtype=torch.long)
        mask[:, specials:] = torch.arange(16).remainder(8).lt(columns).long()
        masked = model(pixel_values=images[line:line + 1], attention_mask=mask).last_hidden_state[0]
        assert own[line].tolist() == mask[0].reshape(-1)[:specials].bool().tolist() + \
            torch.arange(2 * kept).remainder(kept).lt(columns).tolist()
        torch.testing.assert_close(memory[line][own[line]], masked[mask[0].bool()], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        encode_lines(model, images[..., :40], [40, 40, 40])


def test_batches_are_cut_at_their_widest_line_rounded_up_to_a_patch(tmp_path, one_thread):
    """The fast engine reads a keep-aspect batch at its widest line's width, rounded up to a patch."""
    bundle = load_trocr(str(build_tiny_random_trocr(tmp_path / "wide", keep_aspect=True)), device="cpu")
    assert bundle.width_step == 16
    resized = [bundle.preprocessor.resize(render_line(text)[:, :90]) for text in ("Pack", "dozen jugs")]
    widest = max(ink_columns(pixels) for pixels in resized)
    cut = bundle.preprocessor.to_pixel_values(resized, "cpu", torch.float32, bundle.width_step)
    assert 0 < widest < 128 and cut.shape[-1] == -(-widest // 16) * 16
    full = bundle.preprocessor.to_pixel_values(resized, "cpu", torch.float32)
    assert torch.equal(cut, full[..., :cut.shape[-1]])
    stretched = load_trocr(str(build_tiny_random_trocr(tmp_path / "stretched")), device="cpu")
    assert stretched.width_step is None


def test_cpu_bf16_encoder_reads_as_generate_given_the_same_encoding(trained):
    """precision bf16 on the CPU runs the encoder under bf16 autocast and the decoder in fp32 (emulated
    where the CPU lacks native bf16, so this runs on any CPU): the engine equals generate handed the
    same bf16 encoding, the encoding is a different one from fp32's, and the lines still read back."""
    inputs = pixel_values(trained, TEXTS)
    fast = DecodingEngine(trained.model, torch.bfloat16).decode(inputs, num_beams=1, max_new_tokens=32)
    assert_same_lines(fast, hf_generate(trained.model, inputs, 1, 32, encoder_dtype=torch.bfloat16))
    at_fp32 = DecodingEngine(trained.model).decode(inputs, num_beams=1, max_new_tokens=32)
    assert [line.confidence for line in fast] != [line.confidence for line in at_fp32]
    bf16 = dataclasses.replace(trained, encoder_dtype=torch.bfloat16)
    readings = decode_lines(bf16, [bf16.preprocessor.resize(render_line(t)) for t in TEXTS], num_beams=1,
                            max_new_tokens=32, line_batch_size=len(TEXTS))
    assert [reading.text for reading in readings] == TEXTS


def test_int8_encoder_reads_as_generate_on_the_same_model(trained):
    """precision int8 quantizes the encoder's linear layers only: the engine still equals generate on
    that model, and the fine-tuned lines still read back."""
    quantized = dataclasses.replace(trained, model=copy.deepcopy(trained.model))
    quantize_encoder(quantized.model)
    encoder_linears = [module for module in quantized.model.encoder.modules() if isinstance(module, DynamicLinear)]
    assert encoder_linears and not any(isinstance(module, DynamicLinear) for module in quantized.model.decoder.modules())
    inputs = pixel_values(quantized, TEXTS)
    fast = DecodingEngine(quantized.model).decode(inputs, num_beams=1, max_new_tokens=32)
    assert_same_lines(fast, hf_generate(quantized.model, inputs, num_beams=1, max_new_tokens=32))
    readings = decode_lines(quantized, [quantized.preprocessor.resize(render_line(t)) for t in TEXTS], num_beams=1,
                            max_new_tokens=32, line_batch_size=len(TEXTS))
    assert [reading.text for reading in readings] == TEXTS


def test_utf8_guard_reads_token_bytes_as_the_byte_level_decoder_writes_them(tmp_path):
    """As the tokenizer's ByteLevel decoder: a piece whose characters are all byte symbols is those bytes (an
    added "Straße" is Latin-1 bytes there, which it decodes to U+FFFD, so the guard never lets it be chosen),
    any other its UTF-8 ("€uro"); special tokens and ids past the tokenizer have none. The end of the line is
    allowed only between characters."""
    bundle = load_trocr(str(build_tiny_random_trocr(tmp_path / "bpe", "roberta")), device="cpu")
    tokenizer = bundle.tokenizer
    tokenizer.add_tokens(["Straße", "€uro"])
    straße, euro = tokenizer.convert_tokens_to_ids(["Straße", "€uro"])
    vocab = len(tokenizer)
    token_bytes = byte_level_token_bytes(tokenizer, vocab + 2)
    for token in (straße, euro):
        assert token_bytes[token].decode("utf-8", errors="replace") == tokenizer.decode([token])
    assert token_bytes[euro] == "€uro".encode() and token_bytes[straße] == "Straße".encode("latin-1")
    assert token_bytes[tokenizer.eos_token_id] == b"" and token_bytes[vocab:] == [b"", b""]
    lead, trail = token_bytes.index(b"\xc3"), token_bytes.index(b"\xa9")
    assert tokenizer.decode([lead, trail]) == "é"
    guard = Utf8Guard(token_bytes, [tokenizer.eos_token_id, vocab + 5])  # an id past the vocabulary is ignored
    states = guard.advance(guard.start(2, torch.device("cpu")), torch.tensor([lead, euro]))
    masked = guard.mask(states, torch.zeros((2, vocab + 2)))
    assert masked[0, tokenizer.eos_token_id] == -torch.inf and masked[1, tokenizer.eos_token_id] == 0
    assert masked[0, trail] == 0 and masked[0, euro] == -torch.inf and masked[1, euro] == 0
    assert masked[:, straße].tolist() == [-torch.inf, -torch.inf]
