"""The recognizer's model side: resolve and load a checkpoint, and turn line crops into encoder input.

Line crops are resized on CPU workers (``LinePreprocessor.resize``, pure PIL/numpy) and only stacked,
rescaled and normalised on the recognizer's device (``LinePreprocessor.to_pixel_values``), so the
expensive per-pixel float work runs next to the model. Together the two reproduce the checkpoint's
image processor exactly; a processor configuration they cannot reproduce fails at load time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    TrOCRProcessor,
    VisionEncoderDecoderModel,
)

from operators.decoding import ink_width_step
from operators.errors import ModelLoadError
from operators.settings import BUNDLED_MODELS

log = logging.getLogger(__name__)

#: Extra preprocessor_config.json key: resize keeping the aspect ratio and pad right with white.
#: transformers ignores it (its own processor stretches); LinePreprocessor reads it. Absent = stretch.
KEEP_ASPECT_KEY = "trocr_pipeline_keep_aspect"
BACKGROUND = 255
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class LinePreprocessor:
    """8-bit grayscale line crops -> model input, reproducing the checkpoint's image processor exactly."""

    input_size: tuple[int, int]  # (height, width) the encoder sees
    resize_size: tuple[int, int]  # (height, width) before a centre crop; equals input_size without one
    resample: Image.Resampling
    keep_aspect: bool
    rescale_factor: float | None
    image_mean: tuple[float, float, float] | None
    image_std: tuple[float, float, float] | None

    @classmethod
    def from_image_processor(cls, image_processor: Any) -> "LinePreprocessor":
        """Read the processor's settings; raise ModelLoadError for any step this class does not reproduce."""
        name = type(image_processor).__name__
        if not getattr(image_processor, "do_resize", False):
            raise ModelLoadError(f"{name}: do_resize is off, so line crops would keep their own sizes; unsupported")
        if getattr(image_processor, "do_pad", False):
            raise ModelLoadError(f"{name}: do_pad is not supported")
        resize_size = _height_width(image_processor.size, name, "size")
        input_size = resize_size
        keep_aspect = bool(getattr(image_processor, KEEP_ASPECT_KEY, False))
        if getattr(image_processor, "do_center_crop", False):
            input_size = _height_width(image_processor.crop_size, name, "crop_size")
            if input_size[0] > resize_size[0] or input_size[1] > resize_size[1]:
                raise ModelLoadError(f"{name}: crop_size {input_size} larger than size {resize_size} is not supported")
            if keep_aspect and input_size != resize_size:
                raise ModelLoadError(f"{name}: {KEEP_ASPECT_KEY} cannot be combined with a centre crop")
        do_normalize = bool(getattr(image_processor, "do_normalize", False))
        return cls(
            input_size=input_size,
            resize_size=resize_size,
            resample=Image.Resampling(int(image_processor.resample)),
            keep_aspect=keep_aspect,
            rescale_factor=float(image_processor.rescale_factor) if image_processor.do_rescale else None,
            image_mean=_per_channel(image_processor.image_mean) if do_normalize else None,
            image_std=_per_channel(image_processor.image_std) if do_normalize else None,
        )

    def resize(self, crop: np.ndarray) -> np.ndarray:
        """uint8 HxW gray or HxWx3 RGB crop -> uint8 (H, W) or (H, W, 3) at ``input_size``; cheap, CPU only.

        Gray stays one channel (a third of the bytes through the object store); the processor's own
        gray-to-RGB step is the channel expansion in :meth:`to_pixel_values`, which gives the same values.
        """
        image = _to_pil(crop)
        if self.keep_aspect:
            image = self._fit_on_background(image)
        else:
            image = image.resize((self.resize_size[1], self.resize_size[0]), resample=self.resample)
            image = self._center_crop(image)
        return np.asarray(image)

    def to_pixel_values(self, resized: Sequence[np.ndarray], device: torch.device | str, dtype: torch.dtype,
                        width_step: int | None = None) -> torch.Tensor:
        """Stack resized crops into (N, 3, H, W), rescale and normalise on ``device``, cast to ``dtype``.

        With ``width_step`` (keep-aspect input only), the batch is cut right of its widest line's last
        non-background column, rounded up to a multiple of ``width_step``: see
        :func:`operators.decoding.encode_lines`.
        """
        if len(resized) == 0:
            raise ValueError("to_pixel_values needs at least one resized line image, got none")
        shapes = {self.input_size, (*self.input_size, 3)}
        for index, pixels in enumerate(resized):
            if pixels.shape not in shapes or pixels.dtype != np.uint8 or pixels.shape != resized[0].shape:
                raise ValueError(f"resized line {index} is {pixels.dtype} {pixels.shape}, expected uint8 "
                                 f"{self.input_size} (gray) or {(*self.input_size, 3)} (RGB), all alike")
        stacked = np.stack(resized)
        if width_step is not None:
            if not self.keep_aspect:
                raise ValueError("only keep-aspect line images can be cut to their ink width")
            widest = max(ink_columns(pixels) for pixels in resized)
            stacked = stacked[:, :, :min(-(-max(widest, 1) // width_step) * width_step, stacked.shape[2])]
        batch = torch.from_numpy(np.ascontiguousarray(stacked)).to(device)
        if batch.ndim == 3:
            values = batch.unsqueeze(1).expand(-1, 3, -1, -1).to(torch.float32)
        else:
            values = batch.permute(0, 3, 1, 2).to(torch.float32)
        if self.rescale_factor is not None:
            values = values * self.rescale_factor
        if self.image_mean is not None:
            mean = torch.tensor(self.image_mean, device=values.device).view(1, 3, 1, 1)
            std = torch.tensor(self.image_std, device=values.device).view(1, 3, 1, 1)
            values = (values - mean) / std
        return values.to(dtype).contiguous()

    def _fit_on_background(self, image: Image.Image) -> Image.Image:
        """Scale to fit inside input_size keeping the aspect ratio; left-aligned, vertically centred, white around."""
        height, width = self.input_size
        scale = min(height / image.height, width / image.width)
        new_width = max(1, min(width, round(image.width * scale)))
        new_height = max(1, min(height, round(image.height * scale)))
        canvas = Image.new(image.mode, (width, height), (BACKGROUND,) * len(image.getbands()))
        canvas.paste(image.resize((new_width, new_height), resample=self.resample), (0, (height - new_height) // 2))
        return canvas

    def _center_crop(self, image: Image.Image) -> Image.Image:
        if self.input_size == self.resize_size:
            return image
        top = (self.resize_size[0] - self.input_size[0]) // 2
        left = (self.resize_size[1] - self.input_size[1]) // 2
        return image.crop((left, top, left + self.input_size[1], top + self.input_size[0]))


def ink_columns(resized: np.ndarray) -> int:
    """Columns of a resized keep-aspect line image up to its last one that is not all background."""
    columns = np.flatnonzero((resized != BACKGROUND).reshape(resized.shape[0], resized.shape[1], -1).any(axis=(0, 2)))
    return int(columns[-1]) + 1 if columns.size else 0


@dataclass(frozen=True)
class TrOCRBundle:
    """Everything a recognizer needs, loaded once per actor."""

    model: VisionEncoderDecoderModel
    processor: TrOCRProcessor
    tokenizer: PreTrainedTokenizerBase
    preprocessor: LinePreprocessor
    device: torch.device
    dtype: torch.dtype
    width_step: int | None = None  # see operators.decoding.ink_width_step


def load_trocr(name_or_path: str, device: str = "auto", precision: str = "fp32") -> TrOCRBundle:
    """Load a TrOCR checkpoint (hub id or local folder) in eval mode with generation ids and cache set."""
    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    source = resolve_checkpoint(name_or_path)
    try:
        model = VisionEncoderDecoderModel.from_pretrained(source, dtype=dtype)
        image_processor = AutoImageProcessor.from_pretrained(source, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # any failure to read the checkpoint is a model error, reported at start-up
        where = "folder" if Path(source).is_dir() else "hub id"
        raise ModelLoadError(f"cannot load TrOCR model from {where} {name_or_path!r}: {exc}") from exc
    preprocessor = LinePreprocessor.from_image_processor(image_processor)
    set_generation_ids(model, tokenizer, name_or_path)
    model.to(torch_device).eval()
    processor = TrOCRProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return TrOCRBundle(model, processor, tokenizer, preprocessor, torch_device, dtype,
                       ink_width_step(model, preprocessor.keep_aspect))


def resolve_checkpoint(name_or_path: str) -> str:
    """Where to load ``name_or_path`` from: a bundled model's short name (``printed``,
    ``handwritten``), a local folder (checked complete first), else a hub id.

    A name that looks like a path (starts with / . ~, or has more than one /) and is no folder is an
    error here, rather than a confusing hub lookup.
    """
    if name_or_path in BUNDLED_MODELS and not BUNDLED_MODELS[name_or_path].is_dir():
        raise ModelLoadError(f"the bundled model {name_or_path!r} is missing: {BUNDLED_MODELS[name_or_path]}")
    local = BUNDLED_MODELS.get(name_or_path, Path(name_or_path).expanduser())
    if local.exists():
        _check_local_folder(local)
        return str(local)
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model folder {name_or_path} does not exist (and it is no hub id)")
    return name_or_path


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but no CUDA GPU is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp16/bf16 only on CUDA, bf16 only on GPUs that support it (not V100 and older)."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        raise ModelLoadError(f"precision {precision} needs a CUDA device, got {device}")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16")
    return PRECISIONS[precision]


def _check_local_folder(folder: Path) -> None:
    """Name every missing piece of a local checkpoint before transformers gives a vaguer error."""
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is a file, expected a checkpoint folder")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        missing.append("image processor (preprocessor_config.json or processor_config.json)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json, vocab.json or sentencepiece.bpe.model)")
    if missing:
        raise ModelLoadError(f"model folder {folder} is incomplete, missing: {', '.join(missing)}")


def set_generation_ids(model: VisionEncoderDecoderModel, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Fill decoder start / pad / eos ids from the configs or the tokenizer, and turn the KV cache on."""
    generation = model.generation_config
    decoder = model.config.decoder
    start = _first_set(generation.decoder_start_token_id, model.config.decoder_start_token_id, decoder.decoder_start_token_id)
    pad = _first_set(generation.pad_token_id, model.config.pad_token_id, decoder.pad_token_id, tokenizer.pad_token_id)
    eos = _first_set(generation.eos_token_id, model.config.eos_token_id, decoder.eos_token_id, tokenizer.eos_token_id)
    if start is None or pad is None or eos is None:
        raise ModelLoadError(f"{source}: cannot determine decoder_start/pad/eos token ids from config or tokenizer")
    generation.decoder_start_token_id = model.config.decoder_start_token_id = start
    generation.pad_token_id = model.config.pad_token_id = pad
    generation.eos_token_id = eos
    generation.use_cache = True


def _first_set(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _height_width(size: Any, name: str, key: str) -> tuple[int, int]:
    height, width = _get(size, "height"), _get(size, "width")
    if not height or not width:
        raise ModelLoadError(f"{name}: {key}={size!r} is not a fixed height/width; unsupported")
    return int(height), int(width)


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _per_channel(value: float | Sequence[float]) -> tuple[float, float, float]:
    values = [float(value)] * 3 if np.isscalar(value) else [float(v) for v in value]
    if len(values) != 3:
        raise ModelLoadError(f"image mean/std must have 3 channels, got {value!r}")
    return values[0], values[1], values[2]


def _to_pil(crop: np.ndarray) -> Image.Image:
    if crop.dtype != np.uint8:
        raise ValueError(f"line crop must be uint8, got {crop.dtype}")
    if crop.ndim == 2:
        image = Image.fromarray(crop, mode="L")
    elif crop.ndim == 3 and crop.shape[2] == 3:
        image = Image.fromarray(crop, mode="RGB")
    else:
        raise ValueError(f"line crop must be HxW gray or HxWx3 RGB, got shape {crop.shape}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"line crop is empty: shape {crop.shape}")
    return image


def load_line_preprocessor(name_or_path: str) -> LinePreprocessor:
    """The checkpoint's preprocessing alone: the job driver checks the model with it at start-up
    (fail fast, before any document is read) and hands it to the CPU crop stage."""
    source = resolve_checkpoint(name_or_path)
    try:
        image_processor = AutoImageProcessor.from_pretrained(source, backend="pil")
    except Exception as exc:
        raise ModelLoadError(f"cannot load the image processor of TrOCR model {name_or_path!r}: {exc}") from exc
    return LinePreprocessor.from_image_processor(image_processor)
