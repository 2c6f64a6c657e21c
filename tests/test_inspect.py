"""``trocr-pipeline inspect`` on synthetic documents (real PDFs/TIFFs, real fonts) and a tiny TrOCR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config
from operators.errors import ExitCode
from pipeline.inspect import OVERLAY_MAX_SIDE, draw_overlay, inspect_documents
from operators.records import LineRecord
from operators.recognize import TrOCRRecognizer
from pipeline.synth.docs import load_ground_truth

DPI_OVERRIDE = "rasterize.dpi=150"  # the synthetic documents are drawn at 150 dpi


@pytest.fixture(scope="module")
def documents(synthetic_documents) -> list[Path]:
    """A PDF and a TIFF, one of them with several pages (kept few: every page is rendered)."""
    chosen = synthetic_documents[:2]
    assert {path.suffix for path in chosen} == {".pdf", ".tif"} and max(_page_counts(chosen)) > 1
    return chosen


@pytest.fixture(scope="module")
def input_folder(tmp_path_factory, documents) -> Path:
    folder = tmp_path_factory.mktemp("inspect-inputs")
    for document in documents:
        (folder / document.name).symlink_to(document)
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")  # truncated after the header
    return folder


def _page_counts(documents: list[Path]) -> list[int]:
    return [len(load_ground_truth(document)["pages"]) for document in documents]


def _coloured(image: Image.Image) -> np.ndarray:
    """Pixels whose channels differ: drawn overlay, never the grayscale page."""
    pixels = np.asarray(image, dtype=np.int16)
    return np.ptp(pixels, axis=2) > 40


def test_cli_writes_one_overlay_per_page_and_reports_the_failed_document(input_folder, documents, tmp_path, capsys):
    output = tmp_path / "overlays"
    code = main(["inspect", str(input_folder), "--output", str(output), "--set", DPI_OVERRIDE])
    printed = capsys.readouterr().out
    assert code == ExitCode.documents_failed
    failed = [line for line in printed.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "corrupt.pdf" in failed[0] and "corrupt_file" in failed[0]
    overlays = sorted(output.glob("*.png"))
    assert len(overlays) == sum(_page_counts(documents))
    for path in overlays:
        with Image.open(path) as overlay:
            assert max(overlay.size) <= OVERLAY_MAX_SIDE
            assert _coloured(overlay.convert("RGB")).any(), f"{path.name} shows no line"


def test_overlays_in_an_input_folder_are_not_inspected_again(documents, tmp_path, capsys):
    """With --output inside the input folder, a second inspect had read the first one's overlays as pages; with
    --output the input folder itself, the fix had found no input at all."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / documents[0].name).symlink_to(documents[0])
    same = tmp_path / "same"
    same.mkdir()
    (same / documents[0].name).symlink_to(documents[0])
    Image.new("L", (400, 300), 255).save(same / "letter-2024010500000001-p0001.png")  # a scan named like an overlay
    for inputs, output in ((folder, folder / "overlays"), (folder, folder / "overlays"), (same, same), (same, same)):
        main(["inspect", str(inputs), "--output", str(output), "--set", DPI_OVERRIDE, "--pages", "1"])
        written = 1 + (inputs == same)  # the scan named like an overlay is read too
        assert capsys.readouterr().out.splitlines()[-1] == f"{written} overlays written to {output}, 0 failed"


