"""The official microsoft/trocr-* checkpoints' layout (tiny stand-ins, :func:`helpers.as_official_layout`): they
load quietly with the generation ids their configs give, read as ``generate`` reads them, and the checkpoints
the engine cannot read, or whose tokenizer is not theirs, are refused with the reason."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import operators.model
from helpers import TINY_CORPUS, as_official_layout, build_tiny_random_trocr
from operators.decoding import check_generation_settings, hf_generate
from operators.errors import ModelLoadError
from operators.model import check_tokenizer, load_trocr
from operators.recognize import LineRecognizer
from pipeline.evaluate import evaluate

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def render_line(text: str, height: int = 32) -> np.ndarray:
    font = ImageFont.truetype(FONT, size=int(height * 0.6))
    image = Image.new("L", (int(font.getlength(text)) + 16, height), 255)
    ImageDraw.Draw(image).text((8, height * 0.15), text, font=font, fill=0)
    return np.asarray(image)


@pytest.fixture
def load_reports() -> list[str]:
    """What transformers' loader logs past the project's filter (its own handler writes to the stderr it found at
    import, which the test's capture may not be)."""
    reports: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    loader = logging.getLogger("transformers.modeling_utils")
    loader.addHandler(handler)
    yield reports
    loader.removeHandler(handler)


@pytest.fixture(scope="module", params=["learned", "sinusoidal"])
def official(request, tmp_path_factory) -> Path:
    folder = build_tiny_random_trocr(tmp_path_factory.mktemp(f"official-{request.param}"), seed=3)
    return as_official_layout(folder, sinusoidal=request.param == "sinusoidal")


def test_an_official_layout_loads_without_a_load_report_and_with_its_decoders_generation_ids(official, load_reports,
                                                                                              caplog):
    """transformers 5 has no ``config.decoder_start_token_id`` where config.json gives it in its decoder part only (the
    trocr-base-* checkpoints): loading had failed with an AttributeError. And its LOAD REPORT had called the encoder
    pooler, which the checkpoints lack and the model never uses, "newly initialized ... Consider training", in
    every actor."""
    with caplog.at_level(logging.WARNING):
        bundle = load_trocr(str(official), device="cpu")
    assert not [report for report in load_reports if "LOAD REPORT" in report]
    assert not [record for record in caplog.records if record.name.startswith("operators")]
    config = json.loads((official / "config.json").read_text())["decoder"]
    generation = bundle.model.generation_config
    assert generation.decoder_start_token_id == config["decoder_start_token_id"] == bundle.tokenizer.eos_token_id
    assert generation.pad_token_id == config["pad_token_id"] and generation.eos_token_id == config["eos_token_id"]
    assert generation.use_cache is True  # the official configs ship use_cache: false


def test_an_official_layout_reads_as_generate_reads_it(official, capfd):
    """And generate() runs on it: transformers 5 leaves a sinusoidal position table on the meta device ("Cannot
    copy out of meta tensor"), and had warned in every batch that max_new_tokens and the config's max_length 20
    were both set."""
    recognizer = LineRecognizer.from_pretrained(str(official), device="cpu", max_new_tokens=12)
    bundle = recognizer.bundle
    resized = [bundle.preprocessor.resize(render_line(text)) for text in TINY_CORPUS[:3]]
    pixel_values = bundle.preprocessor.to_pixel_values(resized, "cpu", torch.float32)
    capfd.readouterr()
    for beams in (1, 3):
        fast = recognizer.engine.decode(pixel_values, beams, 12)
        reference = hf_generate(bundle.model, pixel_values, beams, 12)
        assert [line.tokens for line in fast] == [line.tokens for line in reference]
    assert "seem to have been set" not in capfd.readouterr().err
    # the model taken to another dtype (or device) takes a sinusoidal table along: it had stayed fp32 on the CPU,
    # and generate() failed ("mat1 and mat2 must have the same dtype")
    bundle.model.to(torch.bfloat16)
    hf_generate(bundle.model, pixel_values.to(torch.bfloat16), 1, 4)


def test_a_checkpoint_whose_weights_have_other_shapes_is_refused_with_transformers_report(tmp_path, load_reports):
    """The report names the weights and both shapes; transformers' error says only to look at it."""
    folder = build_tiny_random_trocr(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["decoder"]["decoder_ffn_dim"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="above report"):
        load_trocr(str(folder), device="cpu")
    assert any("MISMATCH" in report for report in load_reports)


def test_weights_a_checkpoint_lacks_besides_the_pooler_are_named(tmp_path, caplog):
    folder = as_official_layout(build_tiny_random_trocr(tmp_path / "model"))
    state = torch.load(folder / "pytorch_model.bin")
    del state["decoder.model.decoder.layers.0.fc1.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save(state, folder / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="operators.model"):
        load_trocr(str(folder), device="cpu")
    messages = [record.getMessage() for record in caplog.records if record.name == "operators.model"]
    assert any("1 weights are not in its checkpoint and were left random" in message
               and "layers.0.fc1.weight" in message and "pooler" not in message for message in messages)
    assert any("decoder.extra.weight" in message and "were not used" in message for message in messages)


def test_a_vision_encoder_decoder_with_another_decoder_is_refused_by_the_fast_engine_and_read_by_generate(tmp_path):
    """A BERT decoder had failed in the engine with "'BertLMHeadModel' object has no attribute 'model'"."""
    from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    folder = build_tiny_random_trocr(tmp_path / "bert")
    config = VisionEncoderDecoderModel.from_pretrained(folder).config
    decoder = BertConfig(vocab_size=config.decoder.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, is_decoder=True, add_cross_attention=True)
    bert = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(config.encoder, decoder))
    for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
        setattr(bert.config, name, getattr(config, name))
    for name in folder.glob("*.json"):
        if name.name in ("config.json", "generation_config.json"):
            name.unlink()
    bert.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="'bert' one, not a TrOCR decoder.*recognize.engine=hf"):
        check_generation_settings(str(folder))
    with pytest.raises(ModelLoadError, match="recognize.engine=hf"):
        LineRecognizer.from_pretrained(str(folder), device="cpu", engine="fast")
    lines = tmp_path / "lines"
    lines.mkdir()
    Image.fromarray(render_line("A line")).save(lines / "a.png")
    (lines / "a.gt.txt").write_text("A line")
    scores, results = evaluate(str(folder), [lines], max_new_tokens=4, device="cpu", engine="hf")
    assert len(results) == 1


def test_a_tokenizer_with_more_tokens_than_the_decoder_writes_is_another_models(tmp_path):
    small = build_tiny_random_trocr(tmp_path / "small")
    other = build_tiny_random_trocr(tmp_path / "other", tokenizer_kind="xlm-roberta")
    config = json.loads((small / "config.json").read_text())
    config["decoder"]["vocab_size"] = 50  # the tokenizers have about 300
    (small / "config.json").write_text(json.dumps(config))
    from transformers import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

    VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_pretrained(small)).save_pretrained(small)
    with pytest.raises(ModelLoadError, match=r"tokenizer has \d+ tokens, its decoder writes 50"):
        check_tokenizer(str(small))  # the job's driver, before Ray starts
    with pytest.raises(ModelLoadError, match="not this model's"):
        load_trocr(str(small), device="cpu")
    assert other.is_dir()


