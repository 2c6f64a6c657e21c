"""Realistic line text for synthetic training data and documents: English by default, or a mix of
the Latin-script languages archives hold (French, German, Italian, Spanish, Latin), each line in
one of them with its own words, names, addresses and quotation marks (dates, form labels and
page references stay English in every language).

:data:`CHARSET` is the single definition of the characters synthetic text may contain: every
generated string is checked against it, fonts are judged by it, and a from-scratch Unigram
tokenizer keeps a piece for each of its characters.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Literal

from faker import Faker
from faker.providers.lorem import la as latin_lorem

#: Printable ASCII, a few common Latin-1 letters, pound and euro, typographic quotes and dashes:
#: all that English text (the default, and every synthetic document) may contain.
ENGLISH_CHARSET = "".join(chr(c) for c in range(0x20, 0x7F)) + "éèàüöäçñ£€“”‘’–—"
#: English and the letters and marks of the other languages in :data:`LANGUAGES`, capitals included.
CHARSET = ENGLISH_CHARSET + "áâêëíîïóôúùûìòœæÿÁÂÊËÍÎÏÓÔÚÙÛÌÒŒÆŸÄÖÜÉÈÀÇÑß«»„§°¿¡"

Language = Literal["en", "fr", "de", "it", "es", "la"]
#: Faker locale of each language. Latin is Faker's lorem ipsum word list beside English names and
#: places, as in Latin prints of any country.
LANGUAGES: dict[Language, str] = {"en": "en_US", "fr": "fr_FR", "de": "de_DE", "it": "it_IT", "es": "es_ES",
                                  "la": "en_US"}
#: Quotation marks the printers of the other languages use (opening, closing), besides straight
#: quotes; English gets curly ones from :meth:`CorpusSampler._typographic` (as may any language).
QUOTES = {"fr": ("« ", " »"), "de": ("„", "“"), "it": ("«", "»"), "es": ("«", "»"), "la": ("“", "”")}

#: Loanwords and names that bring the accented letters into otherwise English text.
ACCENTED_WORDS = (
    "café", "résumé", "façade", "jalapeño", "piñata", "Zürich", "Müller", "Schröder", "Gödel",
    "Bäcker", "garçon", "crème", "déjà vu", "à la carte", "señor", "Peña", "Françoise", "Hélène",
    "José", "Curaçao", "Nuñez", "Göteborg", "Jürgen", "Märklin", "première", "Genève",
)
CURRENCY_SYMBOLS = ("$", "$", "$", "£", "€")
DATE_FORMATS = (
    "%m/%d/%Y", "%d/%m/%y", "%Y-%m-%d", "%B %d, %Y", "%d %B %Y", "%b. %d, %Y", "%d.%m.%Y", "%A, %B %d",
)
#: Line kinds and their weights: mostly running prose, as in scanned archives.
LINE_KINDS = {
    "prose": 62, "name": 3, "address": 5, "company": 3, "date": 3, "amount": 3, "phone": 2,
    "reference": 3, "web": 2, "heading": 5, "label_value": 9,
}
#: Field labels by the kind of value they introduce, as on forms, letters and invoices.
LABELS = {
    "reference": ("Invoice No.", "Ref", "Order #", "Policy no.", "Case", "File", "Account"),
    "date": ("Date", "Dated", "Due", "Received"),
    "amount": ("Total", "Amount due", "Balance", "Price", "Paid"),
    "phone": ("Tel.", "Phone", "Fax"),
    "name": ("Attn", "Name", "Signed", "From", "To", "cc"),
    "web": ("E-mail", "Web", "Contact"),
}
LABEL_SEPARATORS = (": ", ": ", " ", " - ")
FIELD_SEPARATORS = (", ", "; ", " | ", " / ", " - ")
#: Rare symbols that prose seldom brings but the tokenizer must still see.
RARE_SYMBOLS = ("[sic]", "[1]", "[2]", "{a}", "|", "~", "^", "<", ">", "\\", "`", "_", "x_1", "<=", ">=", "~50")


def _collapse_spaces(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def check_languages(languages: Sequence[str]) -> tuple[Language, ...]:
    """``languages`` as a tuple, if they are some of :data:`LANGUAGES`, each once; else ValueError."""
    unknown = sorted(set(languages) - set(LANGUAGES))
    if not languages or unknown or len(set(languages)) != len(languages):
        raise ValueError(f"languages must be some of {', '.join(LANGUAGES)}, each once; got {', '.join(languages)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return tuple(languages)


def cut_at_word(text: str, max_chars: int) -> str:
    """The longest prefix of whole words that fits ``max_chars`` (a single long word is cut)."""
    if len(text) <= max_chars:
        return text
    prefix = text[: max_chars + 1]
    cut = prefix.rfind(" ")
    return (prefix[:cut] if cut > 0 else text[:max_chars]).rstrip()


class CorpusSampler:
    """Deterministic source of line and paragraph text; the same seed gives the same strings."""

    def __init__(self, seed: int, languages: Sequence[Language] = ("en",)) -> None:
        self._languages = check_languages(languages)
        self._fakers = {language: Faker(LANGUAGES[language]) for language in self._languages}
        if "la" in self._fakers:
            self._fakers["la"].add_provider(latin_lorem.Provider)
        self._language = self._languages[0]
        self._faker = self._fakers[self._language]
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the stream, so line ``i`` of a set can be drawn without drawing lines ``0..i-1``.
        With several languages, the seed also picks the language of what follows."""
        self._rng = random.Random(seed)
        if len(self._languages) > 1:
            self._language = self._rng.choice(self._languages)
            self._faker = self._fakers[self._language]
        self._faker.seed_instance(seed)

    def line(self, max_chars: int = 70) -> str:
        """One line: 1 word to ``max_chars`` characters, many near full width, some short."""
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        kind = self._rng.choices(list(LINE_KINDS), weights=list(LINE_KINDS.values()))[0]
        text = _collapse_spaces(getattr(self, f"_{kind}")())
        first_word = len(text.split(" ", 1)[0])
        target = max(self._target_length(max_chars), min(first_word, max_chars))  # never half a word
        while kind != "prose" and len(text) < target and self._rng.random() < 0.5:
            text += self._rng.choice(FIELD_SEPARATORS) + self._field()
        text = cut_at_word(_collapse_spaces(text), target)
        if kind != "prose":
            text = text.rstrip(" ,;:|/-")  # a cut field list must not end on a dangling separator
        return self._in_charset(text) or self._faker.word()[:max_chars]

    def paragraph(self, n_words: int) -> str:
        """Running prose of exactly ``n_words`` words ending with a full stop."""
        if n_words < 1:
            raise ValueError(f"n_words must be >= 1, got {n_words}")
        words: list[str] = []
        while len(words) < n_words:
            words.extend(self._in_charset(self._decorated_sentence()).split())
        text = " ".join(words[:n_words]).rstrip(",;:")
        return text if text.endswith((".", "?", "!")) else text.rstrip(".?!") + "."

    def title(self) -> str:
        """A document or section title: a few words (at most 7), title- or upper-case, sometimes numbered."""
        return self._in_charset(self._heading(7))

    def _in_charset(self, text: str) -> str:
        """Drop characters outside CHARSET (Faker data may carry some) so the guarantee holds."""
        return _collapse_spaces("".join(c for c in text if c in CHARSET))

    def _target_length(self, max_chars: int) -> int:
        roll = self._rng.random()
        if roll < 0.65:
            return self._rng.randint(min(40, max_chars), max_chars)
        if roll < 0.9:
            return self._rng.randint(min(12, max_chars), min(40, max_chars))
        return self._rng.randint(1, min(12, max_chars))

    # --- line kinds -------------------------------------------------------------------------

    def _prose(self) -> str:
        """Three sentences, entered mid-sentence half the time as most lines of a page are."""
        words = " ".join(self._decorated_sentence() for _ in range(3)).split()
        start = self._rng.randrange(len(words) // 2) if self._rng.random() < 0.5 else 0
        return " ".join(words[start:])

    def _name(self) -> str:
        return self._rng.choice((self._faker.name, self._faker.name_nonbinary, self._faker.last_name))()

    def _address(self) -> str:
        parts = self._faker.address().split("\n")
        return self._rng.choice((parts[0], parts[-1], ", ".join(parts)))

    def _company(self) -> str:
        company = self._faker.company()
        if self._rng.random() < 0.3:
            company = company.replace(" and ", " & ")
        return self._rng.choice((company, f"{company}, {self._faker.catch_phrase()}"))

    def _date(self) -> str:
        return self._faker.date_between("-90y", "+5y").strftime(self._rng.choice(DATE_FORMATS))

    def _amount(self) -> str:
        value = self._rng.choice((self._rng.uniform(0, 100), self._rng.uniform(100, 99_999)))
        symbol = self._rng.choice(CURRENCY_SYMBOLS)
        return self._rng.choice((f"{symbol}{value:,.2f}", f"{value:.2f} {symbol}", f"{symbol}{round(value):,}"))

    def _phone(self) -> str:
        return self._faker.phone_number()

    def _reference(self) -> str:
        pattern = self._rng.choice(("??-####", "###-##-####", "????/##/###", "#####-?", "?##.###.##"))
        return self._faker.bothify(pattern, letters="ABCDEFGHJKLMNPRSTUVWXYZ")

    def _heading(self, max_words: int = 6) -> str:
        words = " ".join(self._faker.words(self._rng.randint(1, max_words)))
        return self._rng.choice((words.upper(), words.title(), f"{self._rng.randint(1, 12)}. {words.title()}"))

    def _web(self) -> str:
        return self._rng.choice((self._faker.email, self._faker.url, self._faker.uri, self._faker.user_name))()

    def _label_value(self) -> str:
        kind = self._rng.choice(list(LABELS))
        value = getattr(self, f"_{kind}")()
        return f"{self._rng.choice(LABELS[kind])}{self._rng.choice(LABEL_SEPARATORS)}{value}"

    def _field(self) -> str:
        """Another short item to fill a form-like line: a labelled value or a bare one."""
        kind = self._rng.choice(("label_value", "name", "date", "amount", "reference", "phone", "company", "web"))
        return getattr(self, f"_{kind}")()

    # --- prose decoration -------------------------------------------------------------------

    def _decorated_sentence(self) -> str:
        """A Faker sentence with the punctuation, numbers and symbols real prose carries."""
        words = self._faker.sentence(nb_words=self._rng.randint(5, 16)).rstrip(".").split()
        decorations = (
            self._add_parenthetical, self._add_quote, self._add_number, self._add_symbol,
            self._add_accented_word, self._add_clause_punctuation, self._add_hyphenated,
        )
        for decorate in decorations:
            if self._rng.random() < 0.2:
                words = decorate(words)
        sentence = " ".join(words) + self._rng.choice((".", ".", ".", ".", "?", "!", ":", ";"))
        return self._typographic(sentence) if self._rng.random() < 0.06 else sentence

    def _position(self, words: list[str]) -> int:
        """A gap between words (or the end) to insert something at; never before the first word."""
        return self._rng.randint(1, len(words))

    def _add_parenthetical(self, words: list[str]) -> list[str]:
        inner = self._rng.choice((self._faker.word(), self._date(), f"see p. {self._rng.randint(1, 400)}",
                                  f"{self._rng.randint(1, 99)}%", self._faker.last_name()))
        at = self._position(words)
        return words[:at] + [f"({inner})"] + words[at:]

    def _add_quote(self, words: list[str]) -> list[str]:
        start = self._rng.randrange(len(words))
        end = min(len(words), start + self._rng.randint(1, 4))
        marks = (('"', '"'), ('"', '"'), ("'", "'")) + ((QUOTES[self._language],) if self._language in QUOTES else ())
        opening, closing = self._rng.choice(marks)
        return words[:start] + [opening + " ".join(words[start:end]) + closing] + words[end:]

    def _add_number(self, words: list[str]) -> list[str]:
        year, page = self._rng.randint(1850, 2024), self._rng.randint(1, 400)
        number = self._rng.choice((
            str(self._rng.randint(0, 2024)), f"{self._rng.uniform(0, 100):.1f}%", f"{self._rng.randint(1, 999_999):,}",
            self._amount(), f"No. {self._rng.randint(1, 99)}", f"{year}-{year + self._rng.randint(1, 30)}",
            f"pp. {page}-{page + self._rng.randint(1, 20)}",
        ))
        at = self._position(words)
        return words[:at] + [number] + words[at:]

    def _add_symbol(self, words: list[str]) -> list[str]:
        common = ("&", "and/or", "-", "R&D", "@", "#", "*", "+", "=", "1/2", "e.g.", "i.e.", "etc.")
        symbol = self._rng.choice(common if self._rng.random() < 0.7 else RARE_SYMBOLS)
        at = self._position(words)
        return words[:at] + [symbol] + words[at:]

    def _add_accented_word(self, words: list[str]) -> list[str]:
        if self._language != "en":  # the language's own words carry its accents
            return words
        at = self._position(words)
        return words[:at] + [self._rng.choice(ACCENTED_WORDS)] + words[at:]

    def _add_clause_punctuation(self, words: list[str]) -> list[str]:
        if len(words) < 3:
            return words
        at = self._rng.randrange(len(words) - 1)
        mark = self._rng.choice((",", ",", ",", ";", ":", " --"))
        return words[:at] + [words[at] + mark] + words[at + 1 :]

    def _add_hyphenated(self, words: list[str]) -> list[str]:
        at = self._rng.randrange(len(words))
        return words[:at] + [f"{self._faker.word()}-{words[at].lower()}"] + words[at + 1 :]

    def _typographic(self, sentence: str) -> str:
        """Curly quotes and real dashes, as word processors write them."""
        sentence = re.sub(r'"([^"]*)"', "“\\1”", sentence)
        sentence = re.sub(r"'([^']*)'", "‘\\1’", sentence)
        sentence = re.sub(r"(\d)-(\d)", "\\1–\\2", sentence)
        return sentence.replace(" -- ", " — ").replace("--", "–")
