"""Test helpers that the package itself never needs: a tiny random TrOCR, built offline in seconds.

Tests import it as ``helpers`` (pytest puts ``tests/`` on the path); the benchmarks, run from the
repository root, as ``tests.helpers``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.train.config import EncoderKind, TokenizerKind
from pipeline.train.model import build_trocr, save_trocr
from pipeline.train.tokenizer import train_tokenizer


def build_tiny_random_trocr(out_dir: Path, tokenizer_kind: TokenizerKind = "roberta", encoder: EncoderKind = "vit", seed: int = 0,
                            keep_aspect: bool = False) -> Path:
    """Save a tiny untrained TrOCR (32x128 input, stretched like the official processors unless
    ``keep_aspect``) for tests; no download."""
    tokenizer = train_tokenizer(TINY_CORPUS, tokenizer_kind, vocab_size=300)
    model, processor = build_trocr(
        tokenizer,
        input_size=(32, 128),
        patch_size=(16, 16),
        encoder=encoder,
        hidden_size=32,
        encoder_layers=1,
        encoder_heads=2,
        decoder_layers=1,
        decoder_heads=2,
        max_target_tokens=32,
        keep_aspect=keep_aspect,
        seed=seed,
    )
    return save_trocr(model, processor, Path(out_dir))


TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "Sphinx of black quartz, judge my vow: 0123456789",
    "How vexingly quick daft zebras jump (again) - 42% & $7.50",
]
