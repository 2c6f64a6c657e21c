"""Whole characters from a byte-level decoder: no U+FFFD in the text (but for a line cut off by
``max_new_tokens``, which may end inside one).

A byte-level BPE vocabulary (RoBERTa's, the microsoft/trocr-base checkpoints', ours) holds single
bytes, so a decoder can choose the first byte of a two-byte character and then a letter. The tokenizer
then writes U+FFFD for the broken character ("Gu\ufffddratello" for "Guàrdatelo", an Italian dev page),
and the archive's full text and search index keep it. :class:`Utf8Guard` takes from each step's choice
the tokens that would make the bytes so far invalid UTF-8, and the end of the line inside a character,
so the model's best reading in whole characters is taken instead. The engine keeps each row's UTF-8
state as it decodes (:meth:`Utf8Guard.advance`); as a transformers logits processor, for ``generate``,
the guard reads the state from the tokens so far.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers.decoders import ByteLevel
from transformers import LogitsProcessor, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

#: States of the UTF-8 automaton (Unicode, table 3-7, "well-formed UTF-8 byte sequences"): between
#: characters; 1, 2 or 3 continuation bytes still due; the four lead bytes whose next byte has a
#: narrower range (no overlong forms, no surrogates, nothing past U+10FFFF); and broken, which no
#: byte leaves.
ACCEPT, NEED_1, NEED_2, NEED_3, AFTER_E0, AFTER_ED, AFTER_F0, AFTER_F4, BROKEN = range(9)
STATES = 9


def _byte_transitions() -> np.ndarray:
    """(STATES, 256): the state after one byte."""
    table = np.full((STATES, 256), BROKEN, dtype=np.int64)
    table[ACCEPT, 0x00:0x80] = ACCEPT
    table[ACCEPT, 0xC2:0xE0] = NEED_1
    table[ACCEPT, 0xE0] = AFTER_E0
    table[ACCEPT, 0xE1:0xED] = NEED_2
    table[ACCEPT, 0xED] = AFTER_ED
    table[ACCEPT, 0xEE:0xF0] = NEED_2
    table[ACCEPT, 0xF0] = AFTER_F0
    table[ACCEPT, 0xF1:0xF4] = NEED_3
    table[ACCEPT, 0xF4] = AFTER_F4
    table[NEED_1, 0x80:0xC0] = ACCEPT
    table[NEED_2, 0x80:0xC0] = NEED_1
    table[NEED_3, 0x80:0xC0] = NEED_2
    table[AFTER_E0, 0xA0:0xC0] = NEED_1
    table[AFTER_ED, 0x80:0xA0] = NEED_1
    table[AFTER_F0, 0x90:0xC0] = NEED_2
    table[AFTER_F4, 0x80:0x90] = NEED_2
    return table


BYTE_TRANSITIONS = _byte_transitions()


def token_transitions(token_bytes: Sequence[bytes]) -> np.ndarray:
    """(STATES, vocab): the state after each token's bytes, from each state (a token without bytes, such
    as a special token, leaves the state as it is)."""
    longest = max((len(data) for data in token_bytes), default=0)
    padded = np.full((len(token_bytes), longest), -1, dtype=np.int64)
    for token, data in enumerate(token_bytes):
        padded[token, :len(data)] = np.frombuffer(data, dtype=np.uint8)
    states = np.repeat(np.arange(STATES, dtype=np.int64)[:, None], len(token_bytes), axis=1)
    for column in padded.T:
        has_byte = column >= 0
        states[:, has_byte] = BYTE_TRANSITIONS[states[:, has_byte], column[has_byte]]
    return states


def byte_level_token_bytes(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[bytes] | None:
    """Each token id's bytes for a byte-level BPE tokenizer (special tokens and ids the tokenizer lacks: none),
    as its ByteLevel decoder writes them: a piece whose characters are all byte symbols is those bytes, any
    other (an added token such as "Straße") its text in UTF-8. None for other tokenizers (sentencepiece pieces
    are whole characters)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, ByteLevel):
        return None
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    added = tokenizer.added_tokens_decoder
    token_bytes = []
    for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab_size)))):
        if piece is None or (token_id in added and added[token_id].special):
            token_bytes.append(b"")
        elif all(char in byte_of for char in piece):
            token_bytes.append(bytes(byte_of[char] for char in piece))
        else:
            token_bytes.append(piece.encode("utf-8"))
    return token_bytes


class Utf8Guard(LogitsProcessor):
    """Masks (to -inf) the tokens that would break UTF-8 after each row's bytes so far; inside a character
    also the tokens without bytes (the end of the line, special tokens), so a character once begun is
    finished. Only the choice changes: a token that stays allowed keeps its score."""

    def __init__(self, token_bytes: Sequence[bytes], eos_ids: int | Sequence[int] | None):
        """``token_bytes``: each token id's bytes (:func:`byte_level_token_bytes`); ``eos_ids``: the
        generation config's end-of-sequence id or ids."""
        eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        transitions = token_transitions(token_bytes)
        allowed = transitions != BROKEN
        # inside a character: no token without bytes, and no end of the line (whatever bytes its token has)
        ends = {token for token in eos_ids if 0 <= token < len(token_bytes)}
        allowed[ACCEPT + 1:, [token for token, data in enumerate(token_bytes) if not data or token in ends]] = False
        if not allowed[:BROKEN].any(axis=1).all():
            raise ValueError("a byte-level vocabulary without a token for every UTF-8 continuation")
        self.next_state = torch.from_numpy(transitions)
        self.penalties = torch.from_numpy(np.where(allowed, 0.0, -np.inf).astype(np.float32))

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
                      eos_ids: int | Sequence[int] | None) -> "Utf8Guard | None":
        """The guard for a byte-level BPE tokenizer; None where no token holds part of a character."""
        token_bytes = byte_level_token_bytes(tokenizer, vocab_size)
        return None if token_bytes is None else cls(token_bytes, eos_ids)

    def start(self, rows: int, device: torch.device) -> torch.Tensor:
        """(rows,) states before the first token."""
        return torch.full((rows,), ACCEPT, dtype=torch.long, device=device)

    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The states after each row's chosen token."""
        if self.next_state.device != states.device:
            self.next_state = self.next_state.to(states.device)
        return self.next_state[states, tokens]

    def mask(self, states: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` (rows, vocab) with what the rows' states forbid at -inf; a new tensor."""
        if self.penalties.device != scores.device or self.penalties.dtype != scores.dtype:
            self.penalties = self.penalties.to(device=scores.device, dtype=scores.dtype)
        return scores + self.penalties[states, :scores.shape[1]]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``generate``'s form: the states read from ``input_ids`` (rows, length), start token included."""
        states = self.start(len(input_ids), input_ids.device)
        for column in input_ids.T:
            states = self.advance(states, column)
        return self.mask(states, scores)
