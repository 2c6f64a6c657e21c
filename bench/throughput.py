"""Whole-job throughput against Tesseract 5 on the same pages and the same cores, in one run (issue 16).

Ours: ``trocr-pipeline run`` over every page of the dev set (the images of ``PAGES/manifest.tsv``, the
text-only pages, and the scanned PDFs), as a user runs it: a fresh process, Ray's start-up included,
the bundled printed model, ``--set ray.num_cpus=CORES``. Tesseract: its full OCR (layout and text) of
the same pages, ``CORES`` processes at a time with one thread each (``OMP_THREAD_LIMIT=1``), each PDF
rendered at 300 dpi by ``pdftoppm`` first (counted in its time). Both run on an otherwise idle
machine; ``job_vs_tesseract`` is Tesseract's seconds over ours (above 1: we are faster).

On a machine whose speed drifts (the thirty-seventh session's: a third within the hour), ``--rounds N`` runs the two
alternately N times and prints each round and the median of the rounds' ratios.

    .venv/bin/python bench/throughput.py --pages ../shared/data/pages [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import DEFAULT_PAGES, read_pages, tesseract_language  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def tesseract_seconds(images: list[tuple[Path, str]], pdfs: list[Path], cores: int, work: Path) -> float:
    """Wall seconds of Tesseract's full OCR of every page, ``cores`` processes at a time."""
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    started = time.perf_counter()

    def render(pdf: Path) -> list[tuple[Path, str]]:
        prefix = work / pdf.stem
        subprocess.run(["pdftoppm", "-r", "300", "-gray", "-png", str(pdf), str(prefix)], check=True)
        return [(page, "eng") for page in sorted(work.glob(f"{pdf.stem}-*.png"))]

    def read(item: tuple[Path, str]) -> str:
        image, language = item
        return subprocess.run(["tesseract", str(image), "stdout", "-l", language], capture_output=True, text=True,
                              env=env, check=True).stdout

    with ThreadPoolExecutor(cores) as pool:
        rendered = [page for pages in pool.map(render, pdfs) for page in pages]
        list(pool.map(read, images + rendered))
    return time.perf_counter() - started


def job_seconds(inputs: list[Path], cores: int, output: Path, extra: list[str]) -> tuple[float, str]:
    """Wall seconds of ``trocr-pipeline run`` over the inputs in a fresh process, and its summary."""
    command = [sys.executable, "-m", "pipeline.cli", "run", *map(str, inputs), "--output", str(output),
               "--set", f"ray.num_cpus={cores}", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 4):
        raise SystemExit(f"trocr-pipeline run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=Path, default=DEFAULT_PAGES, help="folder with manifest.tsv")
    parser.add_argument("--cores", type=int, default=2, help="cores both get (Ray CPUs; Tesseract processes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for our job (repeatable)")
    parser.add_argument("--rounds", type=int, default=1, help="Tesseract and the job alternately, this many times: "
                        "the median of the rounds' ratios")
    args = parser.parse_args(argv)

    pages = read_pages(args.pages)
    pdfs = sorted((args.pages / "scanned_pdfs").glob("*.pdf"))
    images = [(page.truth.image, tesseract_language(page)) for page in pages]
    extra = [argument for override in args.overrides for argument in ("--set", override)]
    rounds: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as work:
        for number in range(1, args.rounds + 1):
            theirs = tesseract_seconds(images, pdfs, args.cores, Path(work))
            ours, summary = job_seconds([image for image, _ in images] + pdfs, args.cores,
                                        Path(work) / f"job-{number}", extra)
            rounds.append((theirs, ours))
            if args.rounds > 1:
                print(f"round {number}: tesseract {theirs:.1f} s, job {ours:.1f} s, ratio {theirs / ours:.2f}",
                      flush=True)
    print(summary)
    print(f"inputs: {len(images)} images + {len(pdfs)} PDFs, {args.cores} cores")
    median = "median of the rounds: " if args.rounds > 1 else ""
    print(f"tesseract 5 full OCR ({args.cores} processes): {median}{statistics.median(t for t, _ in rounds):.1f} s")
    print(f"trocr-pipeline run (start-up included):   {median}{statistics.median(o for _, o in rounds):.1f} s")
    print(f"job_vs_tesseract={statistics.median(t / o for t, o in rounds):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
