"""Rasterize real PDFs with real poppler, and images in every Pillow mode archives produce."""

from __future__ import annotations

import os
from dataclasses import replace

import cv2
import numpy as np
import pikepdf
import pytest
import tifffile
from PIL import Image

from conftest import text_page, write_pdf
from operators.ingest import DocumentPlan, triage
from operators.rasterize import PageRange, page_ranges, rasterize, to_gray8
from operators.settings import RasterizeConfig


def _plan(pages: int, error=None) -> DocumentPlan:
    return DocumentPlan(doc_id=f"id{pages}", source=f"doc{pages}.pdf", kind="pdf", num_pages=pages, error=error)


def test_page_ranges_cover_every_page_once():
    ranges = page_ranges([_plan(1), _plan(10), _plan(0)], pages_per_task=4)
    covered = [(r.source, p) for r in ranges for p in range(r.first, r.last + 1)]
    assert covered == [("doc1.pdf", 1)] + [("doc10.pdf", p) for p in range(1, 11)]
    assert max(r.last - r.first + 1 for r in ranges) == 4


def test_pdf_range_renders_gray_pages_at_dpi(tmp_path, page_images):
    path = write_pdf(tmp_path / "doc.pdf", page_images, dpi=150)
    pages = rasterize(PageRange("id", str(path), "pdf", 2, 3), RasterizeConfig(dpi=150))
    assert [p.page for p in pages] == [2, 3]
    for work in pages:
        assert work.status == "ok"
        assert work.image.dtype == np.uint8 and work.image.ndim == 2
        assert (work.width, work.height) == page_images[0].size
        assert work.image.min() < 100  # the text is there


def test_poppler_timeout_fails_the_range_with_a_reason(tmp_path, page_images):
    path = write_pdf(tmp_path / "doc.pdf", page_images)
    pages = rasterize(PageRange("id", str(path), "pdf", 1, 3), RasterizeConfig(dpi=600, render_timeout_s=0.01))
    assert [(p.page, p.status, p.error_code) for p in pages] == [(n, "failed", "render_timeout") for n in (1, 2, 3)]
    assert all(p.image is None for p in pages)


def test_pages_poppler_does_not_render_fail_as_count_mismatch(tmp_path, page_images):
    """The page tree holds 3 pages but /Count says 2: poppler renders 2, the third is recorded."""
    path = write_pdf(tmp_path / "doc.pdf", page_images, dpi=150)
    path.write_bytes(path.read_bytes().replace(b"/Count 3", b"/Count 2"))
    pages = rasterize(PageRange("id", str(path), "pdf", 1, 3), RasterizeConfig(dpi=100))
    assert [(p.page, p.status, p.error_code) for p in pages] == [
        (1, "ok", None), (2, "ok", None), (3, "failed", "page_count_mismatch")]


def test_a_pdf_page_of_a_larger_user_unit_renders_at_its_real_size_and_counts_it_against_the_pixel_limit(
        tmp_path, page_images):
    """/UserUnit 2 makes a unit 2/72 inch, which poppler ignores: the page had been rendered at half the requested
    dpi (recorded as the requested one all the same) and checked against rasterize.max_page_pixels at that."""
    with pikepdf.open(write_pdf(tmp_path / "doc.pdf", page_images, dpi=150)) as pdf:
        pdf.pages[1].obj.UserUnit = 2
        pdf.Root.Pages.UserUnit = 3  # not inherited: a page's own entry
        pdf.save(tmp_path / "units.pdf")
    config = RasterizeConfig(dpi=75)
    plan = triage(str(tmp_path / "units.pdf"), config)
    assert (plan.error, plan.oversized_pages) == (None, ())
    width, height = page_images[0].size[0] // 2, page_images[0].size[1] // 2  # 150 dpi pages at 75
    [task] = page_ranges([plan], pages_per_task=8)  # one range: each unit gets its own poppler call
    works = rasterize(task, config)
    assert [(work.page, work.status, work.width, work.height, work.dpi) for work in works] == [
        (1, "ok", width, height, 75), (2, "ok", 2 * width, 2 * height, 75), (3, "ok", width, height, 75)]
    assert works[1].image.min() < 100  # the text is there
    limited = triage(str(tmp_path / "units.pdf"), RasterizeConfig(dpi=75, max_page_pixels=4 * width * height - 1))
    assert [(page, why.split(",")[0]) for page, why in limited.oversized_pages] == [
        (2, f"page 2 would be {2 * width}x{2 * height} px at 75 dpi")]


