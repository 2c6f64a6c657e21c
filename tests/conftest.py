"""Session-scoped fixtures: real files, a real local Ray instance, tiny random-weight models.

Nothing here needs the network, a GPU or ../shared: every input is built by the project itself.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree
from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf"


def text_page(lines: list[str], size: tuple[int, int] = (1240, 1754), font_px: int = 28) -> Image.Image:
    """A plain one-column 150-dpi page with the given lines, for small format tests."""
    page = Image.new("L", size, 255)
    draw = ImageDraw.Draw(page)
    font = ImageFont.truetype(FONT, font_px)
    for index, line in enumerate(lines):
        draw.text((120, 150 + index * int(font_px * 1.8)), line, font=font, fill=20)
    return page


def write_pdf(path: Path, pages: list[Image.Image], dpi: int = 150) -> Path:
    first, *rest = [page.copy() for page in pages]  # Pillow keeps encoder state on saved images
    first.save(path, save_all=True, append_images=rest, resolution=dpi)
    return path


@pytest.fixture(scope="session")
def page_images() -> list[Image.Image]:
    return [text_page([f"Page {n} of the test document", "A second line of text here."]) for n in (1, 2, 3)]


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (jobs reuse it instead of starting their own)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def joining_ray_local(ray_local) -> dict[str, str]:
    """The environment of a job subprocess that joins the session's Ray instance, as ``ray job submit`` has a job
    join its cluster, instead of taking seconds to start its own (for tests where which instance is no matter)."""
    return {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}


@pytest.fixture
def names_synced(monkeypatch) -> Callable[[Path], list[str]]:
    """The real ``os.fsync``, noting each file it is given; returns the names a file (known by its inode and size,
    which a rename keeps) had when it was synced, to tell a sync under the staging name from one after the rename."""
    synced: dict[tuple[int, int], list[str]] = {}
    fsync = os.fsync

    def noting_fsync(descriptor: int) -> None:
        status = os.fstat(descriptor)
        synced.setdefault((status.st_ino, status.st_size), []).append(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", noting_fsync)
    return lambda path: synced.get((path.stat().st_ino, path.stat().st_size), [])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from helpers import build_tiny_random_trocr

    return build_tiny_random_trocr(tmp_path_factory.mktemp("models") / "tiny-vit-roberta")


@pytest.fixture(scope="session")
def synthetic_documents(tmp_path_factory) -> list[Path]:
    from pipeline.synth.docs import write_document_set

    folder = tmp_path_factory.mktemp("synthetic-docs")
    return write_document_set(folder, count=4, seed=11, dpi=150, formats=("pdf", "tiff"),
                              pages_per_document=(1, 3), two_column_share=0.5)


def box_iou(a, b) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes."""
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


SCHEMAS = Path(__file__).resolve().parent / "schemas"


def official_schema(name: str) -> etree.XMLSchema:
    """An official export schema from tests/schemas, its xlink import resolved to the local copy
    (ALTO imports it by URL, and tests have no network)."""

    class LocalXlink(etree.Resolver):
        def resolve(self, url, public_id, context):
            return self.resolve_filename(str(SCHEMAS / "xlink.xsd"), context) if "xlink" in url else None

    parser = etree.XMLParser()
    parser.resolvers.add(LocalXlink())
    return etree.XMLSchema(etree.parse(str(SCHEMAS / name), parser))


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs, as the output disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)
