"""Train small TrOCR decoder tokenizers from text, offline, in the two kinds TrOCR checkpoints use.

``roberta``: byte-level BPE (microsoft/trocr-*-printed/handwritten); every string round-trips, no unknowns.
``xlm-roberta``: Unigram over metaspace pieces (the multilingual TrOCR variants).
Both come back as the real transformers classes, so ``save_pretrained`` / ``AutoTokenizer`` work unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, RobertaTokenizer, XLMRobertaTokenizer

from pipeline.synth.corpus import CHARSET
from pipeline.train.config import TokenizerKind

#: Special tokens in the id order of the official vocabularies (XLMRobertaTokenizer hard-codes unk_id=3).
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(texts: Iterable[str], kind: TokenizerKind, vocab_size: int) -> PreTrainedTokenizerBase:
    """Learn a vocabulary of about ``vocab_size`` entries from ``texts`` and wrap it in the transformers class."""
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError("cannot train a tokenizer: no non-empty text given")
    if kind == "roberta":
        return _train_byte_level_bpe(texts, vocab_size)
    if kind == "xlm-roberta":
        return _train_unigram(texts, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'roberta' or 'xlm-roberta'")


def _train_byte_level_bpe(texts: list[str], vocab_size: int) -> RobertaTokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    model_state = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in model_state["merges"]]
    return RobertaTokenizer(vocab=model_state["vocab"], merges=merges, clean_up_tokenization_spaces=False)


def _train_unigram(texts: list[str], vocab_size: int) -> XLMRobertaTokenizer:
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(  # every CHARSET character a piece, though the texts lack some
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>", show_progress=False,
        initial_alphabet=sorted(set(CHARSET) - {" "}),
    )
    unigram.train_from_iterator(texts, trainer=trainer)
    pieces = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    return XLMRobertaTokenizer(vocab=pieces, clean_up_tokenization_spaces=False)
