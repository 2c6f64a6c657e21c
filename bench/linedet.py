"""Line-detection benchmark on real scans with PAGE / ALTO ground truth (project issue 5).

Runs ``operators.detect.detect_lines`` and, side by side, Tesseract's layout analysis (its level-4
line boxes from ``tesseract IMG - --psm 3 tsv``, one thread) on every page of ``MANIFEST``
(default ``PAGES/manifest.tsv``), writes one prediction JSON per page and detector in the format of
the reference scorer (``shared/tools/linedet_eval.py``), scores them (precision / recall / F1 of a
one-to-one matching at polygon IoU >= 0.5, Kendall tau of the reading order over matched lines,
overall and within ground-truth blocks, seconds per page from image file to polygons) per category
and overall, and, when the reference scorer is found, checks that its figures on our prediction
files agree with ours. Where the ground truth has baselines (ALTO 4 BASELINE points, PAGE
Baseline), "baseline err" is the mean vertical distance of our matched lines' baselines from
them, in ground-truth line heights (Tesseract's TSV has no baselines).

Ground truth often annotates only part of a page (calamari: no marginalia, no footnote section),
so a second F1, "F1 ann", also scores each detector with the predictions that lie mostly (>= half
their area) outside the annotated area (GT blocks holding lines, plus the GT lines) left out, like
the reference scorer's ``--gt-regions-only``. The plain F1 is the figure the targets are set on.

    .venv/bin/python bench/linedet.py --pages ../shared/data/pages --out out/linedet

Polygon IoU is computed like the reference scorer without shapely: both polygons are rasterised
with OpenCV at rounded coordinates. The matching is greedy by IoU; at IoU >= 0.5 a line can hardly
overlap two others that much, so this equals the maximum matching the reference may use.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from lxml import etree

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from operators.detect import detect_lines  # noqa: E402
from operators.formats.read import (  # noqa: E402
    XmlLine,
    block_geometry,
    box_points,
    enclosing_block,
    read_page_xml,
)
from operators.settings import DetectConfig  # noqa: E402

DEFAULT_PAGES = PROJECT_ROOT.parent / "shared" / "data" / "pages"
DEFAULT_REFERENCE = PROJECT_ROOT.parent / "shared" / "tools" / "linedet_eval.py"
IOU_THRESHOLD = 0.5
#: Manifest categories grouped into the four categories the targets are set for.
CATEGORY_GROUPS = {
    "handwritten": "handwritten",
    "typewritten": "typewritten",
    "printed_modern_scan": "printed modern",
    "printed_historical_early_modern": "printed historical",
    "printed_historical_fraktur": "printed historical",
}
COMPARED_KEYS = ("n_gt", "n_pred", "tp_poly", "conc", "disc", "conc_blk", "disc_blk")
#: Share of a prediction's area that must lie in the annotated area for "F1 ann" to count it.
ANNOTATED_SHARE = 0.5
TESSERACT_LINE_LEVEL = "4"

#: Image file -> predicted line polygons in reading order.
@dataclass(frozen=True)
class DetectedLine:
    polygon: np.ndarray  # (N, 2) in page pixels
    baseline: np.ndarray | None  # (K, 2) polyline, None when the detector gives none


Detector = Callable[[Path], list[DetectedLine]]


@dataclass(frozen=True)
class PageEntry:
    image: str  # relative to the pages folder
    ground_truth: str
    category: str  # manifest category


def read_annotated_area(path: Path, truth: list[XmlLine]) -> list[np.ndarray]:
    """Polygons of the GT blocks that hold lines and of the GT lines (``truth``, read from ``path``):
    where the GT says anything."""
    root = etree.parse(str(path)).getroot()
    blocks = {enclosing_block(line, ("TextBlock", "TextRegion")) for line in root.iter("{*}TextLine")}
    outlines = [block_geometry(block) for block in blocks if block is not None]
    return [points for points in outlines if points is not None] + [line.points for line in truth]


def inside_share(area: list[np.ndarray], predicted: list[np.ndarray]) -> list[float]:
    """Share of each predicted polygon's rasterised area that lies inside the union of ``area``."""
    corners = np.concatenate([points for points in area + predicted]) if area or predicted else np.zeros((1, 2))
    width, height = (np.ceil(corners.max(axis=0)).astype(int) + 2).tolist()
    annotated = np.zeros((height, width), np.uint8)
    for points in area:  # one call per polygon: fillPoly leaves the overlap of two polygons of one call empty
        cv2.fillPoly(annotated, [np.round(points).astype(np.int32)], 1)
    shares = []
    for points in predicted:
        x0, y0, mask = rasterise(points)
        window = annotated[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        shares.append(float((window & mask[: window.shape[0], : window.shape[1]]).sum()) / max(1, int(mask.sum())))
    return shares


def read_manifest(pages: Path, manifest: Path) -> list[PageEntry]:
    """Manifest rows with XML ground truth; one ground truth per image (the manifest's choice,
    e.g. PAGE for the Kant page that also ships ALTO)."""
    entries: dict[str, PageEntry] = {}
    with open(manifest, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            image, truth = row["image"].strip(), row["ground_truth"].strip()
            if truth.lower().endswith(".xml") and image not in entries and (pages / truth).is_file():
                entries[image] = PageEntry(image, truth, row["category"].strip())
    return list(entries.values())


def rasterise(points: np.ndarray) -> tuple[int, int, np.ndarray]:
    x0, y0 = np.floor(points.min(axis=0)).astype(int)
    x1, y1 = np.ceil(points.max(axis=0)).astype(int)
    mask = np.zeros((max(y1 - y0, 1), max(x1 - x0, 1)), np.uint8)
    cv2.fillPoly(mask, [np.round(points - [x0, y0]).astype(np.int32)], 1)
    return int(x0), int(y0), mask


def polygon_iou_matrix(truth: list[np.ndarray], predicted: list[np.ndarray]) -> np.ndarray:
    """IoU of every ground-truth / predicted polygon pair whose bounding boxes overlap."""
    iou = np.zeros((len(truth), len(predicted)))
    if not truth or not predicted:
        return iou
    boxes_t = np.array([[*p.min(axis=0), *p.max(axis=0)] for p in truth])
    boxes_p = np.array([[*p.min(axis=0), *p.max(axis=0)] for p in predicted])
    overlap_w = np.minimum(boxes_t[:, None, 2], boxes_p[None, :, 2]) - np.maximum(boxes_t[:, None, 0], boxes_p[None, :, 0])
    overlap_h = np.minimum(boxes_t[:, None, 3], boxes_p[None, :, 3]) - np.maximum(boxes_t[:, None, 1], boxes_p[None, :, 1])
    raster_t = [rasterise(p) for p in truth]
    raster_p = [rasterise(p) for p in predicted]
    for i, j in np.argwhere((overlap_w > 0) & (overlap_h > 0)):
        (ax, ay, a), (bx, by, b) = raster_t[i], raster_p[j]
        x0, y0 = max(ax, bx), max(ay, by)
        x1, y1 = min(ax + a.shape[1], bx + b.shape[1]), min(ay + a.shape[0], by + b.shape[0])
        inter = 0
        if x1 > x0 and y1 > y0:
            inter = int((a[y0 - ay : y1 - ay, x0 - ax : x1 - ax] & b[y0 - by : y1 - by, x0 - bx : x1 - bx]).sum())
        union = int(a.sum()) + int(b.sum()) - inter
        iou[i, j] = inter / union if union else 0.0
    return iou


def match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one (ground truth, prediction) pairs at IoU >= threshold, best IoU first."""
    pairs, used_t, used_p = [], set(), set()
    for i, j in sorted(np.argwhere(iou >= threshold).tolist(), key=lambda ij: -iou[ij[0], ij[1]]):
        if i not in used_t and j not in used_p:
            pairs.append((i, j))
            used_t.add(i)
            used_p.add(j)
    return sorted(pairs)


def concordance(pairs: list[tuple[int, int]], blocks: list[int] | None = None) -> tuple[int, int]:
    """Concordant and discordant pairs of matched lines, ground-truth order vs predicted order;
    with ``blocks``, only pairs of lines in one ground-truth block count."""
    concordant = discordant = 0
    for a in range(len(pairs)):
        for b in range(a + 1, len(pairs)):
            (gt_a, pred_a), (gt_b, pred_b) = pairs[a], pairs[b]
            if blocks is not None and (blocks[gt_a] != blocks[gt_b] or blocks[gt_a] < 0):
                continue
            same_direction = (gt_b - gt_a) * (pred_b - pred_a)
            concordant += same_direction > 0
            discordant += same_direction < 0
    return concordant, discordant


def baseline_error(truth: XmlLine, baseline: np.ndarray) -> float:
    """Mean vertical distance between a predicted and the ground-truth baseline where both run, in
    ground-truth line heights (the line polygon's height)."""
    gt_x, gt_y = truth.baseline[np.argsort(truth.baseline[:, 0])].T
    x, y = baseline[np.argsort(baseline[:, 0])].T
    low, high = max(gt_x[0], x[0]), min(gt_x[-1], x[-1])
    probes = np.linspace(low, high, 20) if high > low else np.array([(low + high) / 2])
    return float(np.mean(np.abs(np.interp(probes, x, y) - np.interp(probes, gt_x, gt_y))) / np.ptp(truth.points[:, 1]))


def score_page(truth: list[XmlLine], predicted: list[np.ndarray], seconds: float,
               baselines: list[np.ndarray | None] | None = None) -> dict:
    pairs = match(polygon_iou_matrix([line.points for line in truth], predicted), IOU_THRESHOLD)
    conc, disc = concordance(pairs)
    conc_blk, disc_blk = concordance(pairs, [line.block for line in truth])
    errors = [baseline_error(truth[i], baselines[j]) for i, j in pairs
              if baselines is not None and baselines[j] is not None and truth[i].baseline is not None]
    return {"pages": 1, "n_gt": len(truth), "n_pred": len(predicted), "tp_poly": len(pairs), "conc": conc,
            "disc": disc, "conc_blk": conc_blk, "disc_blk": disc_blk, "seconds": seconds,
            "n_baseline": len(errors), "baseline_error_sum": sum(errors)}


def rates(counts: dict) -> dict:
    """Counts plus precision, recall, F1, the two taus and seconds per page (None when undefined)."""
    precision = counts["tp_poly"] / counts["n_pred"] if counts["n_pred"] else None
    recall = counts["tp_poly"] / counts["n_gt"] if counts["n_gt"] else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    tau = (counts["conc"] - counts["disc"]) / (counts["conc"] + counts["disc"]) if counts["conc"] + counts["disc"] else None
    pairs_blk = counts["conc_blk"] + counts["disc_blk"]
    tau_blk = (counts["conc_blk"] - counts["disc_blk"]) / pairs_blk if pairs_blk else None
    annotated = counts["n_gt"] + counts["n_pred_ann"]
    return {**counts, "precision": precision, "recall": recall, "f1": f1, "tau": tau, "tau_blk": tau_blk,
            "f1_ann": 2 * counts["tp_ann"] / annotated if annotated else 0.0,
            "baseline_error": counts["baseline_error_sum"] / counts["n_baseline"] if counts["n_baseline"] else None,
            "sec_per_page": counts["seconds"] / counts["pages"]}


def add_counts(total: dict, page: dict) -> None:
    for key, value in page.items():
        total[key] = total.get(key, 0) + value


def our_detector(dpi: int, config: DetectConfig) -> Detector:
    def detect(image: Path) -> list[np.ndarray]:
        gray = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise SystemExit(f"cannot read image {image}")
        return [DetectedLine(np.asarray(line.polygon, np.float64), np.asarray(line.baseline, np.float64))
                for line in detect_lines(gray, dpi, config)]

    return detect


def tesseract_detector(executable: str) -> Detector:
    """Tesseract's line boxes (TSV level 4) in its reading order; one OpenMP thread, as ours runs."""
    environment = {**os.environ, "OMP_THREAD_LIMIT": "1"}

    def detect(image: Path) -> list[DetectedLine]:
        result = subprocess.run([executable, str(image), "-", "--psm", "3", "tsv"], capture_output=True,
                                text=True, env=environment, timeout=300)
        if result.returncode != 0:
            raise SystemExit(f"tesseract failed on {image}: {result.stderr.strip()}")
        return [DetectedLine(box, None) for box in parse_tesseract_lines(result.stdout)]

    return detect


def parse_tesseract_lines(tsv: str) -> list[np.ndarray]:
    """Boxes of the level-4 (text line) rows of Tesseract's TSV output, in output order."""
    rows = csv.DictReader(tsv.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    return [box_points(int(row["left"]), int(row["top"]), int(row["left"]) + int(row["width"]),
                       int(row["top"]) + int(row["height"]))
            for row in rows if row["level"] == TESSERACT_LINE_LEVEL]


def run_detection(pages: Path, entries: list[PageEntry], pred_dir: Path, detector: Detector) -> dict[str, float]:
    """Detect lines on every page and write the prediction files; returns wall seconds per image
    (from the image file to polygons: decoding included, for both detectors alike)."""
    pred_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for entry in entries:
        start = time.perf_counter()
        lines = detector(pages / entry.image)
        seconds[entry.image] = time.perf_counter() - start
        prediction = {"image": entry.image, "seconds": seconds[entry.image],
                      "lines": [{"polygon": np.rint(line.polygon).astype(int).tolist()}
                                | ({} if line.baseline is None else {"baseline": np.rint(line.baseline).astype(int).tolist()})
                                for line in lines]}
        (pred_dir / (entry.image.replace("/", "__") + ".json")).write_text(json.dumps(prediction))
    return seconds


def load_prediction(pred_dir: Path, entry: PageEntry) -> list[DetectedLine]:
    data = json.loads((pred_dir / (entry.image.replace("/", "__") + ".json")).read_text())
    return [DetectedLine(np.asarray(line["polygon"], dtype=np.float64).reshape(-1, 2),
                         np.asarray(line["baseline"], dtype=np.float64) if "baseline" in line else None)
            for line in data["lines"]]


def score_annotated(path: Path, truth: list[XmlLine], predicted: list[np.ndarray]) -> dict:
    """Counts of the lenient score: predictions mostly outside the annotated area left out."""
    shares = inside_share(read_annotated_area(path, truth), predicted)
    kept = [points for points, share in zip(predicted, shares) if share >= ANNOTATED_SHARE]
    counts = score_page(truth, kept, 0.0)
    return {"n_pred_ann": counts["n_pred"], "tp_ann": counts["tp_poly"]}


def evaluate(pages: Path, entries: list[PageEntry], pred_dir: Path, seconds: dict[str, float]) -> dict:
    per_page, groups = {}, {}
    for entry in entries:
        truth, lines = read_page_xml(pages / entry.ground_truth).lines, load_prediction(pred_dir, entry)
        predicted = [line.polygon for line in lines]
        counts = {**score_page(truth, predicted, seconds[entry.image], [line.baseline for line in lines]),
                  **score_annotated(pages / entry.ground_truth, truth, predicted)}
        per_page[entry.image] = {**counts, "category": entry.category}
        for group in (CATEGORY_GROUPS.get(entry.category, entry.category), "overall"):
            add_counts(groups.setdefault(group, {}), counts)
    return {"pages": {image: {**rates({k: v for k, v in c.items() if k != "category"}), "category": c["category"]}
                      for image, c in per_page.items()},
            "groups": {name: rates(groups[name]) for name in sorted(groups, key=lambda n: (n == "overall", n))}}


def compare_with_reference(reference: Path, pages: Path, pred_dir: Path, ours: dict) -> list[str]:
    """Differences between the reference scorer's per-page counts and ours (empty: they agree)."""
    spec = importlib.util.spec_from_file_location("linedet_eval", reference)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    summary = module.run_eval(str(pages), str(pred_dir))
    differences = []
    for page in summary["pages"]:
        mine = ours["pages"].get(page["image"])
        if mine is None:
            differences.append(f"{page['image']}: scored by the reference only")
            continue
        for key in COMPARED_KEYS:
            if page[key] != mine[key]:
                differences.append(f"{page['image']}: {key} reference {page[key]} vs ours {mine[key]}")
    overall = summary["overall"]
    for ref_key, our_key in (("F1_poly", "f1"), ("tau", "tau"), ("tau_blk", "tau_blk")):
        theirs, mine = overall[ref_key], ours["groups"]["overall"][our_key]
        if (theirs is None) != (mine is None) or (theirs is not None and abs(theirs - mine) > 1e-9):
            differences.append(f"overall {ref_key}: reference {theirs} vs ours {mine}")
    return differences


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: dict[str, dict], title: str) -> str:
    lines = [f"| {title} | pages | GT | pred | P | R | F1 | F1 ann | tau | tau blk | baseline err | s/page |",
             "|---" * 12 + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['pages']} | {r['n_gt']} | {r['n_pred']} | {fmt(r['precision'])} | "
                     f"{fmt(r['recall'])} | {fmt(r['f1'])} | {fmt(r['f1_ann'])} | {fmt(r['tau'])} | "
                     f"{fmt(r['tau_blk'])} | {fmt(r['baseline_error'])} | {fmt(r['sec_per_page'], 2)} |")
    return "\n".join(lines)


def side_by_side(results: dict[str, dict]) -> str:
    """Per category: each detector's P / R / F1 / F1 ann / s/page next to the others'."""
    names = list(results)
    header = "| category | " + " | ".join(f"{n} P | {n} R | {n} F1 | {n} F1 ann | {n} s/page" for n in names) + " |"
    lines = [header, "|---" * (1 + 5 * len(names)) + "|"]
    for group in next(iter(results.values()))["groups"]:
        cells = []
        for name in names:
            r = results[name]["groups"][group]
            cells.append(f"{fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['f1'])} | {fmt(r['f1_ann'])} | "
                         f"{fmt(r['sec_per_page'], 2)}")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=Path, default=DEFAULT_PAGES, help="folder with manifest.tsv, images, XML")
    parser.add_argument("--manifest", type=Path, help="default: PAGES/manifest.tsv")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "out" / "linedet",
                        help="prediction JSONs go to OUT/<detector>/pred, the summary to OUT/summary.json")
    parser.add_argument("--dpi", type=int, default=300, help="resolution assumed for every scan")
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                        help="reference scorer to cross-check against (skipped when missing)")
    parser.add_argument("--tesseract", default="tesseract",
                        help="Tesseract executable to compare with; 'none' or not installed: skipped")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manifest = args.manifest or args.pages / "manifest.tsv"
    if not manifest.is_file():
        raise SystemExit(f"no manifest at {manifest}")
    entries = read_manifest(args.pages, manifest)
    if not entries:
        raise SystemExit(f"{manifest} lists no page with XML ground truth")
    detectors = {"ours": our_detector(args.dpi, DetectConfig())}
    tesseract = shutil.which(args.tesseract) if args.tesseract != "none" else None
    if tesseract is not None:
        detectors["tesseract"] = tesseract_detector(tesseract)
    results = {}
    for name, detector in detectors.items():
        pred_dir = args.out / name / "pred"
        results[name] = evaluate(args.pages, entries, pred_dir, run_detection(args.pages, entries, pred_dir, detector))
        print(f"\n{name}\n\n{table(results[name]['pages'], 'page')}\n\n{table(results[name]['groups'], 'category')}")
    if tesseract is None:
        print(f"\ntesseract ({args.tesseract}) not found: comparison skipped")
    print("\n" + side_by_side(results))
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    result, pred_dir = results["ours"], args.out / "ours" / "pred"
    if not args.reference.is_file():
        print(f"\nreference scorer not found at {args.reference}: cross-check skipped")
        return 0
    differences = compare_with_reference(args.reference, args.pages, pred_dir, result)
    if differences:
        print("\nDISAGREEMENT with the reference scorer:\n  " + "\n  ".join(differences))
        return 1
    print(f"\nreference scorer {args.reference.name} agrees on every page's counts and the overall F1 and taus")
    return 0


if __name__ == "__main__":
    sys.exit(main())
