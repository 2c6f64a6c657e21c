"""Recognition speed: the fast decoding engine against transformers ``generate`` (issues 4 and 16).

On the same line crops, in one process, decodes with (1) the naive loop of the HuggingFace TrOCR docs,
one line per ``generate`` call, (2) batched ``generate`` with the cache on, as
a ``LineRecognizer`` with ``engine="hf"`` runs it: the inputs a transformers user gives it, every line padded
to the model's full input width, and (3) this project's engine, ``LineRecognizer(engine="fast")``, with the
same batches, as the pipeline reads lines: a keep-aspect model's batch cut at its widest line, each
line attending to its own ink only (``operators.decoding.encode_lines``). Crops are resized once up
front (the pipeline does that in a separate stage). Identity: the engine given the same full-width
inputs as ``generate`` must return the same texts as both HF runs. It also times the encoder alone at
full width over the same batches: the work ``generate`` does before its first token.

Lines: synthetic (real text rendered by ``pipeline.synth.lines.iter_lines``), or with ``--real``
labelled real lines (folders of ``<name>.jpg|png`` + ``<name>.gt.txt``, or a folder of such folders,
e.g. ``../shared/data/train/val``), spread evenly over them; then ``cer_engine`` and ``cer_hf`` are
the character error rates (jiwer) of (3) and (2) against the transcriptions.

    .venv/bin/python bench/recognize.py --threads 1
    .venv/bin/python bench/recognize.py --threads 1 --real ../shared/data/train/val --lines 256
    .venv/bin/python bench/recognize.py --model random-small --lines 8 --max-new-tokens 32
    python bench/recognize.py --model random-base --device cuda --precision fp16 --max-new-tokens 24 \
        --lines 512 --batch-size 128 --no-naive

``random-base`` / ``random-small`` are random-weight models with the architecture of
microsoft/trocr-base-* / trocr-small-* (their tokenizer is padded with unused tokens to the exact
vocabulary size, and its end token is an unused id so that every line decodes exactly
``--max-new-tokens`` tokens). A random model's tokens are mostly unused ids, so the identity check is
weaker there than on a trained model (tests/test_decoding.py compares token ids).

On a shared CPU pass ``--threads 1``: with more torch threads than free cores every small op waits
for a descheduled thread, which distorts all three timings (``generate`` the most).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jiwer
import numpy as np
import torch
from PIL import Image
from transformers import (
    DeiTConfig,
    LogitsProcessorList,
    TrOCRConfig,
    TrOCRProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessorPil,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from operators.decoding import encoder_autocast, generate_encoder_outputs  # noqa: E402
from operators.recognize import LineReading, LineRecognizer, line_batches, resolve_max_new_tokens  # noqa: E402
from operators.records import LinePiece  # noqa: E402
from operators.settings import DEFAULT_MODEL, RecognizeConfig  # noqa: E402
from operators.utf8 import Utf8Guard  # noqa: E402
from operators.model import (  # noqa: E402
    TrOCRBundle,
    load_trocr,
    resolve_device,
    resolve_precision,
)
from operators.preprocess import LinePreprocessor  # noqa: E402
from pipeline.evaluate import read_eval_lines  # noqa: E402
from pipeline.synth.corpus import CorpusSampler  # noqa: E402
from pipeline.synth.lines import iter_lines  # noqa: E402
from pipeline.train.config import TokenizerKind  # noqa: E402
from pipeline.train.tokenizer import train_tokenizer  # noqa: E402

#: (encoder config, decoder config, tokenizer kind) of the official checkpoints, weights left random.
RANDOM_ARCHITECTURES = {
    "random-base": (  # microsoft/trocr-base-printed / -handwritten
        ViTConfig(image_size=384, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072),
        dict(vocab_size=50265, d_model=1024, decoder_layers=12, decoder_attention_heads=16, decoder_ffn_dim=4096,
             activation_function="gelu", cross_attention_hidden_size=768, scale_embedding=False),
        "roberta",
    ),
    "random-small": (  # microsoft/trocr-small-printed / -handwritten
        DeiTConfig(image_size=384, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                   intermediate_size=1536),
        dict(vocab_size=64044, d_model=256, decoder_layers=6, decoder_attention_heads=8, decoder_ffn_dim=1024,
             activation_function="relu", cross_attention_hidden_size=384, scale_embedding=True),
        "xlm-roberta",
    ),
}
TOKENIZER_CORPUS_LINES = 2000


def random_bundle(name: str, device: torch.device, precision: str) -> TrOCRBundle:
    """A random-weight model with an official TrOCR architecture, and a tokenizer of its vocabulary size."""
    encoder_config, decoder_settings, tokenizer_kind = RANDOM_ARCHITECTURES[name]
    dtype, encoder_dtype = resolve_precision(precision, device)
    tokenizer = padded_tokenizer(tokenizer_kind, decoder_settings["vocab_size"])
    decoder_config = TrOCRConfig(
        **decoder_settings, max_position_embeddings=512, layernorm_embedding=True,
        use_learned_position_embeddings=True, dropout=0.0, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder_config, decoder_config)
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config=config)
    generation = model.generation_config
    generation.decoder_start_token_id = tokenizer.eos_token_id
    # Random weights often emit </s> first, which would time empty lines. An unused id as the end token
    # makes every line run to max_new_tokens, the length the benchmark asks for.
    generation.pad_token_id, generation.eos_token_id = tokenizer.pad_token_id, len(tokenizer) - 1
    model.to(device=device, dtype=dtype).eval()
    size = {"height": encoder_config.image_size, "width": encoder_config.image_size}
    image_processor = ViTImageProcessorPil(size=size, resample=Image.Resampling.BILINEAR,
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = TrOCRProcessor(image_processor=image_processor, tokenizer=tokenizer)
    preprocessor = LinePreprocessor.from_image_processor(image_processor)
    return TrOCRBundle(model, processor, tokenizer, preprocessor, device, dtype, encoder_dtype=encoder_dtype)


def padded_tokenizer(kind: TokenizerKind, vocab_size: int):
    """A tokenizer learnt on the synthetic corpus, padded with unused tokens so every model id decodes."""
    corpus = CorpusSampler(0)
    tokenizer = train_tokenizer([corpus.line() for _ in range(TOKENIZER_CORPUS_LINES)], kind, vocab_size=512)
    tokenizer.add_tokens([f"<unused{index}>" for index in range(vocab_size - len(tokenizer))])
    return tokenizer


def synthetic_lines(count: int, seed: int) -> list[tuple[np.ndarray, str]]:
    return [(np.asarray(image), text) for image, text, _font in iter_lines(count, seed)]


def real_lines(folder: Path, count: int) -> list[tuple[np.ndarray, str]]:
    """``count`` labelled lines spread evenly over the folder (or its sub-folders), read as ``eval --lines``
    reads them (rows fitted to the ink, as the pipeline fits a detected line)."""
    folders = sorted(path for path in folder.iterdir() if path.is_dir()) or [folder]
    labelled = read_eval_lines(folders)
    chosen = [labelled[round(index * len(labelled) / count)] for index in range(min(count, len(labelled)))]
    return [(line.load_gray(), line.text) for line in chosen]


def line_crops(bundle: TrOCRBundle, lines: list[tuple[np.ndarray, str]]) -> tuple[list[np.ndarray], list[float]]:
    """Model-size crops of the lines, and their width/height (the pipeline's length hint)."""
    return ([bundle.preprocessor.resize(pixels) for pixels, _ in lines],
            [pixels.shape[1] / pixels.shape[0] for pixels, _ in lines])


def naive_loop(bundle: TrOCRBundle, resized: list[np.ndarray], num_beams: int, max_new_tokens: int) -> list[str]:
    """The HuggingFace TrOCR docs' recipe: one ``generate`` and one ``batch_decode`` per line; with the
    whole-character rule both other readers decode under (``operators.utf8``), so that the texts compare."""
    texts = []
    guard = Utf8Guard.for_tokenizer(bundle.tokenizer, bundle.model.config.decoder.vocab_size,
                                    bundle.model.generation_config.eos_token_id)
    with torch.inference_mode():
        for pixels in resized:
            pixel_values = bundle.preprocessor.to_pixel_values([pixels], bundle.device, bundle.dtype)
            generated_ids = bundle.model.generate(
                pixel_values, num_beams=num_beams, max_new_tokens=max_new_tokens,
                logits_processor=LogitsProcessorList([guard] if guard is not None else []),
                **generate_encoder_outputs(bundle.model, pixel_values, bundle.encoder_dtype))  # CPU bf16
            texts.append(bundle.tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0].strip())
    return texts


