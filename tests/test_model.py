"""The model layer on tiny random checkpoints built here: both tokenizer kinds, ViT and DeiT encoders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from operators.errors import ModelLoadError
from helpers import build_tiny_random_trocr
from operators.checkpoint import recorded_model, resolve_checkpoint, weights_sha256
from operators.model import load_trocr, resolve_dtype
from operators.preprocess import KEEP_ASPECT_KEY, WIDTH_SCALE_KEY, LinePreprocessor, ink_columns
from operators.settings import BUNDLED_MODELS, DEFAULT_MODEL, RecognizeConfig
from pipeline.train.model import build_trocr, save_trocr
from pipeline.train.tokenizer import train_tokenizer

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
KINDS = [("roberta", "vit"), ("xlm-roberta", "deit")]


def render_line(text: str, height: int = 40) -> np.ndarray:
    """A real rendered line of black text on white, uint8 gray."""
    font = ImageFont.truetype(FONT, size=int(height * 0.6))
    width = int(font.getlength(text)) + 16
    image = Image.new("L", (width, height), 255)
    ImageDraw.Draw(image).text((8, height * 0.15), text, font=font, fill=0)
    return np.asarray(image)


@pytest.fixture(scope="session", params=KINDS, ids=lambda kind: "-".join(kind))
def tiny_checkpoint(request, tmp_path_factory) -> Path:
    tokenizer_kind, encoder = request.param
    return build_tiny_random_trocr(tmp_path_factory.mktemp(f"{tokenizer_kind}-{encoder}"), tokenizer_kind, encoder)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint):
    return load_trocr(str(tiny_checkpoint), device="cpu")


def test_load_sets_generation_ids_cache_and_eval_mode(tiny_bundle):
    generation = tiny_bundle.model.generation_config
    tokenizer = tiny_bundle.tokenizer
    assert generation.use_cache is True
    assert generation.decoder_start_token_id == tokenizer.bos_token_id
    assert generation.pad_token_id == tokenizer.pad_token_id
    assert generation.eos_token_id == tokenizer.eos_token_id
    assert not tiny_bundle.model.training
    assert tiny_bundle.device == torch.device("cpu") and tiny_bundle.dtype == torch.float32


def test_a_model_from_a_folder_loads_without_a_progress_bar_and_leaves_them_as_they_were(tiny_checkpoint, capsys):
    """transformers' "Loading weights" bar had been a line of carriage returns in every eval and inspect log."""
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.enable_progress_bar()  # as in a new process (a train test in this one hides them)
    load_trocr(str(tiny_checkpoint), device="cpu")
    assert "Loading weights" not in capsys.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()  # a hub download after it shows its bars
    huggingface_hub.utils.disable_progress_bars()  # the hub's hidden alone (a user's choice) stay hidden
    try:
        load_trocr(str(tiny_checkpoint), device="cpu")
        assert huggingface_hub.utils.are_progress_bars_disabled()
    finally:
        huggingface_hub.utils.enable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # transformers' hidden alone: the hub's stay shown
    huggingface_hub.utils.enable_progress_bars()
    try:
        load_trocr(str(tiny_checkpoint), device="cpu")
        assert not huggingface_hub.utils.are_progress_bars_disabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.utils.logging.enable_progress_bar()


def test_preprocessor_matches_real_image_processor(tiny_bundle):
    crop = render_line("Matching the processor, 123")
    resized = tiny_bundle.preprocessor.resize(crop)
    ours = tiny_bundle.preprocessor.to_pixel_values([resized], "cpu", torch.float32)
    reference = tiny_bundle.processor(images=Image.fromarray(crop).convert("RGB"), return_tensors="pt").pixel_values
    assert resized.shape == (32, 128) and resized.dtype == np.uint8  # gray stays one channel
    assert ours.shape == reference.shape == (1, 3, 32, 128)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_rgb_and_gray_crops_give_the_same_input(tiny_bundle):
    gray = render_line("gray or rgb")
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    from_gray, from_rgb = (tiny_bundle.preprocessor.to_pixel_values([tiny_bundle.preprocessor.resize(crop)], "cpu",
                                                                    torch.float32) for crop in (gray, rgb))
    assert tiny_bundle.preprocessor.resize(rgb).shape == (32, 128, 3)
    assert torch.equal(from_gray, from_rgb)


