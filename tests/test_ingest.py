"""Ingest and triage on real files built here: good and broken PDFs, TIFFs, PNGs and JPEGs."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pikepdf
import pytest
from PIL import Image

from conftest import write_pdf
import operators.ingest
from operators.ingest import (IN_THE_OUTPUT, NEW_SUBFILE_TYPE, SUBFILE_TYPE, KnownDocument, find_inputs,
                              local_document_of_bytes, page_frames, sniff_kind, source_id, source_stamp, triage,
                              unchanged_local_document)
from operators.rasterize import PageRange, page_ranges, rasterize
from pipeline.config import load_config
from pipeline.job import DryRun, run_job
from pipeline.progress import JobProgress
from operators.settings import RasterizeConfig
from operators.write import output_folders
from operators.errors import ConfigError, ExitCode, NoInputError, UnsupportedFormat, WriteFailed
from operators.storage import resolve_filesystem

CONFIG = RasterizeConfig(dpi=150)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good_pdf(tmp_path_factory, page_images):
    return write_pdf(tmp_path_factory.mktemp("pdf") / "three.pdf", page_images)


def test_expand_folder_glob_and_file(tmp_path, good_pdf, page_images):
    (tmp_path / "sub").mkdir()
    shutil.copy(good_pdf, tmp_path / "a.pdf")
    page_images[0].save(tmp_path / "sub" / "b.PNG")
    (tmp_path / "notes.txt").write_text("not a document")
    from_folder = find_inputs([str(tmp_path)]).sources
    assert [os.path.basename(p) for p in from_folder] == ["a.pdf", "b.PNG"]
    assert find_inputs([str(tmp_path / "**" / "*.PNG")]).sources == [str(tmp_path / "sub" / "b.PNG")]
    # an explicit file is taken whatever its suffix, and duplicates collapse
    notes = str(tmp_path / "notes.txt")
    assert find_inputs([notes, notes]).sources == [notes]


def test_folders_leave_out_os_junk_and_count_what_is_no_document(tmp_path, page_images):
    (tmp_path / "scan.pdf").mkdir()  # a folder, whatever its name says
    page_images[0].save(tmp_path / "scan.pdf" / "page.png")
    for name in (".DS_Store", "Thumbs.db", "._page.png", "page.png.md5", "mets.xml", "README"):
        (tmp_path / "scan.pdf" / name).write_bytes(b"junk")
    found = find_inputs([str(tmp_path)])
    assert found.sources == [str(tmp_path / "scan.pdf" / "page.png")]
    assert found.left_out == {".DS_Store": 1, "Thumbs.db": 1, "._*": 1, ".md5": 1, ".xml": 1, "(no suffix)": 1}
    assert find_inputs([str(tmp_path / "*.pdf")]).sources == found.sources


def test_files_modified_lately_are_set_apart_for_a_later_run(tmp_path, page_images):
    """A hot folder: a scan written 10 s ago may still be growing; with rasterize.min_file_age_s it is left for a
    later run (named, not dropped), whether found in a folder or named itself; a file:// URI is a local file too."""
    page_images[0].save(tmp_path / "old.png")
    page_images[0].save(tmp_path / "new.png")
    hour_ago = time.time() - 3600
    os.utime(tmp_path / "old.png", (hour_ago, hour_ago))
    os.utime(tmp_path / "new.png", (time.time() - 10, time.time() - 10))
    found = find_inputs([str(tmp_path)], min_file_age_s=60)
    assert (found.sources, found.recent) == ([str(tmp_path / "old.png")], [str(tmp_path / "new.png")])
    assert find_inputs([str(tmp_path / "new.png")], min_file_age_s=60).recent == [str(tmp_path / "new.png")]
    assert find_inputs([f"file://{tmp_path}/new.png"], min_file_age_s=60).recent == [f"file://{tmp_path}/new.png"]
    assert find_inputs([str(tmp_path)], min_file_age_s=5).recent == []
    assert find_inputs([str(tmp_path)]).recent == []  # off by default


def test_linked_folders_are_searched_and_a_link_loop_lists_each_file_once(tmp_path, page_images):
    (tmp_path / "elsewhere").mkdir()
    page_images[0].save(tmp_path / "elsewhere" / "linked.png")
    (tmp_path / "in" / "sub").mkdir(parents=True)
    page_images[0].save(tmp_path / "in" / "sub" / "own.png")
    (tmp_path / "in" / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "in" / "sub" / "up").symlink_to("..")  # a loop
    (tmp_path / "in" / "sub" / "alias.png").symlink_to("own.png")  # a link to a file is a name of its own
    expected = [str(tmp_path / "in" / "link" / "linked.png"), str(tmp_path / "in" / "sub" / "alias.png"),
                str(tmp_path / "in" / "sub" / "own.png")]
    for inputs in ([tmp_path / "in"], [tmp_path / "in" / "**" / "*.png"], [tmp_path / "in" / "*"]):
        assert find_inputs([str(path) for path in inputs]).sources == expected, inputs


