"""Read PAGE and ALTO XML: every text line's outline, text, block and baseline, in document order.

One reader for training data (``pipeline.train.data``), ``eval --pages`` and the line-detection
benchmark, so they agree on what a ground-truth line is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from lxml import etree
from PIL import Image

from operators.errors import ConfigError
from operators.ingest import open_image, page_frames


@dataclass(frozen=True)
class XmlLine:
    """One TextLine of a PAGE or ALTO file."""

    points: np.ndarray  # (N, 2) polygon in page pixels
    text: str  # PAGE: the line's TextEquiv of lowest index, else its Words' (or Glyphs'); ALTO: Strings and HYP
    block: int  # index of the enclosing TextBlock / TextRegion in document order, -1 for none
    baseline: np.ndarray | None = None  # (K, 2) polyline when the file has one


@dataclass(frozen=True)
class XmlPage:
    image_name: str  # Page/@imageFilename or ALTO fileName, as written in the file
    lines: list[XmlLine]
    size: tuple[int, int] | None = None  # the page's width and height in pixels, as the file gives them
    turn: int = 0  # degrees clockwise the named image was turned for the coordinates (this tool's exports say so)


def page_xml_files(path: Path) -> list[Path]:
    """One PAGE/ALTO file, or every .xml file of a folder."""
    if not path.exists():
        raise ConfigError(f"page source {path} does not exist")
    files = sorted(path.glob("*.xml")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"page source {path}: no PAGE/ALTO .xml file found")
    return files


def read_page_xml(xml_path: Path) -> XmlPage:
    """Every TextLine with an outline, in document order (the ground truth's reading order)."""
    try:
        root = etree.parse(str(xml_path)).getroot()
    except (OSError, etree.XMLSyntaxError) as exc:
        raise ConfigError(f"{xml_path} is no PAGE or ALTO file: {exc}") from exc
    kind = local_name(root)
    if kind.lower() == "alto":
        unit = list(root.iter("{*}MeasurementUnit"))
        if unit and (unit[0].text or "").strip() != "pixel":
            raise ConfigError(f"{xml_path}: ALTO MeasurementUnit {unit[0].text!r} is not supported, only pixel")
        geometry, text_of, block_tags = alto_geometry, _alto_text, ("TextBlock",)
        file_name = list(root.iter("{*}fileName"))
        image_name = (file_name[0].text or "").strip() if file_name else ""
        page = next(root.iter("{*}Page"), None)
        size = _pixels(page, "WIDTH", "HEIGHT")
        turn = next((int(found.group(1)) for settings in root.iter("{*}processingStepSettings")
                     if (found := re.fullmatch(r"rotation: (\d+)", (settings.text or "").strip()))), 0)
    elif kind == "PcGts":
        geometry, text_of, block_tags = page_geometry, _page_text, ("TextRegion",)
        page = next(root.iter("{*}Page"))
        image_name, size = page.get("imageFilename", ""), _pixels(page, "imageWidth", "imageHeight")
        turn = next((int(label.get("value")) for label in root.iter("{*}Label")
                     if label.get("type") == "rotation" and (label.get("value") or "").isdigit()), 0)
    else:
        raise ConfigError(f"{xml_path}: root element {kind!r} is neither PAGE (PcGts) nor ALTO (alto)")
    lines = list(root.iter("{*}TextLine"))
    if kind == "PcGts":
        lines = _in_reading_order(root, lines)
    found = []
    for line, block in zip(lines, block_indices(lines, block_tags)):
        points = geometry(line)
        if points is not None:
            found.append(XmlLine(points, text_of(line), block, baseline_of(line)))
    return XmlPage(image_name, found, size, turn)


def _pixels(page, width: str, height: str) -> tuple[int, int] | None:
    try:
        return round(float(page.get(width))), round(float(page.get(height)))
    except (AttributeError, TypeError, ValueError):
        return None


def _in_reading_order(root, lines: list) -> list:
    """PAGE lines ordered by their region's place in the file's ReadingOrder (groups by @index, nested groups
    in place); regions it leaves out follow, in document order. Without one: document order."""
    order = next(root.iter("{*}ReadingOrder"), None)
    if order is None:
        return lines
    place = {region: rank for rank, region in enumerate(_region_refs(order))}

    def region_rank(line) -> int:
        region = enclosing_block(line, ("TextRegion",))
        while region is not None and region.get("id") not in place:
            region = enclosing_block(region, ("TextRegion",))
        return len(place) if region is None else place[region.get("id")]

    return sorted(lines, key=region_rank)


def _region_refs(group) -> list[str]:
    """The region ids of a ReadingOrder group, its members sorted by @index where they have one."""
    members = sorted((child for child in group if child.get("regionRef") or local_name(child).endswith("Group")),
                     key=lambda child: _index(child.get("index")))
    refs = []
    for member in members:
        if member.get("regionRef"):
            refs.append(member.get("regionRef"))
        refs.extend(_region_refs(member))
    return refs


def page_image(xml_path: Path, image_name: str) -> Path:
    """The page image a PAGE/ALTO file names (a path, or a relative URL as in an OCR-D workspace), looked for
    beside it and one folder up."""
    folder = xml_path.parent
    candidates = [folder / image_name, folder.parent / image_name, folder / Path(image_name).name,
                  folder / unquote(image_name)]
    image_path = next((path for path in candidates if image_name and path.is_file()), None)
    if image_path is None:
        raise ConfigError(f"{xml_path}: page image {image_name!r} not found next to it")
    return image_path


def check_page_image(xml_path: Path, page: XmlPage, image_path: Path, coordinates: bool = True) -> None:
    """Refuse an image that is not the one page the file describes: a PDF, or an image of several pages as the job
    counts them (this tool's PAGE and ALTO exports without METS name the source file: page 1 of a TIFF had been cut
    by page 2's lines, and trained on and scored against their text); with ``coordinates`` (lines cut by them), one
    the file says was turned to read upright. Its size is checked once it is read (:func:`check_page_size`); an
    image that cannot be opened is left to the reader to report."""
    advice = ("export with mets (`--export page,mets`), whose PAGE and ALTO files each name the image of their page "
              "as the job read it")
    try:
        with open(image_path, "rb") as handle:
            is_pdf = handle.read(5) == b"%PDF-"
        if not is_pdf:
            with open_image(str(image_path)) as image:
                frames = len(page_frames(image))  # a camera's MPO or a TIFF's thumbnails are one page
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return
    if is_pdf:
        raise ConfigError(f"{xml_path} names a PDF, {image_path}: which page, rendered how, it does not say; {advice}")
    if frames > 1:
        raise ConfigError(f"{xml_path} names {image_path}, an image of {frames} pages, and does not say which; {advice}")
    if coordinates and page.turn:
        raise ConfigError(f"{xml_path}: its coordinates are pixels of {image_path} turned {page.turn} degrees "
                          f"clockwise, not of the image; {advice}")


def check_page_size(xml_path: Path, page: XmlPage, image_path: Path, shape: tuple[int, ...]) -> None:
    """Refuse a page image, as read (upright), of another size than the file gives: its lines would be cut from the
    wrong pixels."""
    if page.size is not None and page.size != (shape[1], shape[0]):
        raise ConfigError(f"{xml_path} describes a {page.size[0]}x{page.size[1]} px page, and its image {image_path} "
                          f"is {shape[1]}x{shape[0]} px as read")


def _page_text(element, parts: tuple[str, ...] = ("Word", "Glyph")) -> str:
    """The element's own TextEquiv of lowest index (PAGE's main text; the first where none has an index);
    without one, its Words' texts joined by spaces (a Word's: its Glyphs' joined)."""
    equivs = [child for child in element if local_name(child) == "TextEquiv"]
    if equivs:
        chosen = min(equivs, key=lambda equiv: _index(equiv.get("index")))
        unicode = [child for child in chosen if local_name(child) == "Unicode"]
        return (unicode[0].text or "").strip() if unicode else ""
    if not parts:
        return ""
    inner = [_page_text(child, parts[1:]) for child in element if local_name(child) == parts[0]]
    return (" " if parts[0] == "Word" else "").join(text for text in inner if text)


def _index(value: str | None) -> float:
    try:
        return int(value)
    except (TypeError, ValueError):
        return float("inf")


def _alto_text(line) -> str:
    """The Strings' CONTENT joined by spaces, a line-end hyphen (HYP) kept on the word it ends."""
    words: list[str] = []
    for element in line.iter("{*}String", "{*}HYP"):
        if local_name(element) == "HYP" and words:
            words[-1] += element.get("CONTENT", "")
        else:
            words.append(element.get("CONTENT", ""))
    return " ".join(words).strip()


def local_name(element) -> str:
    return etree.QName(element).localname


def parse_points(text: str) -> np.ndarray:
    """'x y x y ...' (ALTO) or 'x,y x,y ...' (PAGE) -> (N, 2) float array."""
    numbers = [float(value) for value in text.replace(",", " ").split()]
    return np.array(numbers[: len(numbers) // 2 * 2], dtype=np.float64).reshape(-1, 2)


def box_points(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def has_area(points: np.ndarray) -> bool:
    if len(points) < 3:
        return False
    x, y = points[:, 0], points[:, 1]
    return abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) > 1e-6


def enclosing_block(line, block_tags: tuple[str, ...]):
    parent = line.getparent()
    while parent is not None and local_name(parent) not in block_tags:
        parent = parent.getparent()
    return parent


def block_indices(lines: list, block_tags: tuple[str, ...]) -> list[int]:
    """Index of each line's enclosing block, numbered in document order (-1 for none)."""
    ids: dict[str, int] = {}
    indices = []
    for line in lines:
        block = enclosing_block(line, block_tags)
        key = None if block is None else block.getroottree().getpath(block)
        indices.append(-1 if key is None else ids.setdefault(key, len(ids)))
    return indices


def alto_geometry(line) -> np.ndarray | None:
    """The line's own Shape/Polygon points (not its words'), else its HPOS/VPOS/WIDTH/HEIGHT box, else the
    polygon's box."""
    points = _alto_polygon(line)
    if has_area(points):
        return points
    box = alto_box(line)
    if box is not None:
        return box
    return box_points(*points.min(axis=0), *points.max(axis=0)) if len(points) else None


def _alto_polygon(element) -> np.ndarray:
    """The points of an ALTO element's own Shape/Polygon (its children's shapes are theirs); (0, 2) without."""
    for shape in (child for child in element if local_name(child) == "Shape"):
        for polygon in (child for child in shape if local_name(child) == "Polygon"):
            return parse_points(polygon.get("POINTS", ""))
    return np.zeros((0, 2))


def alto_box(element) -> np.ndarray | None:
    """The HPOS/VPOS/WIDTH/HEIGHT box of an ALTO element; None when it has no complete one."""
    try:
        x, y = float(element.get("HPOS")), float(element.get("VPOS"))
        return box_points(x, y, x + float(element.get("WIDTH")), y + float(element.get("HEIGHT")))
    except (TypeError, ValueError):
        return None


def page_geometry(line) -> np.ndarray | None:
    """TextLine/Coords@points (or PAGE 2010 Coords/Point); a degenerate outline becomes its box."""
    coords = [child for child in line if local_name(child) == "Coords"]
    if not coords:
        return None
    if coords[0].get("points"):
        points = parse_points(coords[0].get("points"))
    else:
        points = np.array([[float(p.get("x")), float(p.get("y"))] for p in coords[0] if local_name(p) == "Point"])
    if len(points) == 0:
        return None
    return points if has_area(points) else box_points(*points.min(axis=0), *points.max(axis=0))


def baseline_of(line) -> np.ndarray | None:
    """ALTO 4 TextLine@BASELINE as points, or PAGE TextLine/Baseline@points; None without two points
    (ALTO 2/3 give a single height, which says nothing about where the line runs)."""
    text = line.get("BASELINE")
    if text is None:
        text = next((child.get("points", "") for child in line if local_name(child) == "Baseline"), "")
    points = parse_points(text)
    return points if len(points) >= 2 and np.ptp(points[:, 0]) > 0 else None


def block_geometry(block) -> np.ndarray | None:
    """A TextRegion's Coords, or a TextBlock's own Shape/Polygon, else its HPOS/VPOS/WIDTH/HEIGHT box."""
    if local_name(block) == "TextRegion":
        return page_geometry(block)
    points = _alto_polygon(block)
    return points if has_area(points) else alto_box(block)