def test_generate_from_loaded_checkpoint(tiny_bundle):
    resized = [tiny_bundle.preprocessor.resize(render_line(text)) for text in ("one line", "a second, longer line")]
    pixel_values = tiny_bundle.preprocessor.to_pixel_values(resized, tiny_bundle.device, tiny_bundle.dtype)
    with torch.inference_mode():
        generated = tiny_bundle.model.generate(pixel_values, max_new_tokens=6, num_beams=2)
    assert generated.shape[0] == 2 and generated.shape[1] <= 7
    assert bool((generated[:, 0] == tiny_bundle.model.generation_config.decoder_start_token_id).all())
    assert len(tiny_bundle.tokenizer.batch_decode(generated, skip_special_tokens=True)) == 2


def test_preprocessor_rejects_bad_input(tiny_bundle):
    preprocessor = tiny_bundle.preprocessor
    with pytest.raises(ValueError, match="uint8"):
        preprocessor.resize(np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        preprocessor.resize(np.zeros((10, 10, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="empty"):
        preprocessor.resize(np.zeros((0, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match="none"):
        preprocessor.to_pixel_values([], "cpu", torch.float32)
    with pytest.raises(ValueError, match="expected uint8"):
        preprocessor.to_pixel_values([np.zeros((5, 5, 3), dtype=np.uint8)], "cpu", torch.float32)


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory) -> Path:
    """Non-square 24x192 input with 8x8 patches, keep-aspect preprocessing."""
    tokenizer = train_tokenizer(["some text for a wide model, 0-9"] * 4, "roberta", vocab_size=280)
    model, processor = build_trocr(
        tokenizer, input_size=(24, 192), patch_size=(8, 8), hidden_size=32,
        encoder_layers=1, encoder_heads=2, decoder_layers=1, decoder_heads=2, max_target_tokens=16, keep_aspect=True,
    )
    return save_trocr(model, processor, tmp_path_factory.mktemp("wide"))


def test_non_square_keep_aspect_checkpoint_round_trips(wide_checkpoint):
    bundle = load_trocr(str(wide_checkpoint), device="cpu")
    assert bundle.preprocessor.input_size == (24, 192)
    assert bundle.preprocessor.keep_aspect
    assert bundle.model.config.encoder.image_size == [24, 192]
    short = bundle.preprocessor.resize(render_line("short", height=48))
    pixel_values = bundle.preprocessor.to_pixel_values([short], "cpu", torch.float32)
    generated = bundle.model.generate(pixel_values, max_new_tokens=4)
    assert generated.shape[0] == 1
    # "short" at 48 px high scaled to 24 px is ~60 px wide: the rest of the width is white padding.
    assert short.shape == (24, 192)
    assert (short[:, 100:] == 255).all()
    assert (short[:, :60] < 128).any()


def test_keep_aspect_shrinks_long_lines_to_fit_and_centres_them(wide_checkpoint):
    bundle = load_trocr(str(wide_checkpoint), device="cpu")
    long_line = render_line("a very long line that is far wider than the model input " * 2, height=40)
    resized = bundle.preprocessor.resize(long_line)
    dark_rows = np.flatnonzero((resized < 230).any(axis=1))
    assert resized.shape == (24, 192)
    assert dark_rows.size and dark_rows.min() > 0 and dark_rows.max() < 23
    assert (resized[: dark_rows.min()] == 255).all()


def test_keep_aspect_key_is_saved_in_the_processor_config(wide_checkpoint):
    saved = json.loads((wide_checkpoint / "processor_config.json").read_text())
    assert saved["image_processor"][KEEP_ASPECT_KEY] is True


def with_width_scale(checkpoint: Path, folder: Path, width_scale: float) -> Path:
    """A copy of the checkpoint whose processor config sets WIDTH_SCALE_KEY."""
    shutil.copytree(checkpoint, folder)
    config_path = folder / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"][WIDTH_SCALE_KEY] = width_scale
    config_path.write_text(json.dumps(config))
    return folder


def test_width_scale_stretches_lines_and_cuts_long_ones_sooner(wide_checkpoint, tmp_path):
    plain = load_trocr(str(wide_checkpoint), device="cpu").preprocessor
    stretched = load_trocr(str(with_width_scale(wide_checkpoint, tmp_path / "x2", 2.0)), device="cpu").preprocessor
    assert plain.width_scale == 1.0 and stretched.width_scale == 2.0
    assert (plain.max_aspect, stretched.max_aspect) == (8.0, 4.0)
    line = render_line("short", height=48)  # about 40 px of ink at 24 px high
    plain_ink, stretched_ink = ink_columns(plain.resize(line)), ink_columns(stretched.resize(line))
    assert 30 < plain_ink < 60 and abs(stretched_ink - 2 * plain_ink) <= 2
    long_line = stretched.resize(render_line("a line far wider than the input", height=48))
    assert long_line.shape == (24, 192) and ink_columns(long_line) > 150


def test_a_width_scale_on_a_model_that_stretches_lines_to_its_input_is_a_model_load_error(tiny_checkpoint, tmp_path):
    with pytest.raises(ModelLoadError, match="needs trocr_pipeline_keep_aspect"):
        load_trocr(str(with_width_scale(tiny_checkpoint, tmp_path / "bad", 2.0)), device="cpu")


def test_a_width_scale_that_is_not_positive_is_a_model_load_error(wide_checkpoint, tmp_path):
    with pytest.raises(ModelLoadError, match="must be positive"):
        load_trocr(str(with_width_scale(wide_checkpoint, tmp_path / "bad", 0.0)), device="cpu")


def test_stretch_is_default_when_key_absent(tiny_checkpoint):
    assert load_trocr(str(tiny_checkpoint), device="cpu").preprocessor.keep_aspect is False


def test_missing_folder_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_trocr(str(tmp_path / "no-such-model"), device="cpu")


def test_incomplete_folder_names_what_is_missing(tiny_checkpoint, tmp_path):
    broken = Path(shutil.copytree(tiny_checkpoint, tmp_path / "broken"))
    (broken / "model.safetensors").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"broken.*weights.*tokenizer"):
        load_trocr(str(broken), device="cpu")


def test_a_folder_of_another_model_or_a_damaged_config_is_named_before_loading(tiny_checkpoint, tmp_path):
    """A BERT folder had crashed the recognizer actors with an AttributeError after Ray started (the dry run
    passed it), and a config.json emptied by a kill had been blamed on the image processor."""
    other = Path(shutil.copytree(tiny_checkpoint, tmp_path / "bert"))
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ModelLoadError, match="holds a 'bert' model, not a TrOCR one"):
        resolve_checkpoint(str(other))
    (other / "config.json").write_text("")
    with pytest.raises(ModelLoadError, match="its config.json cannot be read"):
        load_trocr(str(other), device="cpu")


def test_corrupt_weights_are_a_model_load_error(tiny_checkpoint, tmp_path):
    broken = Path(shutil.copytree(tiny_checkpoint, tmp_path / "corrupt"))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_trocr(str(broken), device="cpu")


def test_half_precision_on_cpu_is_refused(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_trocr(str(tiny_checkpoint), device="cpu", precision="fp16")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_is_a_bf16_encoder_where_the_cpu_has_native_bf16(tiny_checkpoint, monkeypatch, native):
    """bf16 on the CPU keeps fp32 weights and gives the encoder bf16 autocast; a CPU without native bf16
    (where it would be slower than fp32) refuses it. Both branches run on any CPU (the probe is set
    here; bf16 autocast itself works everywhere, emulated where it is not native)."""
    monkeypatch.setattr("operators.model.cpu_has_native_bf16", lambda: native)
    if native:
        bundle = load_trocr(str(tiny_checkpoint), device="cpu", precision="bf16")
        assert (bundle.dtype, bundle.encoder_dtype) == (torch.float32, torch.bfloat16)
        assert {parameter.dtype for parameter in bundle.model.parameters()} == {torch.float32}
    else:
        with pytest.raises(ModelLoadError, match="native bf16"):
            load_trocr(str(tiny_checkpoint), device="cpu", precision="bf16")
    assert load_trocr(str(tiny_checkpoint), device="cpu", precision="fp32").encoder_dtype is None


def test_int8_loads_an_int8_encoder_on_the_cpu_only(tiny_checkpoint):
    bundle = load_trocr(str(tiny_checkpoint), device="cpu", precision="int8")
    assert bundle.dtype == torch.float32
    assert any(isinstance(module, DynamicLinear) for module in bundle.model.encoder.modules())
    assert not any(isinstance(module, torch.nn.Linear) for module in bundle.model.encoder.modules())
    with pytest.raises(ModelLoadError, match="int8 is for the CPU"):
        resolve_dtype("int8", torch.device("cuda"))


@pytest.mark.parametrize("capability, name, bf16", [((7, 0), "Tesla V100-SXM2-16GB", False),
                                                     ((8, 0), "NVIDIA A100-SXM4-40GB", True)])
def test_bf16_is_refused_on_a_gpu_without_native_bf16(monkeypatch, capability, name, bf16):
    """A V100 had been given bf16 weights: ``torch.cuda.is_bf16_supported()`` says yes wherever a bf16 tensor can be
    made (emulation), so the refusal that names fp16 never came. torch's view of the GPU is set to the card's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=capability[0], minor=capability[1], name=name))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # a bf16 tensor can be made
    cuda = torch.device("cuda")
    assert resolve_dtype("fp16", cuda) == torch.float16
    if bf16:
        assert resolve_dtype("bf16", cuda) == torch.bfloat16
    else:
        with pytest.raises(ModelLoadError, match=f"bf16 is not supported by {name}; use fp16"):
            resolve_dtype("bf16", cuda)


def test_center_crop_processor_is_reproduced():
    from transformers import DeiTImageProcessorPil

    processor = DeiTImageProcessorPil(size={"height": 40, "width": 160}, crop_size={"height": 32, "width": 128},
                                      do_center_crop=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    preprocessor = LinePreprocessor.from_image_processor(processor)
    crop = render_line("centre crop")
    ours = preprocessor.to_pixel_values([preprocessor.resize(crop)], "cpu", torch.float32)
    reference = processor(images=Image.fromarray(crop).convert("RGB"), return_tensors="pt").pixel_values
    assert preprocessor.input_size == (32, 128)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_unreproducible_processor_fails_loudly():
    from transformers import ViTImageProcessorPil

    with pytest.raises(ModelLoadError, match="shortest_edge"):
        LinePreprocessor.from_image_processor(ViTImageProcessorPil(size={"shortest_edge": 32}))


@pytest.mark.parametrize("legacy_config", [
    {"feature_extractor_type": "ViTFeatureExtractor", "resample": 2},
    {"feature_extractor_type": "DeiTFeatureExtractor", "resample": 3, "crop_size": 384, "do_center_crop": True},
], ids=["trocr-base-style", "trocr-small-style"])
def test_official_checkpoint_processor_configs_are_reproduced(tmp_path, legacy_config):
    """preprocessor_config.json as the microsoft/trocr-* checkpoints ship it (int sizes, old class names)."""
    from transformers import AutoImageProcessor

    config = {"do_normalize": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
              "processor_class": "TrOCRProcessor", "size": 384, **legacy_config}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    preprocessor = LinePreprocessor.from_image_processor(processor)
    crop = render_line("An official checkpoint")
    ours = preprocessor.to_pixel_values([preprocessor.resize(crop)], "cpu", torch.float32)
    reference = processor(images=Image.fromarray(crop).convert("RGB"), return_tensors="pt").pixel_values
    assert preprocessor.input_size == (384, 384)
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_short_names_resolve_to_the_bundled_models_whose_cards_give_their_weights_hash(name):
    """The card names the version an output's model_sha256 is matched against: a model trained again and bundled
    without its card brought up to date fails here."""
    assert resolve_checkpoint(name) == str(BUNDLED_MODELS[name])
    assert RecognizeConfig().model == "printed" and BUNDLED_MODELS["printed"] == DEFAULT_MODEL
    assert f"`{weights_sha256(name)}`" in (BUNDLED_MODELS[name] / "README.md").read_text(encoding="utf-8")


def test_a_missing_bundled_model_says_where_the_code_may_run_without_it(tmp_path, monkeypatch):
    """A job submitted with --working-dir runs a copy of the code without models/: the message had named the copy's
    folder only."""
    monkeypatch.setitem(BUNDLED_MODELS, "printed", tmp_path / "models" / "trocr-pipeline-printed-small")
    with pytest.raises(ModelLoadError, match=r"is missing: .*set recognize.model to the model's folder on storage "
                                             r"every node reaches"):
        resolve_checkpoint("printed")


def test_a_model_is_recorded_by_one_name_however_it_is_given_and_its_weights_by_their_hash(tmp_path, tiny_model):
    """The documents row's model: a bundled one by its short name, given by it or by its folder (a relative path
    included); a folder by its absolute path; a hub id as it is. Sharded weights hash as their shards in order."""
    folder = BUNDLED_MODELS["handwritten"]
    for given in ("handwritten", str(folder), os.path.relpath(folder)):
        assert recorded_model(given) == "handwritten"
    assert weights_sha256("handwritten") == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (tmp_path / "link").symlink_to(tiny_model)
    assert recorded_model(str(tmp_path / "link")) == recorded_model(str(tiny_model)) == str(tiny_model.resolve())
    assert (recorded_model("microsoft/trocr-base-printed"), weights_sha256("microsoft/trocr-base-printed")) == (
        "microsoft/trocr-base-printed", None)
    sharded = shutil.copytree(tiny_model, tmp_path / "sharded")
    whole = (sharded / "model.safetensors").read_bytes()
    (sharded / "model.safetensors").unlink()
    (sharded / "b.safetensors").write_bytes(whole[:100])
    (sharded / "a.safetensors").write_bytes(whole[100:])
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"encoder.x": "b.safetensors", "decoder.y": "a.safetensors", "decoder.z": "a.safetensors"}}))
    assert weights_sha256(str(sharded)) == hashlib.sha256(whole[100:] + whole[:100]).hexdigest()
