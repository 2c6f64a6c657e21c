"""The recognizer's model side: resolve and load a checkpoint with its line preprocessing.

Line crops are resized on CPU workers (``LinePreprocessor.resize``, :mod:`operators.preprocess`) and
only stacked, rescaled and normalised on the recognizer's device (``LinePreprocessor.to_pixel_values``),
so the expensive per-pixel float work runs next to the model. Together the two reproduce the
checkpoint's image processor exactly; a processor configuration they cannot reproduce fails at load time.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.utils
import torch
import transformers
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    TrOCRProcessor,
    VisionEncoderDecoderModel,
)
from transformers.models.trocr.modeling_trocr import TrOCRSinusoidalPositionalEmbedding

from operators.checkpoint import resolve_checkpoint
from operators.decoding import checkpoint_config, ink_width_step
from operators.errors import ModelLoadError
from operators.preprocess import LinePreprocessor

log = logging.getLogger(__name__)

#: Precision name -> dtype of the model's float tensors. int8 is fp32 with int8 encoder linears
#: (:func:`quantize_encoder`); bf16 on the CPU: see :func:`resolve_encoder_dtype`.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}


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
    encoder_dtype: torch.dtype | None = None  # the encoder's autocast dtype (bf16 on the CPU); None: ``dtype``


def load_trocr(name_or_path: str, device: str = "auto", precision: str = "fp32") -> TrOCRBundle:
    """Load a TrOCR checkpoint (hub id or local folder) in eval mode with generation ids and cache set."""
    torch_device = resolve_device(device)
    dtype, encoder_dtype = resolve_precision(precision, torch_device)
    source = resolve_checkpoint(name_or_path)
    try:
        # a hub id may be downloaded, and its download bars are worth seeing
        with _no_progress_bars() if Path(source).is_dir() else nullcontext(), _quiet_load_report():
            model, loading = VisionEncoderDecoderModel.from_pretrained(source, dtype=dtype, output_loading_info=True)
        image_processor = AutoImageProcessor.from_pretrained(source, backend="pil")
    except Exception as exc:  # any failure to read the checkpoint is a model error, reported at start-up
        raise _load_error(name_or_path, source, exc) from exc
    _report_unloaded_weights(name_or_path, loading)
    restore_sinusoidal_positions(model)
    tokenizer = load_tokenizer(name_or_path, source)
    check_vocabulary(name_or_path, model.config.decoder.vocab_size, tokenizer)
    preprocessor = LinePreprocessor.from_image_processor(image_processor)
    set_generation_ids(model, tokenizer, name_or_path)
    model.to(torch_device).eval()
    if precision == "int8":
        quantize_encoder(model)
    processor = TrOCRProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return TrOCRBundle(model, processor, tokenizer, preprocessor, torch_device, dtype,
                       ink_width_step(model, preprocessor.keep_aspect), encoder_dtype)


def _load_error(name_or_path: str, source: str, exc: Exception) -> ModelLoadError:
    if Path(source).is_dir():
        return ModelLoadError(f"cannot load TrOCR model from folder {name_or_path!r}: {exc}")
    return ModelLoadError(f"cannot load TrOCR model {name_or_path!r}: there is no such folder here, and as a hub id: "
                          f"{exc}")


#: Weights a checkpoint may lack without harm: the encoder's pooler, which a VisionEncoderDecoderModel builds
#: (``AutoModel.from_config``) but never uses; the official microsoft/trocr-* checkpoints were converted without it.
UNUSED_MISSING_WEIGHTS = ("encoder.pooler.",)
#: Entries a checkpoint may hold that no weight takes: transformers 4's TrOCR sinusoidal position buffer
#: (microsoft/trocr-large-printed, trocr-base-stage1).
UNUSED_CHECKPOINT_ENTRIES = ("decoder.model.decoder.embed_positions._float_tensor",)


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Without transformers' LOAD REPORT table: for every official TrOCR checkpoint it lists the encoder pooler as
    "newly initialized ... Consider training on your downstream task", a weight the model never uses, in every
    recognizer actor and every eval; :func:`_report_unloaded_weights` says what does matter instead. A filter on
    that one record: raising the logger's level instead makes transformers log a tensor-parallel check it otherwise
    skips."""
    loading_logger = transformers.utils.logging.get_logger("transformers.modeling_utils")
    loading_logger.addFilter(_drop_load_report)
    try:
        yield
    finally:
        loading_logger.removeFilter(_drop_load_report)


def _drop_load_report(record: logging.LogRecord) -> bool:
    """Keep a report of weights of another shape or that could not be converted: transformers raises after it, "For
    details look at the above report"."""
    message = str(record.msg)
    return "LOAD REPORT" not in message or "MISMATCH" in message or "CONVERSION" in message


