"""Find the Debian font files usable for synthetic text, by kind.

Fonts are chosen from an explicit allow-list of family names (read from the font file itself, not
guessed from its file name), so an unexpected font installed on the machine never leaks into the
training data. Each font records which characters of :data:`CHARSET` it lacks; a line is only ever
rendered with a font that has a glyph for every character of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

from pipeline.synth.corpus import CHARSET

FONT_ROOT = Path("/usr/share/fonts")
FONT_KINDS = ("printed", "handwritten", "historical", "all", "heldout")  # all: printed and handwritten

#: family name (as stored in the font) -> Debian package that installs it.
PRINTED_FAMILIES: dict[str, str] = {
    "DejaVu Sans": "fonts-dejavu-core",
    "DejaVu Serif": "fonts-dejavu-core",
    "DejaVu Sans Mono": "fonts-dejavu-core",
    "Liberation Sans": "fonts-liberation",
    "Liberation Sans Narrow": "fonts-liberation",
    "Liberation Serif": "fonts-liberation",
    "Liberation Mono": "fonts-liberation",
    "FreeSans": "fonts-freefont-ttf",
    "FreeSerif": "fonts-freefont-ttf",
    "FreeMono": "fonts-freefont-ttf",
    "Courier Prime": "fonts-courier-prime",
    "Courier Prime Code": "fonts-courier-prime",
    "Courier Prime Sans": "fonts-courier-prime",
    "GNUTypewriter": "fonts-gnutypewriter",
    "EB Garamond": "fonts-ebgaramond",
    "Caladea": "fonts-crosextra-caladea",
    "Carlito": "fonts-crosextra-carlito",
    "Open Sans": "fonts-open-sans",
    "Open Sans Condensed": "fonts-open-sans",
    "Lato": "fonts-lato",
}
#: Printed families that no model is trained on, for measuring how a model reads fonts it never saw
#: (``bench/heldout_fonts.py``); designs unlike the printed families above (no Times, Helvetica or
#: Courier clone). Only the font kind "heldout" uses them.
HELDOUT_FAMILIES: dict[str, str] = {
    "C059": "fonts-urw-base35",  # Century Schoolbook
    "P052": "fonts-urw-base35",  # Palatino
    "URW Bookman": "fonts-urw-base35",
    "URW Gothic": "fonts-urw-base35",  # Avant Garde
    "Linux Libertine O": "fonts-linuxlibertine",
    "Linux Biolinum O": "fonts-linuxlibertine",
}
#: Blackletter and early-modern faces for the historical print of archives (issue 12), a font kind of
#: their own so that a training mix sets their share and the printed kind's lines stay as they were.
HISTORICAL_FAMILIES: dict[str, str] = {
    "Blankenburg_UNZ1A": "fonts-blankenburg",  # blackletter
    "Junicode Two Beta": "fonts-junicode",  # early-modern Antiqua, after 17th-century type
}
#: Styles kept of the historical families: Junicode ships ~40 widths and weights, which would drown the
#: single blackletter face in a uniform pick.
HISTORICAL_STYLES = frozenset({"Regular", "Italic", "Bold"})
HANDWRITTEN_FAMILIES: dict[str, str] = {
    "DkgHandwriting": "fonts-dkg-handwriting",
    "femkeklaver": "fonts-femkeklaver",
    "Humor Sans": "fonts-humor-sans",
    "Dancing Script": "fonts-dancingscript",
    "Kristi": "fonts-kristi",
    "Comic Neue": "fonts-comic-neue",
}
#: Glyphs that exist but draw another character (checked by eye): never render these with that family.
MISLEADING_GLYPHS: dict[str, str] = {
    "GNUTypewriter": "()[]{}'`",  # brackets drawn as slashes, straight quote as a curly one
    "Humor Sans": "£€",  # drawn as a quill and a face
}
#: Families whose lower-case letters are small capitals: text is upper-cased before rendering.
UPPERCASE_ONLY_FAMILIES = frozenset({"Humor Sans"})
#: Hairline faces vanish at 24 px once blurred or binarized: never use them.
TOO_THIN_STYLES = ("hairline", "thin", "extralight")
#: A font missing any of these is not a text font for our purposes and is dropped entirely.
REQUIRED_CHARS = "".join(c for c in CHARSET if c.isascii() and c.isalnum())
#: Size at which glyph presence is probed; any size works, this one is cheap and unambiguous.
PROBE_SIZE_PX = 32
#: A private-use code point no text font maps: its mask is the font's "missing glyph" mask.
UNMAPPED_CHAR = "\ue000"


class FontsNotFound(RuntimeError):
    """No usable font of the requested kind is installed."""


@dataclass(frozen=True)
class FontFace:
    path: Path
    name: str  # file stem, unique per face: "LiberationSerif-Italic"
    family: str
    kind: str  # "printed" or "handwritten"
    missing: frozenset[str]  # characters of CHARSET this face cannot render truthfully
    uppercase_only: bool = False

    def shown(self, text: str) -> str:
        """The text as this face shows it, i.e. the ground truth of an image rendered with it."""
        return text.upper() if self.uppercase_only else text

    def covers(self, text: str) -> bool:
        return self.missing.isdisjoint(text)


def _mask_key(font: ImageFont.FreeTypeFont, char: str) -> tuple:
    mask = font.getmask(char)
    return mask.size, bytes(mask)


def missing_chars(font: ImageFont.FreeTypeFont, chars: str) -> frozenset[str]:
    """Characters drawn as the missing-glyph shape or as nothing (Pillow has no cmap API)."""
    missing_glyph = _mask_key(font, UNMAPPED_CHAR)

    def is_missing(char: str) -> bool:
        key = _mask_key(font, char)
        return key == missing_glyph or not any(key[1])

    return frozenset(c for c in chars if not c.isspace() and is_missing(c))


def _unusable_chars(font: ImageFont.FreeTypeFont, family: str) -> frozenset[str]:
    unusable = missing_chars(font, CHARSET) | frozenset(MISLEADING_GLYPHS.get(family, ""))
    if family in UPPERCASE_ONLY_FAMILIES:  # its upper-cased text must stay inside CHARSET and the face
        unusable |= frozenset(c for c in CHARSET if c.upper() not in CHARSET or c.upper() in unusable)
    return unusable


#: The families of each font kind but "all", which is the kinds of ``ALL_KINDS`` together.
FAMILIES_BY_KIND: dict[str, dict[str, str]] = {
    "printed": PRINTED_FAMILIES, "handwritten": HANDWRITTEN_FAMILIES, "historical": HISTORICAL_FAMILIES,
    "heldout": HELDOUT_FAMILIES,
}
ALL_KINDS = ("printed", "handwritten")


def _kind_of(family: str) -> str | None:
    return next((kind for kind, families in FAMILIES_BY_KIND.items() if family in families), None)


def _face(path: Path) -> FontFace | None:
    try:
        font = ImageFont.truetype(str(path), PROBE_SIZE_PX, layout_engine=ImageFont.Layout.BASIC)
    except OSError:
        return None
    family, style = font.getname()
    kind = _kind_of(family or "")
    if kind is None or any(word in (style or "").lower().replace(" ", "") for word in TOO_THIN_STYLES):
        return None
    if kind == "historical" and style not in HISTORICAL_STYLES:
        return None
    missing = _unusable_chars(font, family)
    if not missing.isdisjoint(REQUIRED_CHARS):
        return None
    return FontFace(path=path, name=path.stem, family=family, kind=kind, missing=missing,
                    uppercase_only=family in UPPERCASE_ONLY_FAMILIES)


@lru_cache(maxsize=None)
def _all_faces(root: Path) -> tuple[FontFace, ...]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
    return tuple(face for face in map(_face, paths) if face is not None)


def _packages(kind: str) -> list[str]:
    wanted = ALL_KINDS if kind == "all" else (kind,)
    return sorted({package for name in wanted for package in FAMILIES_BY_KIND[name].values()})


def discover_fonts(kind: str = "printed", root: Path = FONT_ROOT) -> tuple[FontFace, ...]:
    """Usable faces of ``kind`` ("printed", "handwritten", "historical", "all" of the first two, or
    "heldout"), sorted by path for determinism."""
    if kind not in FONT_KINDS:
        raise ValueError(f"font kind must be one of {FONT_KINDS}, got {kind!r}")
    wanted = ALL_KINDS if kind == "all" else (kind,)
    faces = tuple(face for face in _all_faces(Path(root)) if face.kind in wanted)
    if not faces:
        raise FontsNotFound(
            f"no {kind} fonts found under {root}; install the Debian packages: "
            f"apt-get install {' '.join(_packages(kind))}"
        )
    return faces


@lru_cache(maxsize=1024)
def load_font(path: Path, size_px: int) -> ImageFont.FreeTypeFont:
    """A face at a pixel size, cached: opening a font file costs more than rendering a line."""
    return ImageFont.truetype(str(path), size_px, layout_engine=ImageFont.Layout.BASIC)