def test_a_long_source_name_gets_its_overlay_and_a_full_disk_stops_in_one_line(documents, tmp_path, small_disk,
                                                                               capsys):
    """A 251-byte source name (255 work) had given "File name too long", a traceback, and the files after it
    were not inspected; a full output disk a raw ENOSPC traceback."""
    long_name = tmp_path / ("x" * 247 + ".pdf")
    long_name.symlink_to(documents[0])
    command = ["inspect", str(long_name), "--set", DPI_OVERRIDE, "--pages", "1", "--output"]
    assert main([*command, str(tmp_path / "overlays")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"1 overlays written to {tmp_path / 'overlays'}, 0 failed"
    (small_disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 8192))
    assert main([*command, str(small_disk / "overlays")]) == ExitCode.write_failed
    assert f"no space left on the device while writing {small_disk / 'overlays'}/x" in capsys.readouterr().err


def test_pages_option_selects_the_pages_run_reads(documents, tmp_path, capsys):
    """``inspect --pages 2`` had drawn pages 1 and 2 (the first N), while ``run --pages 2`` reads page 2 alone, and
    ``--pages 1-2`` was refused: inspect takes the job's page ranges now."""
    document = next(path for path, count in zip(documents, _page_counts(documents)) if count > 1)
    assert main(["inspect", str(document), "--output", str(tmp_path), "--set", DPI_OVERRIDE, "--pages", "2"]) == 0
    assert [path.name[-9:] for path in tmp_path.glob("*.png")] == ["p0002.png"]
    config = load_config(None, [DPI_OVERRIDE, "rasterize.pages=1"])
    outcomes = list(inspect_documents([str(path) for path in documents], tmp_path, config))
    assert [outcome.page for outcome in outcomes] == [1] * len(documents)
    assert all(outcome.error is None and outcome.lines for outcome in outcomes)


def test_each_page_is_reported_as_soon_as_it_is_done(input_folder, documents, tmp_path):
    """inspect had triaged every input and drawn every page before it said anything: a folder of thousands of
    scans, or --recognize on CPU, gave no word for an hour. The corrupt file is reported when its turn comes."""
    config = load_config(None, [DPI_OVERRIDE])
    sources = [str(input_folder / "corrupt.pdf"), *(str(path) for path in documents)]
    outcomes = inspect_documents(sources, tmp_path, config)
    first = next(outcomes)
    assert first.page is None and "corrupt.pdf" in first.source and first.error.startswith("corrupt_file")
    assert list(tmp_path.glob("*.png")) == []  # no page drawn yet
    second = next(outcomes)
    assert second.overlay is not None and list(tmp_path.glob("*.png")) == [second.overlay]
    assert len([second, *outcomes]) == sum(_page_counts(documents))


def test_the_configured_page_selection_is_inspected_as_the_job_reads_it(documents, tmp_path):
    """``--set rasterize.pages=2`` (or a config file's ``pages``) had been ignored: every page was drawn."""
    document = next(path for path, count in zip(documents, _page_counts(documents)) if count > 1)
    config = load_config(None, [DPI_OVERRIDE, "rasterize.pages=2"])
    assert [outcome.page for outcome in inspect_documents([str(document)], tmp_path, config)] == [2]


def test_bad_pages_option_is_a_usage_error(input_folder, tmp_path):
    code = main(["inspect", str(input_folder), "--output", str(tmp_path), "--pages", "0"])
    assert code == ExitCode.bad_args


def test_recognize_adds_a_text_panel_beside_the_page(documents, tiny_model, tmp_path):
    config = load_config(None, [DPI_OVERRIDE, f"recognize.model={tiny_model}", "recognize.max_new_tokens=16",
                                "rasterize.pages=1"])
    plain, = inspect_documents([str(documents[0])], tmp_path / "plain", config)
    read, = inspect_documents([str(documents[0])], tmp_path / "read", config, TrOCRRecognizer(config.recognize))
    with Image.open(plain.overlay) as without_text, Image.open(read.overlay) as with_text:
        assert with_text.size == (2 * without_text.width, without_text.height)
        panel = np.asarray(with_text.convert("L"))[:, without_text.width:]
    assert (panel < 128).any(), "the text panel is blank"
    assert len(read.lines) == len(plain.lines) > 0


class _FailingRecognizer(TrOCRRecognizer):
    """A real recognizer whose model fails as a model bug would (not out of memory)."""

    def decode_with_backoff(self, lines):
        raise ValueError("a model bug")


def test_a_page_the_model_fails_on_is_reported_and_the_next_document_inspected(documents, tiny_model, tmp_path):
    """inspect had caught only RuntimeError: any other error from the model (a ValueError, numpy's MemoryError)
    ended the command with a traceback; the page now fails as the job records it."""
    config = load_config(None, [DPI_OVERRIDE, f"recognize.model={tiny_model}", "rasterize.pages=1"])
    outcomes = list(inspect_documents([str(path) for path in documents], tmp_path, config,
                                      _FailingRecognizer(config.recognize)))
    assert [outcome.error for outcome in outcomes] == ["recognition_failed: recognition failed: ValueError: "
                                                       "a model bug"] * 2
    assert not list(tmp_path.glob("*.png"))


def _page_with_one_line() -> tuple[np.ndarray, LineRecord]:
    page = np.full((400, 3200), 200, np.uint8)
    polygon = [(400, 100), (2800, 100), (2800, 180), (400, 180)]
    return page, LineRecord(bbox=(400, 100, 2801, 181), polygon=polygon, baseline=[(400, 165), (2800, 165)], block=0,
                            order=0)


def test_overlay_is_downscaled_and_draws_only_where_lines_are():
    page, line = _page_with_one_line()
    empty = draw_overlay(page, [])
    drawn = draw_overlay(page, [line])
    assert empty.size == drawn.size == (OVERLAY_MAX_SIDE, 200)
    assert not _coloured(empty).any()
    rows = np.flatnonzero(_coloured(drawn).any(axis=1))
    assert rows.min() >= 30 and rows.max() <= 95  # the label above the line and the outline at 50..90
    assert _coloured(drawn)[81:84, 300:1300].any(axis=0).all()  # the baseline at 82.5, inside the outline


def test_overlay_rejects_texts_that_do_not_match_the_lines():
    page, line = _page_with_one_line()
    with pytest.raises(ValueError, match="1 texts for 2 lines"):
        draw_overlay(page, [line, line], ["only one"])


def test_a_document_without_a_page_in_the_selection_is_named_not_passed_over(documents, tmp_path, capsys):
    """``inspect --pages 5`` on shorter documents had printed only "0 overlays written, 0 failed"."""
    code = main(["inspect", str(documents[0]), "--output", str(tmp_path), "--set", DPI_OVERRIDE, "--pages", "99"])
    printed = capsys.readouterr().out
    assert code == ExitCode.ok
    pages = _page_counts(documents[:1])[0]
    assert f"skipped {documents[0]}: none of its {pages} pages is in --pages 99" in printed, printed
    assert "0 overlays written to" in printed and "0 failed, 1 document without a page in --pages" in printed


def test_the_text_panel_draws_the_letters_the_models_read():
    """Pillow's own face had drawn ó, ü, ä, é and ſ as boxes ("con□mic J□rg-")."""
    from pipeline.inspect import text_font
    from pipeline.synth.fonts import missing_chars

    assert missing_chars(text_font(20), "óüäéſßçæœ") == frozenset()