def test_a_glob_in_a_uri_finds_what_the_same_glob_finds_on_the_disk(tmp_path):
    """An object store's glob had been matched against whole paths: ``s3://archive/scans/*.pdf`` took the PDFs of
    every subfolder too. Here through pyarrow's local filesystem (file://), the code path of s3:// and gs://."""
    for name in ("a.pdf", "sub/b.pdf", "sub/deep/c.pdf", "sub2/d.png", ".hidden/e.pdf", "sub/.f.pdf", "g.pdf/h.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"%PDF-")
    for pattern in ("*.pdf", "*/*.pdf", "**/*.pdf", "s*", "**", "sub/**", "*/*/c.pdf", "s[u]b/*", "sub/.*", "[sg]*/*", "*/", "**/"):
        local = find_inputs([f"{tmp_path}/{pattern}"]).sources
        uri = find_inputs([f"file://{tmp_path}/{pattern.replace('[', '%5B').replace(']', '%5D')}"]).sources
        assert [source.removeprefix("file://") for source in uri] == local and local, pattern
    assert [os.path.relpath(uri.removeprefix("file://"), tmp_path)
            for uri in find_inputs([f"file://{tmp_path}/*.pdf"]).sources] == [
        "a.pdf", "g.pdf/h.png"]  # a folder matched is taken whole, as on the disk


def test_an_input_uri_with_options_is_refused_before_its_files_are_read_without_them(tmp_path):
    """Rebuilt from their paths, the files found had been read without the URI's options: from AWS's endpoint
    instead of the one named, every document failing as internal_error."""
    with pytest.raises(ConfigError, match=r"the options of an input URI \(after '\?'\) do not reach the files.*AWS_ENDPOINT_URL"):
        find_inputs(["s3://archive/scans/?endpoint_override=127.0.0.1:9000&scheme=http"])


def test_an_object_store_that_cannot_be_reached_is_one_line_and_exit_2_before_any_work(tmp_path):
    """It had ended every command with a traceback and exit 1, a bug's code. A closed port on this machine stands
    for a store out of reach."""
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "PYTHONPATH": str(ROOT)}
    for inputs, output, role in ((["s3://archive/scans/"], str(tmp_path / "out"), "input"),
                                 ([str(tmp_path / "a.png")], "s3://archive/ocr", "output")):
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *inputs, "--output", output, "--dry-run"],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert done.returncode == ExitCode.bad_args, done.stderr
        assert done.stderr.startswith(f"trocr-pipeline: error: cannot read the {role} s3://archive/"), done.stderr
        assert "Traceback" not in done.stderr


def test_a_recursive_glob_through_two_link_loops_ends(tmp_path, page_images):
    """Python's glob goes round each loop until the path is too long: with two loops, 2^40 paths."""
    (tmp_path / "in" / "sub").mkdir(parents=True)
    page_images[0].save(tmp_path / "in" / "sub" / "own.png")
    (tmp_path / "in" / "sub" / "up").symlink_to("..")
    (tmp_path / "in" / "sub" / "self").symlink_to(".")
    found = []
    search = threading.Thread(target=lambda: found.append(find_inputs([str(tmp_path / "in" / "**" / "*.png")])),
                              daemon=True)
    search.start()
    search.join(timeout=30)
    assert found and found[0].sources == [str(tmp_path / "in" / "sub" / "own.png")]


def test_a_relative_recursive_glob_leaves_hidden_folders_out_as_glob_does(tmp_path, page_images, monkeypatch):
    """A bare "**" had matched the current folder itself, which was then walked whole, hidden thumbnails too."""
    (tmp_path / "box1").mkdir()
    (tmp_path / ".thumbs").mkdir()
    page_images[0].save(tmp_path / "box1" / "p1.png")
    page_images[1].copy().save(tmp_path / ".thumbs" / "p1.png")  # a save leaves its encoder settings on the image
    monkeypatch.chdir(tmp_path)
    for pattern in ("**", "**/", "**/*.png"):
        assert [os.path.basename(os.path.dirname(path)) for path in find_inputs([pattern]).sources] == ["box1"], pattern


def test_an_image_under_the_page_pixel_limit_is_not_refused_as_a_decompression_bomb(tmp_path):
    """Pillow refuses images over twice its own 89 Mpx; a 182 Mpx scan had failed under the 250 Mpx limit, and
    raising rasterize.max_page_pixels had changed nothing."""
    Image.new("1", (14000, 13000), 1).save(tmp_path / "map.png", dpi=(400, 400))
    plan = triage(str(tmp_path / "map.png"), RasterizeConfig())
    assert (plan.error, plan.num_pages) == (None, 1)
    refused = triage(str(tmp_path / "map.png"), RasterizeConfig(max_page_pixels=100_000_000))
    # counted, its page failed as a foldout's is (the document had failed with 0 pages, unopened as it were)
    assert (refused.error, refused.num_pages) == (None, 1)
    # an image's own pixels: the configured dpi (300) is no part of its size, and the message had named it
    assert refused.oversized_pages == ((1, "page 1 is 14000x13000 px, over the limit of 100000000 pixels "
                                           "(rasterize.max_page_pixels)"),)


