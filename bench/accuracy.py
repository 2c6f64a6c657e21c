"""Reading accuracy on real archive pages, the bundled models side by side with Tesseract 5 (issue 12).

Pages: every page of ``PAGES/manifest.tsv`` (PAGE/ALTO ground truth; reference text = the
ground-truth lines in file order) and of ``PAGES/manifest_textonly_and_pdfs.tsv`` that has a
plain-text ground truth. Ours: the whole job (``trocr-pipeline run``: rasterize, detect, reading
order, recognize) on all pages of a category at once, with the bundled model for the category
(``handwritten`` for handwriting, ``printed`` for the rest). Tesseract: ``tesseract IMAGE stdout``
with the page's language pack (``Fraktur`` for Fraktur), two processes at a time, one thread each.

Two figures per page and category, both after the same normalisation of reference and output
(:func:`normalize`: Unicode NFKC, long s as s, old umlauts (a small e above) as umlauts, line-end hyphen
signs as '-', ’ as ', transcription markup dropped, whitespace runs as one space):

- page CER in reading order: edits / reference characters over the page's whole text;
- bag-of-words error: 1 - F1 of the two word multisets (order-independent, so a column read in
  another order does not decide it).

Categories are corpus-level (total edits / total characters; summed word matches). With
``--val``, the line CER per source of the validation lines (``train/val``) with the model each
source's category gets. With ``--languages`` our job gets each page's languages as Tesseract gets
its language packs (``recognize.languages``, word frequencies in beam search), one job per model and
set of languages.

    .venv/bin/python bench/accuracy.py --pages ../shared/data/pages --val ../shared/data/train/val
    .venv/bin/python bench/accuracy.py --pages ../shared/data/pages --set recognize.num_beams=4 --languages
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import subprocess
import sys
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jiwer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate import PageTruth, read_page_truth, recognize_pages  # noqa: E402

DEFAULT_PAGES = PROJECT_ROOT.parent / "shared" / "data" / "pages"
HANDWRITTEN = "handwritten"
#: Text-only pages have no category in their manifest: clean renders and UNLV scans of modern print.
TEXT_ONLY_CATEGORIES = {"phototest": "printed_modern_rendered", "eurotext": "printed_modern_rendered"}
TEXT_ONLY_DEFAULT_CATEGORY = "printed_modern_scan"
TEXT_ONLY_LANGUAGES = {"eurotext": "en/fr/de/it/es"}
TESSERACT_LANGUAGES = {"en": "eng", "fr": "fra", "de": "deu", "it": "ita", "es": "spa", "la": "lat", "co": "ita"}
#: The page languages' word lists for our job with ``--languages`` (recognize.languages): wordfreq has no
#: Latin, and Corsican pages get Italian, as Tesseract's do.
WORD_LIST_LANGUAGES = {"en": "en", "fr": "fr", "de": "de", "it": "it", "es": "es", "co": "it"}
#: Transcription markup of the ground truth sources, not text on the page (see shared/data/README.md):
#: Tapuscorpus marks underlining with ``_`` and struck-out text with ``~~~`` (UNLV's ``~`` is a character
#: it could not read). Sources write the apostrophe as ``'`` or ``’`` by their own convention (the
#: training lines mostly ``’``), so both are scored as ``'``. Old umlauts, a small e above the vowel (U+0364,
#: OCR-D's Fraktur ground truth), are scored as the umlaut (a diaeresis, composed after), as long s as s.
MARKUP = str.maketrans({"ſ": "s", "¬": "-", "⸗": "-", "^": None, "⟦": None, "⟧": None, "$": None, "_": None,
                        "~": None, "’": "'", "\u0364": "\u0308"})
#: Source folders whose validation lines are handwriting (read with the handwritten model).
HANDWRITTEN_SOURCES = ("_hw_",)


@dataclass(frozen=True)
class Page:
    truth: PageTruth
    category: str
    languages: tuple[str, ...]


def normalize(text: str) -> str:
    """What is scored: NFKC (superscript letters, ligatures), long s as s, old umlauts composed as umlauts,
    ’ as ', transcription markup dropped, spaces collapsed (see ``MARKUP``)."""
    return " ".join(unicodedata.normalize("NFC", unicodedata.normalize("NFKC", text).translate(MARKUP)).split())