def restore_sinusoidal_positions(model: VisionEncoderDecoderModel) -> None:
    """Give a TrOCR decoder with sinusoidal positions (microsoft/trocr-large-printed, trocr-base-stage1) its position
    table again: transformers 5 builds a model on the meta device before it loads the weights, and that table is
    neither a weight nor a buffer, so it stays on the meta device, and every forward pass (``generate``, training)
    fails with "Cannot copy out of meta tensor". The fast engine computes its own table. It is made a buffer, not
    saved, in the model's dtype, so that ``model.to()`` takes it to the model's device and dtype as it does the
    weights (a plain attribute had stayed on the CPU in fp32)."""
    for module in model.modules():
        weights = getattr(module, "weights", None)
        if isinstance(module, TrOCRSinusoidalPositionalEmbedding) and weights is not None and weights.is_meta:
            table = module.get_embedding(weights.shape[0], module.embedding_dim, module.padding_idx)
            del module.weights
            module.register_buffer("weights", table.to(model.dtype), persistent=False)


def _report_unloaded_weights(name_or_path: str, loading: dict[str, Any]) -> None:
    """Warn of weights the checkpoint did not give (left random: its readings would be noise) and of entries no
    weight took, less those every official checkpoint has (:data:`UNUSED_MISSING_WEIGHTS`,
    :data:`UNUSED_CHECKPOINT_ENTRIES`)."""
    missing = sorted(key for key in loading.get("missing_keys", ()) if not key.startswith(UNUSED_MISSING_WEIGHTS))
    unexpected = sorted(key for key in loading.get("unexpected_keys", ()) if key not in UNUSED_CHECKPOINT_ENTRIES)
    if missing:
        log.warning("model %s: %d weights are not in its checkpoint and were left random (its readings will be "
                    "wrong): %s", name_or_path, len(missing), _some(missing))
    if unexpected:
        log.warning("model %s: %d entries of its checkpoint belong to no weight of the model and were not used: %s",
                    name_or_path, len(unexpected), _some(unexpected))