def test_a_sentencepiece_vocabulary_without_the_package_names_the_package(tmp_path, monkeypatch):
    """transformers 5 says "`tiktoken` is required" for a sentencepiece.bpe.model it cannot read (microsoft/trocr-small-*
    without the sentencepiece package)."""
    folder = build_tiny_random_trocr(tmp_path / "small", tokenizer_kind="xlm-roberta")
    (folder / "tokenizer.json").unlink()
    (folder / "sentencepiece.bpe.model").write_bytes(b"")

    def fails(*args, **kwargs):
        raise ValueError("`tiktoken` is required to read a `tiktoken` file. Install it with `pip install tiktoken`.")

    monkeypatch.setattr(operators.model.AutoTokenizer, "from_pretrained", fails)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sentencepiece" else real_find_spec(name, *args))
    with pytest.raises(ModelLoadError, match="needs the sentencepiece package: pip install sentencepiece"):
        check_tokenizer(str(folder))


def test_a_sentencepiece_vocabulary_alone_loads_as_the_official_small_checkpoints_ship_it(tmp_path):
    """microsoft/trocr-small-* ship sentencepiece.bpe.model and no tokenizer.json: XLMRobertaTokenizer reads it
    with the sentencepiece package (a dependency), its ids those of fairseq's dictionary (<s> 0, <pad> 1, </s> 2,
    <unk> 3, <mask> last)."""
    import sentencepiece

    folder = build_tiny_random_trocr(tmp_path / "small", tokenizer_kind="xlm-roberta")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TINY_CORPUS * 20))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                             unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.json").unlink()
    shutil.copy(tmp_path / "sp.model", folder / "sentencepiece.bpe.model")
    check_tokenizer(str(folder))
    tokenizer = load_trocr(str(folder), device="cpu").tokenizer
    assert type(tokenizer).__name__ == "XLMRobertaTokenizer" and len(tokenizer) == 60 + 2
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id,
            tokenizer.mask_token_id) == (0, 1, 2, 3, 61)


def test_offline_a_hub_id_is_found_in_the_cache_or_refused_saying_where_it_was_looked_for(tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1, a hub id missing from the cache had been refused by transformers as "Can't load image
    processor for ..., make sure you don't have a local directory with the same name"."""
    from huggingface_hub import constants

    from operators.checkpoint import resolve_checkpoint

    snapshot = tmp_path / "hub" / "models--microsoft--trocr-small-printed" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_checkpoint("microsoft/trocr-small-printed") == "microsoft/trocr-small-printed"
    with pytest.raises(ModelLoadError, match=r"not in the local Hugging Face cache \(.*hub\), where HF_HUB_OFFLINE=1"):
        resolve_checkpoint("microsoft/trocr-small-handwritten")