def bag_of_words(reference: str, hypothesis: str) -> tuple[int, int, int]:
    """(matched words, reference words, output words) of the two word multisets."""
    ref, hyp = Counter(reference.split()), Counter(hypothesis.split())
    return sum((ref & hyp).values()), sum(ref.values()), sum(hyp.values())


def read_pages(folder: Path) -> list[Page]:
    pages = []
    with (folder / "manifest.tsv").open(newline="", encoding="utf-8") as manifest:
        for row in csv.DictReader(manifest, delimiter="\t"):
            truth = read_page_truth([folder / row["ground_truth"]])[0]
            pages.append(Page(truth, row["category"], tuple(row["language"].split("/"))))
    text_only = folder / "manifest_textonly_and_pdfs.tsv"
    if text_only.is_file():
        with text_only.open(newline="", encoding="utf-8") as manifest:
            for row in csv.DictReader(manifest, delimiter="\t"):
                if row["ground_truth"] == "-":
                    continue
                image, text = folder / row["file"], folder / row["ground_truth"]
                stem = image.stem
                truth = PageTruth(text, image, str(image.parent), text.read_text(encoding="utf-8-sig"))
                pages.append(Page(truth, TEXT_ONLY_CATEGORIES.get(stem, TEXT_ONLY_DEFAULT_CATEGORY),
                                  tuple(TEXT_ONLY_LANGUAGES.get(stem, "en").split("/"))))
    return pages


def tesseract_language(page: Page) -> str:
    if page.category == "printed_historical_fraktur":
        return "Fraktur"
    return "+".join(dict.fromkeys(TESSERACT_LANGUAGES[language] for language in page.languages))


def read_with_tesseract(pages: list[Page]) -> list[str]:
    """Tesseract 5's full OCR (layout and text) of each page, two processes at a time, one thread each."""
    if shutil.which("tesseract") is None:
        raise SystemExit("tesseract not found: apt-get install tesseract-ocr tesseract-ocr-{eng,fra,deu,ita,spa,lat} "
                         "tesseract-ocr-script-frak")
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}

    def one(page: Page) -> str:
        done = subprocess.run(["tesseract", str(page.truth.image), "stdout", "-l", tesseract_language(page)],
                              capture_output=True, text=True, env=env, check=True)
        return done.stdout

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, pages))


def read_with_pipeline(pages: list[Page], printed_model: str, handwritten_model: str,
                       overrides: list[str] = (), languages: bool = False) -> list[str]:
    """The whole job over the pages, one run per model (default config plus ``overrides``); with
    ``languages``, one run per model and set of page languages, given as ``recognize.languages``."""
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for index, page in enumerate(pages):
        model = handwritten_model if page.category == HANDWRITTEN else printed_model
        word_lists = tuple(dict.fromkeys(WORD_LIST_LANGUAGES[code] for code in page.languages
                                         if code in WORD_LIST_LANGUAGES)) if languages else ()
        groups.setdefault((model, word_lists), []).append(index)
    texts: dict[int, str] = {}
    for (model, word_lists), chosen in groups.items():
        settings = [*overrides, f"recognize.model={model}"]
        if word_lists:
            settings.append(f"recognize.languages=[{','.join(word_lists)}]")
        texts.update(zip(chosen, recognize_pages([pages[i].truth for i in chosen], settings)))
    return [texts[i] for i in range(len(pages))]


def score(references: list[str], hypotheses: list[str]) -> tuple[float, float]:
    """Corpus page CER (jiwer: total edits / reference characters) and bag-of-words error, normalised."""
    references, hypotheses = [normalize(text) for text in references], [normalize(text) for text in hypotheses]
    matched = ref_words = hyp_words = 0
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        page_matched, page_ref, page_hyp = bag_of_words(reference, hypothesis)
        matched, ref_words, hyp_words = matched + page_matched, ref_words + page_ref, hyp_words + page_hyp
    bow = 1 - 2 * matched / (ref_words + hyp_words) if ref_words + hyp_words else 0.0
    return float(jiwer.cer(references, hypotheses)), bow