def _mode_image(mode: str) -> Image.Image:
    base = Image.new("L", (64, 32), 255)
    base.paste(0, (10, 10, 30, 20))
    if mode == "I;16":
        return Image.fromarray((np.asarray(base, dtype=np.uint16) * 257).astype(np.uint16))
    if mode == "RGBA":
        image = base.convert("RGBA")
        image.putalpha(Image.new("L", base.size, 255).point(lambda v: v))
        transparent = Image.new("RGBA", base.size, (0, 0, 0, 0))
        transparent.paste(image.crop((0, 0, 40, 32)), (0, 0))
        return transparent  # right part fully transparent black: must come out as white paper
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "I;16", "RGBA", "LA"])
def test_every_image_mode_becomes_8bit_gray(mode):
    gray = to_gray8(_mode_image(mode))
    assert gray.dtype == np.uint8 and gray.shape == (32, 64)
    assert gray[15, 20] < 60, "ink stays dark"
    assert gray[2, 2] > 200, "paper stays light"
    assert gray[2, 60] > 200, "transparent areas become paper"


def test_deep_samples_are_scaled_from_their_bit_depth_and_a_min_is_white_tiff_is_inverted(tmp_path):
    """A blank page scanned at 16 bits had its paper noise stretched to full contrast (729 made-up lines); a
    16-bit min-is-white TIFF came out white text on black; CIELab and premultiplied-alpha gray failed."""
    noise = np.random.default_rng(0).normal(58000, 120, (64, 64)).clip(0, 65535).astype(np.uint16)
    assert np.ptp(to_gray8(Image.fromarray(noise))) <= 3
    twelve_bit = np.full((8, 8), 4000, np.uint16)
    twelve_bit[2:4] = 100
    assert to_gray8(Image.fromarray(twelve_bit))[0, 0] > 240 and to_gray8(Image.fromarray(twelve_bit))[2, 0] < 10
    page = np.full((16, 16), 1000, np.uint16)  # min-is-white: low values are paper
    page[4:8] = 60000
    Image.fromarray(page).save(tmp_path / "miw.tif", tiffinfo={262: 0})
    with Image.open(tmp_path / "miw.tif") as image:
        gray = to_gray8(image)
    assert gray[0, 0] > 240 and gray[5, 0] < 30
    assert to_gray8(Image.new("LAB", (4, 4), (200, 128, 128)))[0, 0] == 200
    assert to_gray8(Image.new("La", (4, 4), (0, 0)))[0, 0] == 255  # fully transparent: paper


@pytest.mark.parametrize("name", ["contiguous.tif", "planar.tif", "turned-planar.tif", "lzw.tif", "lzw-planar.tif",
                                  "deflate-planar.tif", "page.png"])
