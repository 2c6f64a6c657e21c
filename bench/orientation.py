"""Orientation detection on the dev pages turned four ways: accuracy overall and per category.

    .venv/bin/python bench/orientation.py --pages ../shared/data/pages

Each page image of ``manifest.tsv``, the text-only tesseract pages and the pages of the scanned
PDFs (rendered at 150 dpi; they are all upright) is turned 0/90/180/270 clockwise, and :func:`operators.orientation.detect_orientation` must say the turn that undoes it.
A page left as it is when the detector is unsure counts as wrong unless it was upright already.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from pdf2image import convert_from_path  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from operators.orientation import MAX_CONTRARY_ALIGNMENT, MIN_ASYMMETRY, MIN_AXIS_SCORE, detect_orientation, turn  # noqa: E402
from operators.rasterize import to_gray8  # noqa: E402


def dev_pages(root: Path) -> Iterator[tuple[str, str, np.ndarray]]:
    """(name, category, upright 8-bit page) of every dev page: manifest.tsv, the tesseract
    text-only pages, then each page of the scanned PDFs."""
    images = []
    with open(root / "manifest.tsv", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            images.append((row["image"], row["category"], root / row["image"]))
    for path in sorted((root / "tesseract_test_textonly").glob("*.tif")):
        images.append((str(path.relative_to(root)), "printed_modern_tesseract", path))
    for name, category, path in images:
        with Image.open(path) as image:
            yield name, category, to_gray8(ImageOps.exif_transpose(image))
    for path in sorted((root / "scanned_pdfs").glob("*.pdf")):
        for number, image in enumerate(convert_from_path(str(path), dpi=150, grayscale=True), start=1):
            yield f"{path.relative_to(root)}#{number}", "scanned_pdf_court_filings", to_gray8(image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, required=True, help="the dev data folder (with manifest.tsv)")
    parser.add_argument("--verbose", action="store_true", help="one line per page and turn")
    args = parser.parse_args(argv)
    right, total, unsure, wrong_turn = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(int)
    seconds, runs = 0.0, 0
    margins = []
    for name, category, upright in dev_pages(args.pages):
        for stored in (0, 90, 180, 270):  # the page as scanned: turned this far clockwise
            page = turn(upright, stored)
            start = time.perf_counter()
            found = detect_orientation(page)
            seconds += time.perf_counter() - start
            runs += 1
            want = (360 - stored) % 360
            margins.append((abs(found.axis_score), abs(found.asymmetry), found.alignment * np.sign(found.asymmetry),
                            name))
            for key in (category, "all"):
                total[key] += 1
                right[key] += found.rotation == want
                unsure[key] += not found.confident
                wrong_turn[key] += found.confident and found.rotation != want
            if args.verbose or found.rotation != want:
                print(f"{'ok ' if found.rotation == want else 'BAD'} {name} stored {stored:3d}: "
                      f"turn {found.rotation:3d} (want {want:3d}) confident={found.confident} "
                      f"axis={found.axis_score:+.2f} asym={found.asymmetry:+.3f} "
                      f"align={found.alignment:+.3f} lines={found.lines}")
    print(f"\n{'category':34s} {'cases':>5s} {'correct':>8s} {'unsure':>6s} {'wrong turn':>10s}")
    for key in sorted(total, key=lambda k: (k == "all", k)):
        print(f"{key:34s} {total[key]:5d} {right[key] / total[key]:8.1%} {unsure[key]:6d} {wrong_turn[key]:10d}")
    weakest_axis, weakest_updown = min(margins), min(margins, key=lambda m: m[1])
    contrary = min(margins, key=lambda m: m[2])
    print(f"\nweakest axis score {weakest_axis[0]:.2f} (needs {MIN_AXIS_SCORE}): {weakest_axis[3]}")
    print(f"weakest up/down asymmetry {weakest_updown[1]:.3f} (needs {MIN_ASYMMETRY}): {weakest_updown[3]}")
    print(f"most contrary baseline alignment {contrary[2]:+.3f} (a turn needs above {-MAX_CONTRARY_ALIGNMENT}): "
          f"{contrary[3]}")
    print(f"{seconds / runs * 1000:.1f} ms per page (detector only, page already decoded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
