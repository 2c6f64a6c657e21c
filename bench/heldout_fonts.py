"""Synthetic documents in printed fonts no model was trained on, read by the whole job (issue 12).

Writes ``--documents`` synthetic documents (``pipeline.synth.docs``: one or two columns, PDF and
TIFF, with ground truth) twice, with the same text and layout seeds: once in the held-out families
(``pipeline.synth.fonts.HELDOUT_FAMILIES``: Century Schoolbook, Palatino, Bookman, Avant Garde,
Libertine, Biolinum; Debian ``fonts-urw-base35`` and ``fonts-linuxlibertine``) and once in the
training families, then runs the whole job (``trocr-pipeline run``, default settings and model)
on each set and prints the page CER in reading order (jiwer, all pages together) of both, and
Tesseract 5 (``eng``) on the same pages for scale.

    apt-get install fonts-urw-base35 fonts-linuxlibertine
    .venv/bin/python bench/heldout_fonts.py --documents 8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jiwer
import pyarrow.dataset as ds
from PIL import Image, ImageSequence

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from pipeline.synth.docs import load_ground_truth, page_texts, write_document_set  # noqa: E402


def job_page_texts(documents: list[Path], output: Path, overrides: list[str]) -> dict[tuple[str, int], str]:
    """Page texts of ``trocr-pipeline run`` over the documents, by (file name, page)."""
    command = [sys.executable, "-m", "pipeline.cli", "run", *map(str, documents), "--output", str(output),
               *[argument for override in overrides for argument in ("--set", override)]]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"trocr-pipeline run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = ds.dataset(str(output / "pages"), format="parquet").to_table(columns=["source", "page", "text"])
    return {(Path(row["source"]).name, row["page"]): row["text"] for row in rows.to_pylist()}


def page_images(document: Path, dpi: int, work: Path) -> list[Path]:
    """Each page of a synthetic PDF or TIFF as a PNG file (poppler for PDF, Pillow for TIFF)."""
    prefix = work / document.stem
    if document.suffix == ".pdf":
        subprocess.run(["pdftoppm", "-r", str(dpi), "-gray", "-png", str(document), str(prefix)], check=True)
        return sorted(work.glob(f"{document.stem}-*.png"))
    paths = []
    with Image.open(document) as image:
        for index, frame in enumerate(ImageSequence.Iterator(image), start=1):
            paths.append(work / f"{document.stem}-{index}.png")
            frame.convert("L").save(paths[-1], dpi=(dpi, dpi))
    return paths


def tesseract_page_texts(documents: list[Path], dpi: int, work: Path) -> dict[tuple[str, int], str]:
    """Tesseract 5 full OCR (``eng``, one thread) of every page, by (file name, page)."""
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    texts = {}
    for document in documents:
        for number, image in enumerate(page_images(document, dpi, work), start=1):
            texts[(document.name, number)] = subprocess.run(["tesseract", str(image), "stdout", "-l", "eng"],
                                                            capture_output=True, text=True, env=env, check=True).stdout
    return texts


def page_cer(truths: dict[Path, dict], texts: dict[tuple[str, int], str]) -> float:
    references, hypotheses = [], []
    for document, truth in truths.items():
        for number, reference in page_texts(truth).items():
            references.append(reference)
            hypotheses.append(texts.get((document.name, number), ""))
    return float(jiwer.cer(references, hypotheses))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--seed", type=int, default=31337, help="documents seed (never a training seed)")
    parser.add_argument("--dpi", type=int, default=200)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for our job (repeatable)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="heldout-fonts-") as folder:
        work = Path(folder)
        results = []
        for font_kind in ("heldout", "printed"):
            documents = write_document_set(work / font_kind, args.documents, args.seed, dpi=args.dpi,
                                           font_kind=font_kind)
            truths = {document: load_ground_truth(document) for document in documents}
            ours = page_cer(truths, job_page_texts(documents, work / f"{font_kind}-out", args.overrides))
            (work / f"{font_kind}-tesseract").mkdir()
            theirs = page_cer(truths, tesseract_page_texts(documents, args.dpi, work / f"{font_kind}-tesseract"))
            pages = sum(len(truth["pages"]) for truth in truths.values())
            fonts = sorted({truth["font"] for truth in truths.values()})
            print(f"{font_kind:8s} fonts: {len(documents)} documents, {pages} pages, faces {', '.join(fonts)}")
            results.append((font_kind, ours, theirs))
        for font_kind, ours, theirs in results:
            print(f"cer_{font_kind}_fonts={ours:.4f} tesseract={theirs:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
