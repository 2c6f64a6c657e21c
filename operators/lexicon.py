"""Word frequencies in beam search: the dictionary Tesseract reads with, for TrOCR.

A TrOCR decoder knows only the words of its training lines. On faded typescript it reads "bo" for
"be" and "funoral" for "funeral": the image leaves both letters open and the decoder picks the wrong
one. With a few beams the right reading is usually among the candidates, so every token that can end
a word (one that starts with a space or with punctuation, and the end of the line) has the score of
the word it ends added: nothing for a common word of the page's languages (`wordfreq`_, which also
splits elisions and compounds: ``l'opinion``, ``well-known``), a penalty that grows as the word gets
rarer, and the largest for a word no language has. This is shallow fusion with a unigram word model.
It is never a bonus, so a beam gains nothing by adding words (though two unknown words read as one pay
once); and it only ranks the beams.

The constants were chosen on the printed validation lines (``../shared/data/train/val``, 542 lines,
4 beams, each line with its own languages): 5.77% CER without, 5.17% with (typescripts: 6.1% -> 5.0%
German, 2.7% -> 2.2% English), for about 10% more reading time. Weight 0.7 read them at 5.65%: a
heavier weight turns rare words into common ones.

.. _wordfreq: https://github.com/rspeer/wordfreq
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence

import torch
import wordfreq
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from operators.settings import check_languages

#: Zipf frequency (log10 of uses per billion words) from which a word costs nothing
#: (``the``: 7.7, ``be``: 6.8, ``funeral``: 4.4, ``bo``: 4.0).
COMMON_ZIPF = 5.0
#: The Zipf frequency a word that none of the languages has is scored as.
UNKNOWN_WORD_ZIPF = -1.0
#: Nats per Zipf unit: ``bo`` costs 0.5 nats more than ``be``, an unknown word 3 nats.
DEFAULT_WEIGHT = 0.5
#: Word scores a recognizer keeps: every beam's words and partial words, over all its pages.
WORDS_CACHED = 1 << 16
#: Signs inside a word (``couldn't``, ``well-known``, ``2nd``) besides letters, digits and marks.
APOSTROPHES = "'\u2019"
HYPHENS = "-\u00ad\u2010\u2e17\u00ac"
#: A byte-level BPE piece of a multi-byte character decodes to this on its own.
PARTIAL_CHARACTER = "\ufffd"


def inside_word(char: str) -> bool:
    """Whether a token that starts with this character continues the word before it."""
    return (char.isalnum() or char == PARTIAL_CHARACTER or char in APOSTROPHES or char in HYPHENS
            or unicodedata.category(char).startswith("M"))


def lookup_form(text: str) -> str:
    """A decoded word as wordfreq looks it up: old umlauts (a small e above) as umlauts, composed (NFKC),
    ’ as ', and without the signs around it (quotes, a leading dash, trailing punctuation)."""
    text = unicodedata.normalize("NFKC", text.replace("\u0364", "\u0308")).replace("\u2019", "'")
    return text.strip("".join(char for char in set(text) if not char.isalnum()))


class WordFrequencyBias(LogitsProcessor):
    """The word-end scores as a transformers logits processor, so :class:`operators.decoding.DecodingEngine`
    and ``generate`` apply the same one to the log-probabilities of a beam step."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, languages: Sequence[str], vocab_size: int,
                 weight: float = DEFAULT_WEIGHT):
        if not languages:
            raise ValueError("a word-frequency bias needs at least one language")
        check_languages(tuple(languages))
        self.tokenizer = tokenizer
        self.languages = tuple(languages)
        self.weight = weight
        texts = token_texts(tokenizer, vocab_size)
        self.ends_word = [not text or not inside_word(text[0]) for text in texts]
        self.starts_word = [ends and any(map(inside_word, text)) for ends, text in zip(self.ends_word, texts)]
        if not any(text[:1].isspace() for text in texts):
            raise ValueError(f"{type(tokenizer).__name__}: no token starts with a space, so words cannot be told apart")
        self.end_mask = torch.tensor(self.ends_word, dtype=torch.float32)
        self.word_score = functools.lru_cache(maxsize=WORDS_CACHED)(self._word_score)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids``: (rows, length) tokens so far (start token included); ``scores``: (rows, vocab)
        log-probabilities of the next token. Returns a new tensor: ``scores`` is left as it is."""
        if self.end_mask.device != scores.device or self.end_mask.dtype != scores.dtype:
            self.end_mask = self.end_mask.to(device=scores.device, dtype=scores.dtype)
        word_scores = torch.tensor([self.word_score(self._last_word(row)) for row in input_ids.tolist()],
                                   dtype=scores.dtype, device=scores.device)
        return scores + word_scores[:, None] * self.end_mask[None, :scores.shape[1]]

    def _last_word(self, tokens: list[int]) -> tuple[int, ...]:
        """The tokens of the word a row is in the middle of: from the last word-ending token on (that
        token included when it starts the word, as " the" does)."""
        start = len(tokens)
        while start > 0 and not self.ends_word[tokens[start - 1]]:
            start -= 1
        if start > 0 and self.starts_word[tokens[start - 1]]:
            start -= 1
        return tuple(tokens[start:])

    def _word_score(self, word_tokens: tuple[int, ...]) -> float:
        """The score (nats, at most 0) for ending the word these tokens spell (``word_score`` is this,
        cached); 0 for no letters, and for a word broken by a hyphen at the end of a line."""
        text = self.tokenizer.decode(list(word_tokens), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False).strip()
        word = lookup_form(text)
        if text.endswith(tuple(HYPHENS)) or not any(char.isalpha() for char in word):
            return 0.0
        zipf = max(wordfreq.zipf_frequency(word, language) for language in self.languages)
        return self.weight * (min(zipf if zipf > 0 else UNKNOWN_WORD_ZIPF, COMMON_ZIPF) - COMMON_ZIPF)


def token_texts(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[str]:
    """Each token's text as it reads after a letter, so that a leading space shows: byte-level BPE
    (``Ġthe``) and sentencepiece (``▁the``, which decodes to ``the`` on its own) alike; special tokens
    read as empty."""
    anchor = tokenizer("a", add_special_tokens=False).input_ids[:1]
    prefix = tokenizer.decode(anchor)
    texts = tokenizer.batch_decode([[*anchor, token] for token in range(vocab_size)], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)
    return [text[len(prefix):] if text.startswith(prefix) else text for text in texts]