def page_table(pages: list[Page], ours: list[str], theirs: list[str]) -> list[str]:
    rows = ["| category | pages | ours: page CER / BoW error | Tesseract 5: page CER / BoW error | both at or below |",
            "|---|---|---|---|---|"]
    categories = sorted({page.category for page in pages}) + ["overall"]
    for category in categories:
        chosen = [i for i, page in enumerate(pages) if category in ("overall", page.category)]
        references = [pages[i].truth.text for i in chosen]
        our_cer, our_bow = score(references, [ours[i] for i in chosen])
        their_cer, their_bow = score(references, [theirs[i] for i in chosen])
        met = "yes" if our_cer <= their_cer and our_bow <= their_bow else "no"
        rows.append(f"| {category} | {len(chosen)} | {our_cer:.1%} / {our_bow:.1%} | {their_cer:.1%} / {their_bow:.1%} | {met} |")
    return rows


def per_page_rows(pages: list[Page], ours: list[str], theirs: list[str]) -> list[str]:
    rows = ["| page | category | ours | Tesseract 5 |", "|---|---|---|---|"]
    for page, our, their in zip(pages, ours, theirs, strict=True):
        our_cer, our_bow = score([page.truth.text], [our])
        their_cer, their_bow = score([page.truth.text], [their])
        rows.append(f"| {page.truth.image.name} | {page.category} | {our_cer:.1%} / {our_bow:.1%} | "
                    f"{their_cer:.1%} / {their_bow:.1%} |")
    return rows


def validation_rows(folder: Path, printed_model: str, handwritten_model: str) -> list[str]:
    """Line CER per source of the validation lines, each source read by its category's model."""
    from pipeline.evaluate import evaluate

    sources = sorted(path for path in folder.iterdir() if path.is_dir())
    rows = ["| source | model | lines | line CER |", "|---|---|---|---|"]
    for model, chosen in ((printed_model, [s for s in sources if not any(m in s.name for m in HANDWRITTEN_SOURCES)]),
                          (handwritten_model, [s for s in sources if any(m in s.name for m in HANDWRITTEN_SOURCES)])):
        if not chosen:
            continue
        # the decode limit the job uses (what the model can produce); the shared validation lines are cut with a
        # margin, most with a neighbour's descenders at the top, which the job paints out of the lines it cuts
        scores, _ = evaluate(model, chosen, paint_out_neighbours=True)
        for result in scores:
            rows.append(f"| {Path(result.source).name} | {model} | {result.lines} | {result.cer:.2%} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=Path, default=DEFAULT_PAGES, help="folder with manifest.tsv")
    parser.add_argument("--val", type=Path, help="also score the validation lines of this folder (train/val)")
    parser.add_argument("--printed-model", default="printed", help="recognize.model for print and typewriting")
    parser.add_argument("--handwritten-model", default="handwritten", help="recognize.model for handwriting")
    parser.add_argument("--category", action="append", help="only these manifest categories (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for our job on the pages (not --val), e.g. recognize.num_beams=4 (repeatable)")
    parser.add_argument("--languages", action="store_true",
                        help="give our job each page's languages as Tesseract gets its language packs "
                             "(recognize.languages; with --set recognize.num_beams=4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.languages:  # refused now rather than after Tesseract's pass: languages need beams
        load_config(None, [*args.overrides, "recognize.languages=[en]"])

    pages = [page for page in read_pages(args.pages) if not args.category or page.category in args.category]
    theirs = read_with_tesseract(pages)
    ours = read_with_pipeline(pages, args.printed_model, args.handwritten_model, args.overrides, args.languages)
    print("\n".join(page_table(pages, ours, theirs)))
    print()
    print("\n".join(per_page_rows(pages, ours, theirs)))
    if args.val:
        print()
        print("\n".join(validation_rows(args.val, args.printed_model, args.handwritten_model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
