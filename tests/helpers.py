"""Test helpers that the package itself never needs: a tiny random TrOCR, built offline in seconds.

Tests import it as ``helpers`` (pytest puts ``tests/`` on the path); the benchmarks, run from the
repository root, as ``tests.helpers``.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
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


def run_on_a_terminal(command: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as its standard streams, as a user at a console runs it; returns its
    exit status and everything it drew there."""
    terminal, command_side = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a console's size, not 0 x 0
    process = subprocess.Popen(command, stdin=command_side, stdout=command_side, stderr=command_side, env=env)
    os.close(command_side)
    shown, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([terminal], [], [], 1)[0]:
            continue
        try:
            shown += os.read(terminal, 65536)
        except OSError:  # EIO: every process that had the terminal has closed it
            break
    os.close(terminal)
    return process.wait(timeout=60), shown.decode(errors="replace")


TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "Sphinx of black quartz, judge my vow: 0123456789",
    "How vexingly quick daft zebras jump (again) - 42% & $7.50",
]
