"""A new TrOCR to train from scratch: its architecture and processor, and how a trained one is saved."""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    DeiTConfig,
    DeiTImageProcessorPil,
    PreTrainedTokenizerBase,
    TrOCRConfig,
    TrOCRProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessorPil,
)

from operators.errors import ConfigError
from operators.model import set_generation_ids
from operators.preprocess import KEEP_ASPECT_KEY
from operators.storage import on_disk, replace_on_disk
from pipeline.train.config import EncoderKind

#: The start of a parameter name inside a module list: ``encoder.layers.3.`` in ``encoder.layers.3.mlp.fc1.weight``.
LAYER_PREFIX = re.compile(r"(?P<stack>.+?)\.\d+\.")


def build_trocr(
    tokenizer: PreTrainedTokenizerBase,
    input_size: tuple[int, int],
    patch_size: tuple[int, int],
    encoder: EncoderKind = "vit",
    hidden_size: int = 256,
    encoder_layers: int = 4,
    encoder_heads: int = 4,
    decoder_layers: int = 3,
    decoder_heads: int = 4,
    max_target_tokens: int = 128,
    keep_aspect: bool = True,
    seed: int = 0,
) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """A randomly initialised TrOCR (ViT or DeiT encoder, TrOCR decoder) and its processor, ready to train (the
    shapes as :class:`pipeline.train.config.ModelSpec` checks them)."""
    encoder_class = {"vit": ViTConfig, "deit": DeiTConfig}[encoder]
    encoder_config = encoder_class(
        image_size=list(input_size),
        patch_size=list(patch_size),
        hidden_size=hidden_size,
        num_hidden_layers=encoder_layers,
        num_attention_heads=encoder_heads,
        intermediate_size=4 * hidden_size,
    )
    decoder_config = TrOCRConfig(
        vocab_size=len(tokenizer),
        d_model=hidden_size,
        decoder_layers=decoder_layers,
        decoder_attention_heads=decoder_heads,
        decoder_ffn_dim=4 * hidden_size,
        max_position_embeddings=max_target_tokens + 2,
        activation_function="gelu",
        dropout=0.0,  # training data is streamed and never repeats: nothing to regularise against
        use_learned_position_embeddings=True,
        layernorm_embedding=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder_config, decoder_config)
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config)
    set_generation_ids(model, tokenizer, "new model")
    model.generation_config.max_new_tokens = max_target_tokens
    processor = TrOCRProcessor(image_processor=_new_image_processor(encoder, input_size, keep_aspect), tokenizer=tokenizer)
    return model, processor


def shrink_trocr(model: VisionEncoderDecoderModel, encoder_layers: Sequence[int],
                 decoder_layers: Sequence[int]) -> VisionEncoderDecoderModel:
    """A copy of ``model`` made of the given encoder and decoder layers, in that order, with everything
    around them (embeddings, norms, output projection, generation settings) unchanged. Built from the
    config rather than by cutting the module lists, so that each layer's cache index is its new place."""
    for name, chosen, count in (("encoder", encoder_layers, model.config.encoder.num_hidden_layers),
                                ("decoder", decoder_layers, model.config.decoder.decoder_layers)):
        if len(set(chosen)) != len(chosen) or not all(0 <= index < count for index in chosen):
            raise ConfigError(f"base_layers.{name} must be distinct layer indices below {count}, got {list(chosen)}")
    config = copy.deepcopy(model.config)
    config.encoder.num_hidden_layers = len(encoder_layers)
    config.decoder.decoder_layers = len(decoder_layers)
    stacks = {side: _layer_stack(model, side) for side in ("encoder", "decoder")}
    renumbered = {f"{stacks[side]}.{old}.": f"{stacks[side]}.{new}."
                  for side, chosen in (("encoder", encoder_layers), ("decoder", decoder_layers))
                  for new, old in enumerate(chosen)}
    state = {}
    for key, value in model.state_dict().items():
        layer = LAYER_PREFIX.match(key)
        if layer is None or layer["stack"] not in stacks.values():
            state[key] = value
        elif layer[0] in renumbered:  # a layer not chosen is left out
            state[renumbered[layer[0]] + key[layer.end():]] = value
    student = VisionEncoderDecoderModel(config=config)
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(model.generation_config)
    return student


def _layer_stack(model: VisionEncoderDecoderModel, side: str) -> str:
    """The parameter name prefix of the encoder's or the decoder's layer list (``encoder.layers``,
    ``decoder.model.decoder.layers`` in transformers 5), found rather than assumed: transformers 4 kept ViT's
    under ``encoder.encoder.layer``."""
    stacks = [name for name, module in getattr(model, side).named_modules() if isinstance(module, torch.nn.ModuleList)]
    if len(stacks) != 1:
        raise ConfigError(f"base_layers: the {side} has {len(stacks)} layer lists ({stacks}), expected one")
    return f"{side}.{stacks[0]}"


#: The folder a model is written to inside its folder before its files are renamed into place.
SAVING_PREFIX = ".saving-"


def save_trocr(model: VisionEncoderDecoderModel, processor: TrOCRProcessor, out_dir: Path) -> Path:
    """Write model (safetensors), image processor and tokenizer where load_trocr finds them. Each file is written
    into a staging folder inside first and renamed into place whole, so a run killed while saving its best model
    leaves every file of the folder complete (transformers rewrites ``config.json`` in place, and a kill there had
    left it empty: no model at all), its data on the disk first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(f"{SAVING_PREFIX}*"):  # a save killed before it ended
        shutil.rmtree(leftover, ignore_errors=True)
    backend = getattr(processor.tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the training labels' truncation and padding are no part of the checkpoint
        backend.no_truncation()
        backend.no_padding()
    # inside the folder: the same filesystem (a rename across a mount point fails), and no write beside it
    with tempfile.TemporaryDirectory(prefix=SAVING_PREFIX, dir=out_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        umask = os.umask(0)
        os.umask(umask)
        for path in sorted(Path(staging).iterdir()):
            # safetensors writes its file for its owner alone (0600): another account (a service, a cluster's
            # workers) could read the model's config but not its weights
            path.chmod(0o666 & ~umask)
            replace_on_disk(path, out_dir / path.name)  # a power cut must not leave the file it replaces empty
    on_disk(out_dir)
    return out_dir


def _new_image_processor(encoder: EncoderKind, input_size: tuple[int, int], keep_aspect: bool) -> Any:
    """Processor settings of the official TrOCR checkpoints (mean/std 0.5), at our input size."""
    size = {"height": input_size[0], "width": input_size[1]}
    common = {"size": size, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    if keep_aspect:
        common[KEEP_ASPECT_KEY] = True
    if encoder == "deit":
        return DeiTImageProcessorPil(crop_size=size, do_center_crop=True, resample=Image.Resampling.BICUBIC, **common)
    return ViTImageProcessorPil(resample=Image.Resampling.BILINEAR, **common)
