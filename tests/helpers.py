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


def as_official_layout(folder: Path, sinusoidal: bool = False) -> Path:
    """Rewrite a tiny checkpoint (:func:`build_tiny_random_trocr`) in place into the layout of the official
    microsoft/trocr-* checkpoints, as their 2022 hub commits have them: ``pytorch_model.bin`` alone under
    transformers 4's parameter names (``encoder.encoder.layer.0.attention.attention.query.weight``), without the
    encoder pooler they were converted without; no ``generation_config.json``; ``use_cache: false``; the generation
    ids in the decoder's config only (trocr-base-*: none at the top level). ``sinusoidal``: a decoder with sinusoidal
    positions (trocr-large-printed, trocr-base-stage1), whose checkpoint holds transformers 4's ``_float_tensor``
    buffer."""
    import json

    import torch
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        config.pop(name, None)
    config["decoder"]["use_cache"] = False
    # transformers 4 wrote every generation setting into each part's config: the official ones hold these
    config["decoder"].update(max_length=20, min_length=0, num_beams=1, do_sample=False, early_stopping=False,
                             length_penalty=1.0, no_repeat_ngram_size=0, repetition_penalty=1.0, temperature=1.0,
                             top_k=50, top_p=1.0, bad_words_ids=None, forced_bos_token_id=None)
    config["decoder"]["decoder_start_token_id"] = config["decoder"]["eos_token_id"]  # as the official configs give
    state = {}
    for key, value in load_file(folder / "model.safetensors").items():
        if key.startswith("encoder.pooler."):
            continue
        if key.startswith("encoder.layers."):
            index, tail = key[len("encoder.layers."):].split(".", 1)
            for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                             ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                             ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
                tail = tail.replace(new, old)
            key = f"encoder.encoder.layer.{index}.{tail}"
        state[key] = value
    if sinusoidal:
        config["decoder"].update(use_learned_position_embeddings=False, layernorm_embedding=False, scale_embedding=True)
        del state["decoder.model.decoder.embed_positions.weight"]
        for key in [key for key in state if key.startswith("decoder.model.decoder.layernorm_embedding.")]:
            del state[key]
        state["decoder.model.decoder.embed_positions._float_tensor"] = torch.zeros(1)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    (folder / "generation_config.json").unlink(missing_ok=True)
    return folder