def test_16_bit_colour_holding_12_bit_values_is_read_as_the_page_it_was_made_from(tmp_path, name):
    """Pillow cuts 16-bit colour to its high byte, so the scaling 16-bit gray gets never saw the values: 12-bit ones
    (a camera's, some scanners') came out black, and an uncompressed TIFF of separate planes garbled (each plane
    read as 8-bit); each page was ok, with no lines."""
    page = np.asarray(text_page(["Twelve bits in sixteen, read as drawn."], size=(700, 240)))
    samples = np.dstack([page.astype(np.uint16) * 16] * 3)
    samples[:20, :20] = (4080, 0, 0)  # red: gray 76 (blue, were the channels swapped, 29)
    expected = page.copy()
    expected[:20, :20] = 76
    source = tmp_path / name
    if name == "page.png":
        cv2.imwrite(str(source), samples[..., ::-1])  # OpenCV writes RGB as BGR
    else:
        planar = "planar" in name
        stored = np.rot90(samples) if name.startswith("turned") else samples  # a quarter turn back, tagged 6
        tifffile.imwrite(source, np.moveaxis(stored, -1, 0) if planar else stored, photometric="rgb",
                         planarconfig="separate" if planar else "contig", resolution=(150, 150),
                         compression="lzw" if name.startswith("lzw") else "zlib" if name.startswith("deflate") else None,
                         extratags=[(274, "H", 1, 6 if name.startswith("turned") else 1, True)])
    [work] = rasterize(PageRange("id", str(source), "png" if name.endswith("png") else "tiff", 1, 1),
                       RasterizeConfig(dpi=150, detect_orientation=False))
    assert (work.status, work.rotation) == ("ok", 90 if name.startswith("turned") else 0)
    assert np.abs(work.image.astype(int) - expected).max() <= 1


def test_a_tiff_without_a_usable_resolution_is_read_at_the_configured_dpi(tmp_path, page_images):
    """A resolution of 0/0 had failed the page (NaN)."""
    from PIL.TiffImagePlugin import IFDRational

    page_images[0].copy().save(tmp_path / "zero.tif", tiffinfo={282: IFDRational(0, 0), 283: IFDRational(0, 0), 296: 2})
    [page] = rasterize(PageRange("id", str(tmp_path / "zero.tif"), "tiff", 1, 1), RasterizeConfig(dpi=200))
    assert (page.status, page.dpi) == ("ok", 200)


def test_multipage_tiff_pages_and_dpi(tmp_path, page_images):
    path = tmp_path / "scan.tif"
    page_images[0].save(path, save_all=True, append_images=page_images[1:], dpi=(200, 200))
    pages = rasterize(PageRange("id", str(path), "tiff", 1, 3), RasterizeConfig(dpi=300))
    assert [(p.page, p.status, p.dpi) for p in pages] == [(1, "ok", 200), (2, "ok", 200), (3, "ok", 200)]


def test_implausible_image_dpi_falls_back_to_config(tmp_path, page_images):
    path = tmp_path / "scan.png"
    page_images[0].save(path, dpi=(72, 72))
    (work,) = rasterize(PageRange("id", str(path), "png", 1, 1), RasterizeConfig(dpi=300))
    assert work.dpi == 300


def test_a_file_changed_or_deleted_after_triage_fails_as_changed(tmp_path, page_images):
    """A scanner writing into a hot folder replaces a file between triage and rendering: its pages had been read
    from the new bytes under the old bytes' doc_id, or failed as damaged (render_failed) where pages were gone."""
    path = tmp_path / "scan.tif"
    page_images[0].copy().save(path, save_all=True, append_images=[image.copy() for image in page_images[1:]])
    config = RasterizeConfig(dpi=150, detect_orientation=False)
    plan = triage(str(path), config)
    [task] = page_ranges([plan], pages_per_task=8)
    os.utime(path, ns=(plan.stamp[1] + 10**9, plan.stamp[1] + 10**9))  # touched: it had been said to be written to
    assert "its modification time changed, its size did not" in rasterize(task, config)[0].error_message
    page_images[1].copy().save(path)
    assert [(work.status, work.error_code) for work in rasterize(task, config)] == [("failed", "source_changed")] * 3
    assert [work.status for work in rasterize(replace(task, stamp=None), config)] == ["ok"] + ["failed"] * 2
    assert "no longer in the file" in rasterize(replace(task, stamp=None), config)[2].error_message
    path.unlink()
    assert "deleted" in rasterize(task, config)[0].error_message