def _some(keys: list[str], shown: int = 5) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def load_tokenizer(name_or_path: str, source: str) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, with the cause named where transformers names another: a SentencePiece vocabulary
    (``sentencepiece.bpe.model`` without ``tokenizer.json``, as microsoft/trocr-small-* ship) is read with the
    sentencepiece package, and without it transformers 5 says that ``tiktoken`` is required."""
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - any failure to read it is a model error, reported at start-up
        if needs_sentencepiece(source) and importlib.util.find_spec("sentencepiece") is None:
            raise ModelLoadError(f"cannot load the tokenizer of TrOCR model {name_or_path!r}: it is a SentencePiece "
                                 f"model (sentencepiece.bpe.model, no tokenizer.json), which needs the sentencepiece "
                                 f"package: pip install sentencepiece") from exc
        raise _load_error(name_or_path, source, exc) from exc


def needs_sentencepiece(source: str) -> bool:
    """Whether a checkpoint's tokenizer is a SentencePiece model alone (no ``tokenizer.json``), locally or in the
    Hugging Face cache."""
    if Path(source).is_dir():
        return (Path(source) / "sentencepiece.bpe.model").is_file() and not (Path(source) / "tokenizer.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    return (isinstance(try_to_load_from_cache(source, "sentencepiece.bpe.model"), str)
            and not isinstance(try_to_load_from_cache(source, "tokenizer.json"), str))


def check_vocabulary(name_or_path: str, vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer with more tokens than the decoder has outputs, which is another model's (labels beyond
    the decoder's vocabulary, texts the model cannot write); warn of one with far fewer, which cannot read some of
    what the decoder writes. Padding a vocabulary to a round size leaves the decoder a few more outputs: no
    warning."""
    tokens = len(tokenizer)
    if tokens > vocab_size:
        raise ModelLoadError(f"model {name_or_path}: its tokenizer has {tokens} tokens, its decoder writes {vocab_size}: "
                             f"the tokenizer is not this model's ({type(tokenizer).__name__})")
    if tokens < 0.99 * vocab_size:
        log.warning("model %s: its tokenizer has %d tokens, its decoder writes %d: the ids beyond the tokenizer read "
                    "as nothing; is it this model's tokenizer (%s)?", name_or_path, tokens, vocab_size,
                    type(tokenizer).__name__)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Without transformers' "Loading weights" bar, drawn while it places weights already read from a folder (a tenth
    of a second for the bundled models): in a log, or from ``eval`` and ``inspect`` piped to a file, it had been a
    line of carriage returns and block characters."""
    shown = transformers.utils.logging.is_progress_bar_enabled()
    hub_hidden = huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()  # the hub's bars too
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()  # and the hub's, set again below
        if hub_hidden:
            huggingface_hub.utils.disable_progress_bars()
        else:
            huggingface_hub.utils.enable_progress_bars()


def quantize_encoder(model: VisionEncoderDecoderModel) -> None:
    """Give the encoder's linear layers int8 weights and dynamically quantized int8 activations (CPU),
    in place.

    Why the encoder only: it does most of a CPU reading's arithmetic (every patch of every line, in
    every layer), and the bundled printed model reads real validation lines at about the same CER with
    it quantized (stage 9, 768 lines: 25.03% against 24.97%), while quantizing the decoder as well cost
    0.8 points (an earlier model).
    The decoder stays fp32, so the decoding engine runs as it does at fp32. Activations take one
    scale per batch, so at int8 a line's encoding depends slightly on the lines batched with it.
    ``quantize_dynamic`` (``torch.ao``) warns that it will move to torchao; it is the CPU int8 path
    this torch ships.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(model.encoder, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but no CUDA GPU is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device!r}; expected auto, cpu or cuda")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """What ``precision`` means on ``device``: the weights' dtype and the encoder's autocast dtype (see
    the two functions below). Every precision a device cannot run is refused here."""
    return resolve_dtype(precision, device), resolve_encoder_dtype(precision, device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), so a bf16 encoder is
    faster than fp32 here rather than emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_encoder_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on the CPU: the encoder runs under bf16 autocast, the decoder in fp32; None otherwise.

    Why the encoder only: on a CPU with bf16 matrix units the encoder's GEMMs (every patch of every
    line) run about twice as fast in bf16; the decoder's have too few rows to gain and stay fp32.
    Only the matrix products and attention run in bf16; the residual stream, and so the layer norms,
    stay fp32. It is opt-in because it reads real lines a little worse (bench/RESULTS.md), and its
    rounding varies a little with the batch's width (fp32 reads a line the same in any batch)."""
    if precision != "bf16" or device.type != "cpu":
        return None
    if not cpu_has_native_bf16():
        raise ModelLoadError("precision bf16 on the CPU needs native bf16 (AVX512-BF16 or AMX), which this CPU "
                             "lacks; use fp32 or int8")
    return torch.bfloat16


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The model's weights: fp16 only on CUDA; bf16 on GPUs that support it (not V100 and older), and fp32
    weights on the CPU (where bf16 is the encoder's autocast, :func:`resolve_encoder_dtype`)."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    if precision == "int8" and device.type != "cpu":
        raise ModelLoadError(f"precision int8 is for the CPU, got {device}; use fp16 on a GPU")
    if precision == "fp16" and device.type != "cuda":
        raise ModelLoadError(f"precision fp16 needs a CUDA device, got {device}")
    if precision == "bf16" and device.type != "cuda":
        return PRECISIONS["fp32"]
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):  # a V100 emulates it
        raise ModelLoadError(f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16")
    return PRECISIONS[precision]


def set_generation_ids(model: VisionEncoderDecoderModel, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Fill decoder start / pad / eos ids from the configs or the tokenizer, and turn the KV cache on."""
    generation = model.generation_config
    decoder = model.config.decoder
    # transformers 5 configs have no attribute for an id their file leaves out (the official microsoft/trocr-base-*
    # config.json gives decoder_start/pad/eos in its decoder part only): read each with a default
    def configured(name: str) -> Any:
        return _first_set(getattr(generation, name, None), getattr(model.config, name, None),
                          getattr(decoder, name, None))

    start = configured("decoder_start_token_id")
    pad = _first_set(configured("pad_token_id"), tokenizer.pad_token_id)
    eos = _first_set(configured("eos_token_id"), tokenizer.eos_token_id)
    if start is None or pad is None or eos is None:
        raise ModelLoadError(f"{source}: cannot determine decoder_start/pad/eos token ids from config or tokenizer")
    generation.decoder_start_token_id = model.config.decoder_start_token_id = start
    generation.pad_token_id = model.config.pad_token_id = pad
    generation.eos_token_id = eos
    generation.use_cache = True
    # the decode limit is max_new_tokens (recognize.max_new_tokens, else the decoder's positions); the official
    # checkpoints' configs carry transformers 4's max_length 20 from their decoder part, and generate() warned in
    # every batch that both were set
    generation.max_length = None


def _first_set(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def check_tokenizer(name_or_path: str) -> None:
    """The checkpoint's tokenizer loaded and held against its decoder's vocabulary (:func:`check_vocabulary`),
    without the weights: the job driver checks it at start-up, so a tokenizer that cannot be read (a SentencePiece
    vocabulary without the sentencepiece package) or is another model's fails the job before Ray starts, not in
    each recognizer actor once pages are cut."""
    source = resolve_checkpoint(name_or_path)
    tokenizer = load_tokenizer(name_or_path, source)
    check_vocabulary(name_or_path, checkpoint_config(name_or_path, source).decoder.vocab_size, tokenizer)


def load_line_preprocessor(name_or_path: str) -> LinePreprocessor:
    """The checkpoint's preprocessing alone: the job driver checks the model with it at start-up
    (fail fast, before any document is read) and hands it to the CPU crop stage."""
    source = resolve_checkpoint(name_or_path)
    try:
        image_processor = AutoImageProcessor.from_pretrained(source, backend="pil")
    except Exception as exc:
        raise ModelLoadError(f"cannot load the image processor of TrOCR model {name_or_path!r}: {exc}") from exc
    return LinePreprocessor.from_image_processor(image_processor)