def encoder_floor(bundle: TrOCRBundle, resized: list[np.ndarray], hints: list[float], batch_size: int) -> list:
    """The encoder alone over the batches a ``LineRecognizer`` forms: work that ``generate`` and the engine
    both do, identically, before decoding a token. Its time bounds any decoder's speedup."""
    outputs = []
    with torch.inference_mode():
        for chunk in line_batches(len(resized), batch_size, hints):
            batch = [resized[index] for index in chunk]
            pixel_values = bundle.preprocessor.to_pixel_values(batch, bundle.device, bundle.dtype)
            with encoder_autocast(bundle.encoder_dtype, bundle.device):
                outputs.append(bundle.model.encoder(pixel_values=pixel_values).last_hidden_state)
    return outputs


def timed(run: Callable[[], list], device: torch.device) -> tuple[list, float]:
    """run()'s result and wall seconds, queued GPU work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def texts_of(readings: list[LineReading]) -> list[str]:
    return [reading.text for reading in readings]


def main(argv: list[str] | None = None) -> int:
    defaults = RecognizeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL.exists() else "random-small",
                        help=f"checkpoint folder or one of {sorted(RANDOM_ARCHITECTURES)} "
                             f"(default: {DEFAULT_MODEL.name} when present, else random-small)")
    parser.add_argument("--lines", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=defaults.line_batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default: the model's generation config, else the pipeline default")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"],
                        help="int8: int8 encoder linear layers (CPU), for all three readers")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic lines")
    parser.add_argument("--real", type=Path, help="labelled real lines instead of synthetic ones (see above)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-naive", action="store_true",
                        help="skip the one-line-per-generate loop (minutes for many lines of a large model)")
    args = parser.parse_args(argv)
    if args.lines < 1 or args.batch_size < 1:
        parser.error("--lines and --batch-size must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.model in RANDOM_ARCHITECTURES:
        device = resolve_device(args.device)
        bundle = random_bundle(args.model, device, args.precision)
    else:
        bundle = load_trocr(args.model, device=args.device, precision=args.precision)
    lines = real_lines(args.real, args.lines) if args.real else synthetic_lines(args.lines, args.seed)
    args.lines = len(lines)
    resized, hints = line_crops(bundle, lines)
    if args.max_new_tokens is None:
        args.max_new_tokens = bundle.model.generation_config.max_new_tokens or resolve_max_new_tokens(
            defaults.max_new_tokens, bundle.model)
    print(f"model {args.model} | {args.lines} lines | batch {args.batch_size} | max_new_tokens {args.max_new_tokens} "
          f"| beams {args.num_beams} | {bundle.device} {args.precision} | torch threads {torch.get_num_threads()}")

    full_width = dataclasses.replace(bundle, width_step=None)  # the engine given generate()'s inputs
    hf_reader, fast_reader, same_inputs_reader = (
        LineRecognizer(model, engine, args.num_beams, args.max_new_tokens, args.batch_size)
        for model, engine in ((bundle, "hf"), (bundle, "fast"), (full_width, "fast")))
    pieces = [[LinePiece(pixels, hint)] for pixels, hint in zip(resized, hints)]

    # First calls pay for allocator and kernel set-up; on a GPU that is paid again for every new batch shape
    # (3-5x the warm time of a pass, measured on an H200), so there a whole untimed pass comes first.
    warm_up = pieces if bundle.device.type == "cuda" else pieces[:2]
    hf_reader(warm_up)
    fast_reader(warm_up)
    hf, hf_s = timed(lambda: hf_reader(pieces), bundle.device)
    fast, fast_s = timed(lambda: fast_reader(pieces), bundle.device)
    _, floor_s = timed(lambda: encoder_floor(bundle, resized, hints, args.batch_size), bundle.device)
    same_inputs = same_inputs_reader(pieces)
    timings = [("HF batched generate", hf_s), ("fast engine", fast_s), ("encoder alone, full width", floor_s)]
    if not args.no_naive:
        naive, naive_s = timed(lambda: naive_loop(bundle, resized, args.num_beams, args.max_new_tokens), bundle.device)
        timings.insert(0, ("naive loop (HF docs, 1 line/generate)", naive_s))

    for name, seconds in timings:
        print(f"{name:40s} {args.lines / seconds:8.2f} lines/s  ({seconds:.2f} s)")
    same_as_hf = sum(a == b for a, b in zip(texts_of(same_inputs), texts_of(hf)))
    same_as_naive = args.lines if args.no_naive else sum(a == b for a, b in zip(texts_of(same_inputs), naive))
    truncated = sum(reading.truncated for reading in fast)
    print(f"identical texts on identical inputs: fast vs HF batched {same_as_hf}/{args.lines}"
          + ("" if args.no_naive else f", fast vs naive {same_as_naive}/{args.lines}")
          + f" | {truncated} lines hit max_new_tokens")
    for reading in fast[:3]:
        print(f"  e.g. {reading.text[:70]!r} (confidence {reading.confidence:.3f})")
    print(f"ceiling of any decoder with the full-width encoder: {hf_s / floor_s:.2f}x HF batched"
          + ("" if args.no_naive else f", {naive_s / floor_s:.2f}x naive"))
    if args.real:
        references = [text for _, text in lines]
        print(f"cer_engine={jiwer.cer(references, texts_of(fast)):.4f} cer_hf={jiwer.cer(references, texts_of(hf)):.4f}")
    identical = same_as_hf == same_as_naive == args.lines
    naive_ratio = "" if args.no_naive else f" speedup_vs_naive={naive_s / fast_s:.2f}"
    print(f"speedup_vs_hf_batched={hf_s / fast_s:.2f}{naive_ratio} identical={str(identical).lower()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