def test_an_image_over_the_page_pixel_limit_fails_without_a_warning_on_the_console(tmp_path):
    """A BMP header declaring 900 Mpx fails its page as page_too_large, as it should, and Pillow's
    DecompressionBombWarning had reached the console too, without a word of which file."""
    header = struct.pack("<IiiHHIIiiII", 40, 30000, 30000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    (tmp_path / "header.bmp").write_bytes(b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + header + b"\0" * 16)
    with warnings.catch_warnings(record=True) as caught:
        plan = triage(str(tmp_path / "header.bmp"), RasterizeConfig())
    assert (plan.error, plan.num_pages, [page for page, _ in plan.oversized_pages]) == (None, 1, [1])
    assert not caught, [str(warning.message) for warning in caught]


def test_a_damaged_pdf_in_a_folder_named_for_encryption_fails_as_corrupt(tmp_path):
    """qpdf's message starts with the file's path: a damaged PDF under "encryption-policy/" had failed as encrypted."""
    for folder in ("encryption-policy", "unsupported encryption"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "damaged.pdf").write_bytes(b"%PDF-1.4\n" + b"garbage " * 50)
        plan = triage(str(tmp_path / folder / "damaged.pdf"), RasterizeConfig())
        assert plan.error is not None and plan.error.error_code == "corrupt_file", folder


def test_an_image_of_unknown_bytes_is_named_by_its_path_not_a_python_object(tmp_path):
    """Opened from a file object, Pillow's error had named ``<_io.BufferedReader name=...>`` in the row's message."""
    (tmp_path / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    plan = triage(str(tmp_path / "scan.png"), RasterizeConfig())
    assert plan.error is not None and plan.error.error_code == "corrupt_file"
    assert str(plan.error) == ("the image cannot be decoded: UnidentifiedImageError: cannot identify image file "
                               f"{str(tmp_path / 'scan.png')!r}")


def test_a_rotate_that_is_no_quarter_turn_counts_as_none(tmp_path, good_pdf):
    """poppler renders /Rotate 45 unrotated; the row had said 45, and the searchable PDF would copy it."""
    with pikepdf.open(good_pdf) as pdf:
        pdf.pages[0].Rotate = 45
        pdf.pages[1].Rotate = 450
        pdf.save(tmp_path / "odd.pdf")
    assert triage(str(tmp_path / "odd.pdf"), RasterizeConfig()).page_rotations == (0, 90, 0)


def test_an_output_folder_inside_an_input_folder_is_not_read_again(tmp_path, page_images):
    """A second run would otherwise read the first run's searchable PDFs and page images as new documents."""
    page_images[0].save(tmp_path / "scan.png")
    (tmp_path / "out" / "exports").mkdir(parents=True)
    page_images[0].save(tmp_path / "out" / "exports" / "scan-01234567.p0001.png")
    write_pdf(tmp_path / "out" / "exports" / "scan-01234567.pdf", page_images[:1])
    (tmp_path / "out" / "pages").mkdir()
    (tmp_path / "out" / "pages" / "part-0.parquet").write_bytes(b"PAR1")
    (tmp_path / "out" / ".lock").touch()  # the job's own: it had been counted as an input with no suffix
    for output in (tmp_path / "out", os.path.relpath(tmp_path / "out"), f"{tmp_path}/./out/"):
        found = find_inputs([str(tmp_path), str(tmp_path / "*.png")], output_folders(str(output)))
        assert found.sources == [str(tmp_path / "scan.png")]
        assert found.left_out == {"in the output folder": 4}
    assert len(find_inputs([str(tmp_path)]).sources) == 3  # no output given: every document
    # an output URI with options, or percent-encoded otherwise than the files a store lists: its own folders had
    # been read as new documents at each run
    for output in (f"file://{tmp_path}/out/?region=eu-west-1", f"file://{tmp_path}/o%75t"):
        found = find_inputs([f"file://{tmp_path}"], output_folders(output))
        assert (found.sources, found.left_out) == ([f"file://{tmp_path}/scan.png"], {"in the output folder": 4})
    # the input folder through a link, a glob through it, and a link in another input folder to the output: the
    # exports had been read as new documents, and more of them written at every run
    (tmp_path.parent / f"{tmp_path.name}-link").symlink_to(tmp_path)
    (tmp_path.parent / f"{tmp_path.name}-other").mkdir()
    (tmp_path.parent / f"{tmp_path.name}-other" / "results").symlink_to(tmp_path / "out")
    page_images[0].save(tmp_path.parent / f"{tmp_path.name}-other" / "other.png")
    for inputs, documents in (([f"{tmp_path}-link"], ["scan.png"]), ([f"{tmp_path}-link/**/*.p*"], ["scan.png"]),
                              ([f"{tmp_path}-other"], ["other.png"])):
        found = find_inputs(inputs, output_folders(str(tmp_path / "out")))
        assert [Path(source).name for source in found.sources] == documents
        assert found.left_out[IN_THE_OUTPUT] >= 2, inputs
    # an input inside the output (scans kept beside the results, or one folder for both) is read
    (tmp_path / "out" / "scans").mkdir()
    page_images[0].save(tmp_path / "out" / "scans" / "letter.png")
    for output in (tmp_path, tmp_path / "out"):
        found = find_inputs([str(tmp_path / "out" / "scans")], output_folders(str(output)))
        assert found.sources == [str(tmp_path / "out" / "scans" / "letter.png")]


def test_uri_with_a_raw_space_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="%20"):
        find_inputs([f"file://{tmp_path}/a b.pdf"]).sources


def test_a_gs_store_is_retried_for_a_minute_not_a_quarter_of_an_hour():
    """Google's client retries an unreachable store for 15 minutes by default, and a stopped job waited it out."""
    from datetime import timedelta

    from operators.storage import GCS_RETRY_LIMIT_S

    for uri, limit, path in (("gs://bucket/scans/a.pdf", GCS_RETRY_LIMIT_S, "bucket/scans/a.pdf"),
                             ("gs://bucket/a.pdf?retry_limit_seconds=5", 5, "bucket/a.pdf")):
        filesystem, found = resolve_filesystem(uri)
        assert found == path and filesystem.__reduce__()[1][0]["retry_time_limit"] == timedelta(seconds=limit)


def test_input_matching_nothing_is_an_error(tmp_path):
    """A name that is not there had been said to match no document (.pdf .tif ...), as if of the wrong kind."""
    for missing in (str(tmp_path / "missing.pdf"), f"file://{tmp_path}/missing.pdf"):
        with pytest.raises(NoInputError, match=f"input '{missing}': there is no such file or folder"):
            find_inputs([missing])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a document")
    for empty in (str(tmp_path / "notes"), str(tmp_path / "*.pdf"), f"file://{tmp_path}/*.pdf"):
        with pytest.raises(NoInputError, match=f"input '{re.escape(empty)}' matches no document"):
            find_inputs([empty])


def test_a_run_refused_for_its_input_does_not_say_it_started(tmp_path):
    """Its progress had said "starting (Ray, the model)" before the refusal, and no Ray had started."""
    stream = io.StringIO()
    progress = JobProgress(stream=stream, interactive=False, interval_s=0)
    with pytest.raises(NoInputError):
        run_job([str(tmp_path / "missing.pdf")], str(tmp_path / "out"), load_config(None, []), progress=progress)
    progress.close()
    assert stream.getvalue() == ""


def test_sniff_kind_trusts_bytes_not_names():
    assert sniff_kind(b"%PDF-1.7\n") == "pdf"
    assert sniff_kind(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_kind(b"II*\x00") == sniff_kind(b"MM\x00*") == sniff_kind(b"II+\x00") == "tiff"  # BigTIFF too
    assert sniff_kind(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_kind(b"\x00\x00\x00\x0cjP  \r\n\x87\n") == sniff_kind(b"\xff\x4f\xff\x51") == "jp2"
    assert sniff_kind(b"BM" + bytes(12) + b"\x28\x00\x00\x00") == "bmp"
    assert sniff_kind(b"RIFF\x10\x00\x00\x00WEBPVP8L") == "webp"
    assert sniff_kind(b"GIF89a") == "gif"
    for text in (b"hello world", b"BMW annual report 1931, typed"):
        with pytest.raises(UnsupportedFormat):
            sniff_kind(text)


def test_good_pdf(good_pdf):
    plan = triage(str(good_pdf), CONFIG)
    assert plan.error is None and plan.kind == "pdf" and plan.num_pages == 3
    assert len(plan.doc_id) == 64


def test_doc_id_is_content_hash(tmp_path, good_pdf):
    copy = shutil.copy(good_pdf, tmp_path / "renamed.pdf")
    assert triage(str(copy), CONFIG).doc_id == triage(str(good_pdf), CONFIG).doc_id


def test_multipage_tiff(tmp_path, page_images):
    path = tmp_path / "scan.tif"
    page_images[0].save(path, save_all=True, append_images=page_images[1:], compression="tiff_lzw")
    plan = triage(str(path), CONFIG)
    assert (plan.kind, plan.num_pages, plan.error) == ("tiff", 3, None)


def _broken(tmp_path, good_pdf, name):
    path = tmp_path / name
    data = good_pdf.read_bytes()
    if name == "empty.pdf":
        path.write_bytes(b"")
    elif name == "text.pdf":
        path.write_text("this is a text file wearing a .pdf name\n")
    elif name == "truncated.pdf":
        path.write_bytes(data[: len(data) // 10])
    elif name == "encrypted.pdf":
        with pikepdf.open(good_pdf) as pdf:
            pdf.save(path, encryption=pikepdf.Encryption(owner="owner-secret", user="user-secret"))
    elif name == "unreadable.pdf":
        path.write_bytes(data)
        path.chmod(0)
    return path


@pytest.mark.parametrize("name, error_code", [
    ("empty.pdf", "empty_file"),
    ("text.pdf", "unsupported_format"),
    ("truncated.pdf", "corrupt_file"),
    ("encrypted.pdf", "encrypted"),
])
def test_broken_files_fail_with_a_reason(tmp_path, good_pdf, name, error_code):
    plan = triage(str(_broken(tmp_path, good_pdf, name)), CONFIG)
    assert plan.error is not None, name
    assert plan.error.error_code == error_code
    assert str(plan.error)
    assert plan.num_pages == 0


def test_a_file_name_that_is_not_utf8_fails_that_file_with_a_printable_name(tmp_path, page_images):
    """Linux names may hold any bytes (Python lists them as lone surrogates), while Arrow strings, XML and the
    console need UTF-8: the file fails triage, recorded under its name with the bytes escaped."""
    path = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    page_images[0].save(path)
    plan = triage(os.fsdecode(path), CONFIG)
    assert plan.error.error_code == "unreadable" and plan.source == f"{tmp_path}/caf\\xe9.png"
    assert "is not UTF-8" in str(plan.error) and plan.source.encode("utf-8")
    # named on the command line, as a file or in a folder so named: found (a traceback had ended the run)
    folder = os.path.join(os.fsencode(tmp_path), b"bo\xeete")
    os.mkdir(folder)
    page_images[0].save(os.path.join(folder, b"page.png"))
    assert find_inputs([os.fsdecode(path), os.fsdecode(folder)]).sources == [
        os.fsdecode(path), os.fsdecode(os.path.join(folder, b"page.png"))]
    with pytest.raises(ConfigError, match=f"{tmp_path}/bo\\\\xeete is not a UTF-8 name"):
        resolve_filesystem(os.fsdecode(folder))  # an output so named: one line, exit 2


def test_a_folder_that_cannot_be_listed_is_reported_not_skipped(tmp_path, page_images):
    """A folder without read permission had been skipped in silence (no row, exit 0), and a glob through it or
    an input folder so closed said it matched no document. Here the folder is listed without the permission
    (root without its capability to override it, or any other user)."""
    (tmp_path / "box1").mkdir()
    (tmp_path / "box2").mkdir()
    page_images[0].save(tmp_path / "box1" / "a.png")
    page_images[0].save(tmp_path / "box2" / "b.png")
    (tmp_path / "box2").chmod(0)
    script = ("import sys; from operators.ingest import find_inputs, triage; from operators.settings import "
              "RasterizeConfig; sources = find_inputs(sys.argv[1:]).sources; print(sources); "
              "print([triage(s, RasterizeConfig()).error for s in sources])")
    for inputs in ([str(tmp_path)], [f"{tmp_path}/*/*.png"], [str(tmp_path / "box2")]):
        no_override = "-dac_override,-dac_read_search"
        result = subprocess.run(["setpriv", f"--inh-caps={no_override}", f"--bounding-set={no_override}",
                                 sys.executable, "-c", script, *inputs], capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        if result.returncode != 0 and "setpriv" in result.stderr:
            pytest.skip(f"cannot drop capabilities here: {result.stderr.strip()}")
        sources, errors = result.stdout.splitlines()
        assert str(tmp_path / "box2") in sources, (inputs, result.stderr)
        assert f"cannot list the folder {tmp_path / 'box2'}" in errors, inputs
    (tmp_path / "box2").chmod(0o755)


def test_a_fifo_is_refused_before_it_is_read(tmp_path):
    """Reading a FIFO no one writes to would block the job forever."""
    os.mkfifo(tmp_path / "pipe.pdf")
    for source in (str(tmp_path / "pipe.pdf"), f"file://{tmp_path}/pipe.pdf"):
        plans = []  # in a thread: were the FIFO read, the test would fail instead of hanging the suite
        reader = threading.Thread(target=lambda: plans.append(triage(source, CONFIG)), daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), f"triage blocked reading a FIFO as {source}"
        [plan] = plans
        assert plan.error.error_code == "unreadable" and "not a regular file" in str(plan.error)


def test_a_file_still_being_copied_in_fails_as_changed_under_its_path(tmp_path, good_pdf, monkeypatch):
    """A scan copied slowly into a hot folder, its next bytes written while triage looks inside: it had failed as
    corrupt_file (or source_changed) under the sha256 of the part read, the bytes of no version of the file, and its
    corrupt_file row had stayed beside the next run's reading for good."""
    path, whole = tmp_path / "scan.pdf", good_pdf.read_bytes()
    path.write_bytes(whole[: len(whole) // 4])
    looked_inside = operators.ingest.triage_pdf

    def copied_on_meanwhile(*args, **kwargs):
        try:
            return looked_inside(*args, **kwargs)
        finally:
            with open(path, "ab") as scanner:
                scanner.write(whole[len(whole) // 4:])

    monkeypatch.setattr(operators.ingest, "triage_pdf", copied_on_meanwhile)
    plan = triage(str(path), CONFIG)
    assert (plan.error.error_code, plan.doc_id, plan.stamp) == ("source_changed", source_id(str(path)), None)


def test_file_gone_before_triage_is_unreadable(tmp_path):
    plan = triage(str(tmp_path / "deleted.pdf"), CONFIG)
    assert plan.error.error_code == "unreadable" and "deleted.pdf" in str(plan.error)


def test_unreadable_file_permissions(tmp_path, good_pdf):
    """Root reads any file, so as root the check runs as user nobody (setpriv), as archives often do."""
    path = _broken(tmp_path, good_pdf, "unreadable.pdf")
    if os.geteuid() != 0:
        assert triage(str(path), CONFIG).error.error_code == "unreadable"
        return
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c"]
    repo = Path(__file__).resolve().parent.parent
    if subprocess.run([*as_nobody, "import operators.ingest"], cwd=repo, capture_output=True).returncode != 0:
        pytest.skip("user nobody cannot run this checkout's Python (a private checkout folder)")
    probe = ("import sys; from operators.ingest import triage; from operators.settings import RasterizeConfig; "
             "plan = triage(sys.argv[1], RasterizeConfig()); print(plan.error.error_code, plan.error)")
    result = subprocess.run([*as_nobody, probe, str(path)], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("unreadable") and "Permission denied" in result.stdout


def test_owner_password_only_pdf_is_processed(tmp_path, good_pdf):
    path = tmp_path / "owner-only.pdf"
    with pikepdf.open(good_pdf) as pdf:
        pdf.save(path, encryption=pikepdf.Encryption(owner="owner-secret", user=""))
    plan = triage(str(path), CONFIG)
    assert plan.error is None and plan.num_pages == 3


def test_truncated_pdf_is_repaired_and_keeps_the_pages_it_still_has(tmp_path, good_pdf):
    path = tmp_path / "half.pdf"
    data = good_pdf.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    plan = triage(str(path), CONFIG)
    assert plan.error is None and plan.repaired
    assert 1 <= plan.num_pages < 3


def test_broken_cross_reference_is_repaired(tmp_path, good_pdf):
    """poppler cannot read an xref stream PDF whose startxref offset is wrong; qpdf rebuilds it."""
    compact = tmp_path / "objstm.pdf"
    with pikepdf.open(good_pdf) as pdf:
        pdf.save(compact, object_stream_mode=pikepdf.ObjectStreamMode.generate)
    data = compact.read_bytes()
    offset = re.search(rb"startxref\s+(\d+)", data)
    broken = tmp_path / "broken-xref.pdf"
    broken.write_bytes(data[: offset.start(1)] + b"9" * len(offset.group(1)) + data[offset.end(1):])
    plan = triage(str(broken), CONFIG)
    assert (plan.error, plan.repaired, plan.num_pages) == (None, True, 3)


def test_a_full_temporary_folder_stops_the_job_instead_of_failing_the_file_for_good(tmp_path, good_pdf, small_disk):
    """qpdf repairs a damaged PDF into the temporary folder: with it full, the PDF had been recorded as
    internal_error at triage, or its pages as render_failed, and never read again by a plain rerun. Triage raises;
    rendering, inside Ray Data (which would not carry the exception), marks its pages write_failed, and the job
    stops on that code."""
    test_broken_cross_reference_is_repaired(tmp_path, good_pdf)
    source = str(tmp_path / "broken-xref.pdf")
    (small_disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024))
    tempfile.tempdir = str(small_disk)
    full = f"no space left in the temporary folder {small_disk} while reading {source}"
    try:
        with pytest.raises(WriteFailed, match=full):
            triage(source, CONFIG)
        pages = rasterize(PageRange("id", source, "pdf", 1, 2, repaired=True), CONFIG)
        assert {(page.error_code, page.error_message.split(":")[0]) for page in pages} == {("write_failed", full)}
    finally:
        tempfile.tempdir = None


def test_declared_page_count_is_not_trusted(tmp_path, good_pdf):
    inflated = tmp_path / "count5.pdf"
    inflated.write_bytes(good_pdf.read_bytes().replace(b"/Count 3", b"/Count 5"))
    assert triage(str(inflated), CONFIG).num_pages == 3


def test_page_too_large_is_checked_before_rendering(good_pdf, tmp_path):
    small_limit = RasterizeConfig(dpi=300, max_page_pixels=1_000_000)
    plan = triage(str(good_pdf), small_limit)
    assert (plan.error, plan.num_pages, [page for page, _ in plan.oversized_pages]) == (None, 3, [1, 2, 3])
    # every page fails: the document fails, which the dry run says and exits 4 for (it had said "ok")
    described = DryRun([plan], {}, "2-").describe()
    assert described.startswith(f"failed       2 pages  {good_pdf} (page_too_large: page 2 would be ")
    assert "work: 0 pages" in described and DryRun([plan], {}, "2-").failing
    wide = tmp_path / "wide.pdf"  # pdfinfo writes its width as "1e+06"; only page 2 is too large
    with pikepdf.open(good_pdf) as pdf:
        pdf.pages[1].MediaBox = [0, 0, 1_000_000, 30]
        pdf.save(wide)
    plan = triage(str(wide), RasterizeConfig(dpi=300))  # a foldout: its own page fails, not the book
    assert plan.error is None and plan.num_pages == 3
    [(page, why)] = plan.oversized_pages
    assert page == 2 and why.startswith("page 2 would be 4166667x125 px")
    works = [work for task in page_ranges([plan], 8) for work in rasterize(task, RasterizeConfig(dpi=100))]
    assert [(work.page, work.status, work.error_code) for work in works] == [
        (1, "ok", None), (2, "failed", "page_too_large"), (3, "ok", None)]
    assert "1 page(s) will fail, page_too_large: page 2 would be" in DryRun([plan], {}, None).describe()
    assert DryRun([plan], {}, None).failing and not DryRun([plan], {}, "3").failing  # as the run exits
    assert "work: 2 pages" in DryRun([plan], {}, None).describe()
    image = tmp_path / "huge.png"
    Image.new("1", (5000, 5000), 1).save(image)
    assert triage(str(image), small_limit).oversized_pages[0][0] == 1
    bundle = tmp_path / "bundle.tif"  # the same for an image's frames
    Image.new("L", (500, 500), 255).save(bundle, save_all=True, append_images=[Image.new("L", (2000, 2000), 255)])
    plan = triage(str(bundle), small_limit)
    assert (plan.error, plan.num_pages, [page for page, _ in plan.oversized_pages]) == (None, 2, [2])


def test_previews_marked_the_old_way_are_no_pages_and_a_file_of_only_marked_frames_keeps_them_all(tmp_path):
    """A preview marked with the old SubfileType (255 = 2) had been read as a page; a file whose every frame is
    marked as a preview, cut inside its last frame, had kept only that damaged frame."""
    page, preview = Image.new("L", (800, 600), 255), Image.new("L", (200, 150), 255)
    preview.encoderinfo = {"tiffinfo": {SUBFILE_TYPE: 2}}
    page.save(tmp_path / "old.tif", save_all=True, append_images=[preview])
    assert triage(str(tmp_path / "old.tif"), CONFIG).num_pages == 1
    frames = [Image.new("L", (800, 600), shade) for shade in (200, 220, 240)]
    frames[0].save(tmp_path / "marked.tif", save_all=True, append_images=frames[1:], compression="tiff_lzw",
                   tiffinfo={NEW_SUBFILE_TYPE: 1})
    data = (tmp_path / "marked.tif").read_bytes()
    (tmp_path / "marked.tif").write_bytes(data[: len(data) * 9 // 10])  # the last frame's directory is cut
    with Image.open(tmp_path / "marked.tif") as image:
        assert [(frame.index, frame.damage is None) for frame in page_frames(image)] == [(0, True), (1, True),
                                                                                         (2, False)]


def test_pillows_warnings_about_damaged_metadata_stay_off_the_console(tmp_path):
    """From a Ray task, "UserWarning: Corrupt EXIF data" reached the console, without the file's name, and broke
    the live progress line; the damage that stops a page is recorded on the page."""
    frames = [Image.new("L", (800, 600), shade) for shade in (200, 220, 240)]
    frames[0].save(tmp_path / "cut.tif", save_all=True, append_images=frames[1:], compression="tiff_lzw")
    data = (tmp_path / "cut.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) * 9 // 10])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = triage(str(tmp_path / "cut.tif"), CONFIG)
        [task] = page_ranges([plan], pages_per_task=8)
        assert [work.status for work in rasterize(task, CONFIG)] == ["ok", "ok", "failed"]
    assert not [str(warning.message) for warning in caught if "/PIL/" in warning.filename]


def test_a_file_unchanged_since_its_document_was_written_is_not_read_again(tmp_path, good_pdf):
    """A rerun over a growing archive had hashed every file again to find it done (12.5 s of an 18 s rerun of
    20,000 files): a file with the size and modification time its written document had is taken as that document,
    unread, as rsync trusts them; one whose time changed is read again."""
    source = shutil.copy(good_pdf, tmp_path / "letter.pdf")
    plan = triage(str(source), CONFIG)
    known = KnownDocument(plan.doc_id, plan.num_pages, plan.stamp)
    data = bytearray(source.read_bytes())
    data[-20:] = b"%" * 20  # other bytes, the same size and time: only a read would tell
    source.write_bytes(bytes(data))
    os.utime(source, ns=(plan.stamp[1], plan.stamp[1]))
    taken = triage(str(source), CONFIG, known)
    assert (taken.doc_id, taken.num_pages, taken.stamp, taken.error) == (plan.doc_id, plan.num_pages, plan.stamp, None)
    assert triage(str(source), CONFIG).doc_id != plan.doc_id
    os.utime(source, ns=(plan.stamp[1] + 10**9, plan.stamp[1] + 10**9))
    assert triage(str(source), CONFIG, known).doc_id != plan.doc_id


def test_an_unchanged_local_file_is_taken_as_its_document_without_a_triage_task(tmp_path, good_pdf):
    """A rerun over 4,000 files had spent a Ray task on each to find them unchanged (1 ms a file); one stat in the
    driver does. A changed file, or a URI (a request to its store each), is left to triage."""
    source = shutil.copy(good_pdf, tmp_path / "letter.pdf")
    plan = triage(str(source), CONFIG)
    known = KnownDocument(plan.doc_id, plan.num_pages, plan.stamp)
    taken = unchanged_local_document(str(source), known)
    assert (taken.doc_id, taken.num_pages, taken.stamp, taken.error) == (plan.doc_id, plan.num_pages, plan.stamp, None)
    assert unchanged_local_document(f"file://{source}", known) is None
    assert unchanged_local_document(str(tmp_path / "gone.pdf"), known) is None
    os.utime(source, ns=(plan.stamp[1] + 10**9, plan.stamp[1] + 10**9))
    assert unchanged_local_document(str(source), known) is None


def test_a_touched_local_file_is_taken_as_the_document_its_bytes_are_without_a_triage_task(tmp_path, good_pdf):
    """A file touched since it was read (or one that failed) is hashed as triage hashes it, and taken as the document
    its bytes are, so that a run over it need not start Ray; other bytes, no bytes, a URI or a folder are left to
    triage."""
    source = shutil.copy(good_pdf, tmp_path / "letter.pdf")
    plan = triage(str(source), CONFIG)
    os.utime(source, ns=(plan.stamp[1] + 10**9, plan.stamp[1] + 10**9))
    taken = local_document_of_bytes(str(source), {plan.doc_id: plan.num_pages})
    assert (taken.doc_id, taken.num_pages, taken.stamp) == (plan.doc_id, plan.num_pages, source_stamp(str(source)))
    assert local_document_of_bytes(str(source), {"other bytes": 1}) is None
    assert local_document_of_bytes(f"file://{source}", {plan.doc_id: plan.num_pages}) is None
    assert local_document_of_bytes(str(tmp_path), {plan.doc_id: plan.num_pages}) is None
    assert local_document_of_bytes(str(tmp_path / "gone.pdf"), {plan.doc_id: plan.num_pages}) is None
    (tmp_path / "empty.pdf").write_bytes(b"")
    empty = triage(str(tmp_path / "empty.pdf"), CONFIG)
    assert local_document_of_bytes(str(tmp_path / "empty.pdf"), {empty.doc_id: 0}) is None


def test_a_uri_input_is_copied_once_per_version_and_the_oldest_copies_make_room(tmp_path, good_pdf, page_images,
                                                                                  monkeypatch):
    """Each page range and export of a URI's document had downloaded the whole file again (a 400-page PDF from
    object storage: 50 downloads at 8 pages a range)."""
    from operators.ingest import local_path

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    source = tmp_path / "book.pdf"
    shutil.copy(good_pdf, source)
    uri = f"file://{source}"
    with local_path(uri) as first:
        copied = os.stat(first)
        with local_path(uri) as again:  # a second reader at once, as page ranges of one document are
            assert again == first
    for number in (1, 2):  # each range renders from the one copy, untouched since it was made
        [page] = rasterize(PageRange("id", uri, "pdf", number, number), CONFIG)
        assert page.error_code is None
    assert (os.stat(first).st_ino, os.stat(first).st_size) == (copied.st_ino, copied.st_size)
    room = 2 * good_pdf.stat().st_size
    write_pdf(source, page_images[:2])  # a new version of the file, a new copy
    os.utime(source, ns=(copied.st_mtime_ns + 10**9,) * 2)
    with local_path(uri, keep_bytes=room) as newer:
        assert newer != first and Path(newer).read_bytes() == source.read_bytes()
        shutil.copy(good_pdf, tmp_path / "other.pdf")
        with local_path(f"file://{tmp_path / 'other.pdf'}", keep_bytes=room) as other:
            assert not Path(first).exists()  # the least recently used copy made room
            assert Path(newer).exists() and Path(other).exists()  # one in use stays, over the bound too
    assert not list((tmp_path / "tmp").glob("*/*.part"))
    shutil.copy(good_pdf, tmp_path / "scan.lock")  # the bytes decide what a file is: it had been read as its lock
    with local_path(f"file://{tmp_path / 'scan.lock'}") as named_lock:
        assert Path(named_lock).read_bytes() == good_pdf.read_bytes()
