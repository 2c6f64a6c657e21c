"""End to end on a real local Ray instance: synthetic scanned PDFs and TIFFs in, Parquet out."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import jiwer
import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from conftest import box_iou, text_page, write_pdf
from operators.settings import DEFAULT_MODEL
from pipeline.cli import main
from pipeline.config import load_config
from operators.decoding import check_generation_settings
from operators.errors import ConfigError, ExitCode, ModelLoadError
from pipeline.job import dry_run, run_job
from pipeline.progress import JobProgress
from operators.records import DOCUMENTS_SCHEMA, PAGES_SCHEMA, DocumentRecord, PageWork
from operators.write import ParquetSink
from pipeline.synth.docs import load_ground_truth, page_texts


def _read(output: str, table: str):
    return ds.dataset(f"{output}/{table}", format="parquet").to_table()


@pytest.fixture(scope="module")
def input_folder(tmp_path_factory, synthetic_documents):
    folder = tmp_path_factory.mktemp("inputs")
    for document in synthetic_documents:
        shutil.copy(document, folder)
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")  # truncated after the header
    return folder


@pytest.fixture(scope="module")
def detect_output(ray_local, input_folder, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("detect-out"))
    config = load_config(None, ["rasterize.dpi=150"])
    summary = run_job([str(input_folder)], output, config, mode="detect")
    return output, summary


def test_one_documents_row_per_input_and_corrupt_file_recorded(detect_output, synthetic_documents):
    output, summary = detect_output
    documents = {os.path.basename(row["source"]): row for row in _read(output, "documents").to_pylist()}
    assert set(documents) == {p.name for p in synthetic_documents} | {"corrupt.pdf"}
    corrupt = documents.pop("corrupt.pdf")
    assert corrupt["status"] == "failed" and corrupt["error_code"] == "corrupt_file" and corrupt["error_message"]
    for path in synthetic_documents:
        truth = load_ground_truth(path)
        assert documents[path.name]["status"] == "ok"
        assert documents[path.name]["num_pages"] == len(truth["pages"])
    assert (summary.written.documents_ok, summary.written.documents_failed) == (len(synthetic_documents), 1)


def test_pages_line_counts_and_reading_order(detect_output, synthetic_documents):
    output, _ = detect_output
    pages = {(os.path.basename(row["source"]), row["page"]): row for row in _read(output, "pages").to_pylist()}
    two_column_pages = 0
    for path in synthetic_documents:
        truth = load_ground_truth(path)
        for truth_page in truth["pages"]:
            page = pages.pop((path.name, truth_page["page"]))
            assert page["status"] == "ok"
            assert (page["width"], page["height"]) == (truth_page["width"], truth_page["height"])
            expected, found = len(truth_page["lines"]), len(page["lines"])
            assert abs(found - expected) <= 0.1 * expected, f"{path.name} p{truth_page['page']}: {found} vs {expected}"
            assert [line["order"] for line in page["lines"]] == list(range(found))
            # reading order: the ground-truth order of matched lines must increase along the detected order
            matched = []
            for line in page["lines"]:
                best = max(truth_page["lines"], key=lambda t: box_iou(line["bbox"], t["bbox"]))
                if box_iou(line["bbox"], best["bbox"]) >= 0.5:
                    matched.append(best["order"])
            assert len(matched) >= 0.9 * expected
            assert matched == sorted(matched), f"{path.name} p{truth_page['page']} out of reading order"
            two_column_pages += truth_page["columns"] == 2
    assert not pages, f"pages without ground truth: {sorted(pages)}"
    assert two_column_pages > 0, "the fixture must include two-column pages"


def test_schema_is_the_documented_one(detect_output):
    output, _ = detect_output
    assert _read(output, "pages").schema.equals(PAGES_SCHEMA)
    assert _read(output, "documents").schema.equals(DOCUMENTS_SCHEMA)


def test_rerun_skips_documents_already_written(ray_local, detect_output, input_folder):
    output, first = detect_output
    before = _read(output, "pages").num_rows
    again = run_job([str(input_folder)], output, load_config(None, ["rasterize.dpi=150"]), mode="detect")
    assert again.documents_skipped == first.written.documents_ok + first.written.documents_failed
    assert again.written.pages == 0
    assert _read(output, "pages").num_rows == before
    ok = [row for row in _read(output, "documents").to_pylist() if row["status"] == "ok"]
    assert ok
    for row in ok:  # what lets the next rerun skip them unread
        assert (row["source_size"], row["source_mtime_ns"]) == (os.stat(row["source"]).st_size,
                                                                os.stat(row["source"]).st_mtime_ns)


def test_a_rerun_with_nothing_new_starts_no_ray_and_refuses_what_a_run_refuses(ray_local, tiny_model, tmp_path):
    """A hot folder's run with nothing new had started Ray only to skip every file: 7 s of every such run. It starts
    none now (Ray's GCS server is a process of its own) where every file is unchanged, or was touched (its bytes are
    hashed), or failed before. It still refuses the settings a run with something to read refuses, before it tidies a
    killed run's leftovers in the output, and tidies them, as such a run does, before it compares with the output."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    text_page(["A note on a single sheet of paper."]).save(inputs / "note.png", dpi=(150, 150))
    text_page(["A second note, on another sheet."]).save(inputs / "other.png", dpi=(150, 150))
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a picture" * 10)
    output = tmp_path / "out"
    config = load_config(None, ["rasterize.dpi=150", f"recognize.model={tiny_model}", "recognize.max_new_tokens=4"])
    first = run_job([str(inputs)], str(output), config)
    assert (first.written.documents_ok, first.written.documents_failed) == (2, 1)
    script = ("import atexit, sys\n"
              "args, started = sys.argv[1:], []\n"
              "sys.addaudithook(lambda event, info: event == 'subprocess.Popen' and started.append(str(info[1])))\n"
              "atexit.register(lambda: print('Ray started:', 'gcs_server' in str(started)))\n"
              "from pipeline.cli import entry\n"
              "sys.argv = ['trocr-pipeline', 'run', args[0], '--output', args[1], '--set', 'rasterize.dpi=150', '--set', "
              "f'recognize.model={args[2]}', '--set', 'recognize.max_new_tokens=4', *args[3:]]\n"
              "entry()\n")
    killed_runs_part = output / "pages" / "part-00000000dead-00000.parquet"  # its documents twin never written
    shutil.copy(next((output / "pages").glob("*.parquet")), killed_runs_part)
    _run_python(script, str(inputs), str(output), str(tiny_model), "--set", "recognize.num_gpus=1",
                exit_code=ExitCode.bad_args)
    assert killed_runs_part.exists()
    touched = os.stat(inputs / "other.png").st_mtime_ns + 10**9
    os.utime(inputs / "other.png", ns=(touched, touched))
    with pytest.raises(ConfigError, match="from `trocr-pipeline run` .* and this is `trocr-pipeline detect`"):
        run_job([str(inputs)], str(output), config, mode="detect")
    assert not killed_runs_part.exists()  # tidied before the output is compared with, as by a run with Ray
    shutil.copy(next((output / "pages").glob("*.parquet")), killed_runs_part)
    printed = _run_python(script, str(inputs), str(output), str(tiny_model), exit_code=ExitCode.documents_failed)
    assert "documents: 0 ok, 0 failed, 0 duplicates, 3 already done (1 of them failed" in printed
    assert printed.splitlines()[-1] == "Ray started: False"
    assert not killed_runs_part.exists()
    # one file changed: the rerun reads it, through Ray
    text_page(["The note, written again."]).save(inputs / "note.png", dpi=(150, 150))
    printed = _run_python(script, str(inputs), str(output), str(tiny_model), exit_code=ExitCode.documents_failed)
    assert "documents: 1 ok, 0 failed, 0 duplicates, 2 already done (1 of them failed" in printed
    assert printed.splitlines()[-1] == "Ray started: True"


def test_a_rerun_selecting_other_pages_of_a_document_that_failed_is_refused_without_ray_as_with_it(ray_local,
                                                                                                  tmp_path):
    """A file that failed in triage has no page count in the output, and the run with nothing to read had taken it as
    one of none, so pages 2 of a file that had failed with pages 1 passed where the run with Ray (triage counts its
    pages again) refuses it: the second run would never read them."""
    pdf = write_pdf(tmp_path / "three.pdf", [text_page([f"Page {n}"]) for n in (1, 2, 3)])
    output = str(tmp_path / "out")
    config = load_config(None, ["rasterize.dpi=150", "rasterize.pages=1", "rasterize.pdfinfo_timeout_s=0.0001"])
    assert run_job([str(pdf)], output, config, mode="detect").written.documents_failed == 1
    with pytest.raises(ConfigError, match="read with pages 1 .* this run selects pages 2"):
        run_job([str(pdf)], output, load_config(None, ["rasterize.dpi=150", "rasterize.pages=2"]), mode="detect")
    again = run_job([str(pdf)], output, config, mode="detect")  # the same pages: nothing to read, no refusal
    assert (again.documents_skipped, again.failed_earlier) == (1, 1)


def test_the_resources_a_run_without_ray_checks_are_those_rays_local_instance_has():
    """A run with nothing to read, and the dry run, check the recognizers' CPUs and GPUs against the local Ray
    instance a run would start, without starting it. They had counted the CPUs this process may run on, which Ray does
    not: pinned to one core (taskset), a run with nothing new was refused that a run with something to read was not."""
    script = ("import os, ray\n"
              "from pipeline.config import load_config\nfrom pipeline.job import local_ray_resources\n"
              "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
              "found = local_ray_resources(load_config(None, []))\n"
              "ray.init(address='local', include_dashboard=False, logging_level='ERROR')\n"
              "has = ray.cluster_resources()\n"
              "print(*(found.get(key, 0.0) == has.get(key, 0.0) for key in {'CPU', 'GPU', *found, *has}"
              " if key in ('CPU', 'GPU') or key.startswith('accelerator_type:')))\n")
    assert os.cpu_count() > 1  # else pinning to one core would not tell the two counts apart
    assert set(_run_python(script).split()) == {"True"}


def test_a_recognizer_pool_holding_every_local_cpu_is_refused_before_any_page(ray_local, input_folder,
                                                                              tiny_model, tmp_path):
    # two one-CPU actors on the fixture's two CPUs: layout would never run and Ray Data would stall
    config = load_config(None, [f"recognize.model={tiny_model}", "recognize.concurrency=2"])
    with pytest.raises(ConfigError, match="recognize.concurrency=2.* holds 2 of the local Ray instance's 2 CPUs"):
        run_job([str(input_folder)], str(tmp_path / "out"), config)
    assert not (tmp_path / "out" / "pages").exists()


def test_cli_run_fills_text_and_confidence_and_reports_failed_documents_in_exit_code(ray_local, input_folder,
                                                                                      synthetic_documents, tiny_model,
                                                                                      tmp_path, capsys):
    """The command line's run, in this process on the session's Ray instance (the job joins it)."""
    output = tmp_path / "out"
    code = main(["run", str(input_folder), "--output", str(output), "--set", "rasterize.dpi=150",
                 "--set", f"recognize.model={tiny_model}", "--set", "recognize.max_new_tokens=8",
                 "--set", "recognize.line_batch_size=16", "--export", "alto,page,hocr,txt"])
    assert code == ExitCode.documents_failed
    said = capsys.readouterr().out
    assert f"documents: {len(synthetic_documents)} ok, 1 failed" in said
    exported = sorted(path.name.split(".", 1)[1].split(".", 1)[-1] for path in (output / "exports").iterdir())
    assert {"alto.xml", "page.xml", "hocr", "txt"} <= set(exported), exported
    pages = _read(str(output), "pages").to_pylist()
    lines = [line for page in pages for line in page["lines"]]
    assert lines and f"lines: {len(lines)}\n" in said
    confidences = np.array([line["confidence"] for line in lines])
    assert np.all((confidences >= 0) & (confidences <= 1))
    # a random 8-token model never reaches end-of-sequence: every line is flagged, none silently cut
    assert all(line["truncated"] for line in lines)
    for line in lines:  # words for LayoutLM: boxes inside the line, normalised to 0-1000
        assert [word["text"] for word in line["words"]] == line["text"].split()
        x0, y0, x1, y1 = line["bbox"]
        for word in line["words"]:
            wx0, wy0, wx1, wy1 = word["bbox"]
            assert x0 <= wx0 < wx1 <= x1 and y0 <= wy0 < wy1 <= y1
            assert all(0 <= value <= 1000 for value in word["bbox_norm"])
            assert 0 <= word["confidence"] <= 1  # from the word's own tokens
    for page in pages:  # page text is the line texts in reading order (blank lines between blocks)
        assert [t for t in page["text"].split("\n") if t] == [line["text"] for line in page["lines"] if line["text"]]


def test_cli_bad_model_fails_fast_with_clear_message(input_folder, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(input_folder), "--output", str(tmp_path / "out"),
         "--set", f"recognize.model={tmp_path / 'no-such-model'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == ExitCode.model_error
    assert "no-such-model" in result.stderr
    assert not (tmp_path / "out" / "pages").exists()


@pytest.mark.parametrize("model, said", [
    ("example-archive/trocr-not-downloaded", "is no bundled model (handwritten, printed) nor a local folder, it is not "
                                              "in the local Hugging Face cache, and the hub (http://127.0.0.1:9) cannot "
                                              "be reached to fetch it"),
    ("HANDWRITTEN", "no model 'HANDWRITTEN': the bundled models are handwritten, printed (names are in lower case)")])
def test_a_model_only_an_unreachable_hub_could_give_fails_at_once_saying_so(input_folder, tmp_path, model, said):
    """Offline (as many archives are), a hub id had taken transformers 100 s of retries, each printed, to fail
    blaming the image processor; so had a bundled name in capitals, taken for a hub id."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(input_folder), "--output", str(tmp_path / "out"),
         "--dry-run", "--set", f"recognize.model={model}"],
        capture_output=True, text=True, timeout=300,  # no proxy: one would be trusted to reach the hub
        env={**{key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")},
             "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == ExitCode.model_error
    assert said in result.stderr, result.stderr[-2000:]
    assert "Retrying" not in result.stderr


def test_a_precision_this_machine_cannot_run_fails_before_any_page_is_read(ray_local, synthetic_documents, tmp_path):
    """fp16 with ``device: auto`` passes the config (a GPU machine runs it); on a local run without
    CUDA the driver refuses it at start-up, instead of each recognizer actor once the pages are read."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine runs fp16")
    config = load_config(None, ["recognize.precision=fp16"])
    with pytest.raises(ModelLoadError, match="precision fp16 needs a CUDA device"):
        run_job([str(synthetic_documents[0])], str(tmp_path / "out"), config)
    assert not (tmp_path / "out" / "pages").exists()


def test_generation_settings_the_fast_engine_lacks_fail_the_job_before_any_page_is_read(ray_local, input_folder,
                                                                                       tiny_model, tmp_path):
    """A checkpoint whose generation config sets what the fast engine does not implement is refused by the
    driver with the engine's own error and exit code (before, each recognizer actor failed once Ray had
    started it, and the job ended in Ray's traceback)."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "ngram-model"))
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "no_repeat_ngram_size": 3}))
    config = load_config(None, [f"recognize.model={model}"])
    with pytest.raises(ModelLoadError, match="no_repeat_ngram_size.*use recognize.engine=hf"):
        run_job([str(input_folder)], str(tmp_path / "out"), config)
    assert not (tmp_path / "out" / "pages").exists()
    check_generation_settings(str(tiny_model))  # the unchanged checkpoint passes


def test_a_job_stopped_mid_stream_reports_its_own_error_and_leaves_no_fetching_thread(ray_local):
    """What a write failure does to the job's stream: the error that stopped it comes out, and Ray
    Data's block fetchers are gone before Ray could be shut down (see pipeline.job._batches_of)."""
    import threading

    from pipeline.job import _batches_of

    dataset = ray_local.data.range(2000, override_num_blocks=40).map_batches(lambda batch: batch)
    with pytest.raises(OSError, match="No space left"):
        with _batches_of(dataset) as batches:
            next(batches)
            raise OSError(28, "No space left on device")
    assert not [thread.name for thread in threading.enumerate() if thread.name == "iter_threaded"]


def test_filesystem_uris_for_inputs_and_output(ray_local, synthetic_documents, tmp_path):
    """Inputs and output given as pyarrow filesystem URIs (file:// here; s3:// and gs:// take the same path)."""
    source = synthetic_documents[0]
    output_uri = f"file://{tmp_path / 'out'}"
    summary = run_job([f"file://{source.parent}/{source.stem}.*"], output_uri,
                      load_config(None, ["rasterize.dpi=150"]), mode="detect")
    assert summary.written.documents_ok == 1
    (document,) = _read(str(tmp_path / "out"), "documents").to_pylist()
    assert document["source"] == f"file://{source}"
    assert document["num_pages"] == len(load_ground_truth(source)["pages"])
    # the copies the URI's pages were read from are taken out when the job ends, not left in the temporary folder
    # (which is the user's, shared with any other job here: this job's copy is known by its bytes)
    copies = Path(tempfile.gettempdir()) / f"trocr-pipeline-inputs-{os.getuid()}"
    assert not [path for path in copies.glob("*.copy") if path.read_bytes() == source.read_bytes()]


def test_shipped_model_reads_the_page_text(ray_local, synthetic_documents, tmp_path):
    """The default configuration, bundled model included, on pages it never saw: the text in reading
    order matches the documents' ground truth (CER over the first page of each document, jiwer: one-
    and two-column pages, from PDF and TIFF; all 9 pages would double the test's time)."""
    assert DEFAULT_MODEL.is_dir(), "the bundled model is part of the repository"
    output = str(tmp_path / "out")
    summary = run_job([str(path) for path in synthetic_documents], output, load_config(None, ["rasterize.pages=1"]))
    assert summary.written.documents_ok == len(synthetic_documents)
    pages = {(os.path.basename(row["source"]), row["page"]): row["text"] for row in _read(output, "pages").to_pylist()}
    references, predictions = [], []
    for path in synthetic_documents:
        references.append(page_texts(load_ground_truth(path))[1])
        predictions.append(pages.pop((path.name, 1)))
    assert not pages
    cer = jiwer.cer(references, predictions)
    assert cer < 0.03, f"CER {cer:.2%}"


def test_awkward_names_as_path_glob_and_file_uri(ray_local, tmp_path):
    """Names with spaces, #, %, & and non-ASCII, given as a path, a glob and a percent-encoded file:// URI."""
    folder = tmp_path / "Akten #7 – 50% & mehr"
    folder.mkdir()
    names = ["Brief an Müller & Co #2.png", "Rechnung 100% (東京).png", "Notiz [1].png"]
    for index, name in enumerate(names):
        text_page([f"Document {index} with an awkward name"], size=(600, 300)).save(folder / name, dpi=(150, 150))
    inputs = [str(folder / names[0]), str(folder / "Rechnung*"), f"file://{quote(str(folder / names[2]))}"]
    output = tmp_path / "out"
    summary = run_job(inputs, str(output), load_config(None, ["rasterize.dpi=150"]), mode="detect")
    assert summary.written.documents_ok == 3
    sources = sorted(row["source"] for row in _read(str(output), "documents").to_pylist())
    assert sources == sorted([str(folder / names[0]), str(folder / names[1]), inputs[2]])
    assert all(len(page["lines"]) == 1 for page in _read(str(output), "pages").to_pylist())


def test_same_bytes_seen_in_a_later_run_is_a_duplicate_of_the_published_document(ray_local, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    text_page(["The original letter"], size=(600, 300)).save(folder / "a.png", dpi=(150, 150))
    output, config = str(tmp_path / "out"), load_config(None, ["rasterize.dpi=150"])
    run_job([str(folder)], output, config, mode="detect")
    shutil.copy(folder / "a.png", folder / "b.png")
    again = run_job([str(folder)], output, config, mode="detect")
    assert (again.documents_skipped, again.written.documents_duplicate, again.written.pages) == (1, 1, 0)
    rows = {os.path.basename(row["source"]): row for row in _read(output, "documents").to_pylist()}
    assert rows["b.png"]["status"] == "duplicate" and rows["b.png"]["duplicate_of"] == rows["a.png"]["doc_id"]
    assert _read(output, "pages").num_rows == 1
    assert run_job([str(folder)], output, config, mode="detect").documents_skipped == 2


def test_a_document_whose_every_page_is_too_large_has_a_failed_row_for_each(ray_local, tmp_path):
    """It had failed with 0 pages and no pages row, as a file that cannot be opened: a foldout's page fails on its
    own, and so does every page here."""
    folder = tmp_path / "in"
    folder.mkdir()
    text_page(["A page of a usual size"], size=(600, 300)).save(folder / "a.png", dpi=(150, 150))
    Image.new("1", (3000, 3000), 1).save(folder / "map.png")
    stream = io.StringIO()
    progress = JobProgress(stream=stream, interactive=False, interval_s=0)
    config = load_config(None, ["rasterize.dpi=150", "rasterize.max_page_pixels=4000000"])
    report = dry_run([str(folder)], str(tmp_path / "out"), config, mode="detect").describe()
    assert (f"failed       1 pages  {folder / 'map.png'} (page_too_large: page 1 is 3000x3000 px" in report
            and "2 found, 1 to process, 1 failing, 0 duplicates" in report), report
    run_job([str(folder)], str(tmp_path / "out"), config, mode="detect", progress=progress)
    progress.close()
    rows = {os.path.basename(row["source"]): row for row in _read(str(tmp_path / "out"), "documents").to_pylist()}
    assert [(rows[name]["status"], rows[name]["error_code"], rows[name]["num_pages"]) for name in ("a.png", "map.png")
            ] == [("ok", None, 1), ("failed", "page_too_large", 1)]
    pages = {os.path.basename(row["source"]): row for row in _read(str(tmp_path / "out"), "pages").to_pylist()}
    assert (pages["map.png"]["page"], pages["map.png"]["status"], pages["map.png"]["error_code"]) == (
        1, "failed", "page_too_large")
    assert pages["map.png"]["error_message"] == (
        "page 1 is 3000x3000 px, over the limit of 4000000 pixels (rasterize.max_page_pixels)")
    assert "documents 2/2 (1 failed), pages 2/2," in stream.getvalue().splitlines()[-1], stream.getvalue()


def test_a_run_into_a_detect_output_is_refused_instead_of_leaving_its_lines_without_text(ray_local, tmp_path):
    """It had skipped every document as done, exit 0, and `show` then printed pages that were never read."""
    text_page(["A letter read for its layout only"], size=(600, 300)).save(tmp_path / "a.png", dpi=(150, 150))
    output, config = str(tmp_path / "out"), load_config(None, ["rasterize.dpi=150"])
    run_job([str(tmp_path / "a.png")], output, config, mode="detect")
    assert _read(output, "documents").column("mode").to_pylist() == ["detect"]
    for attempt in (dry_run, run_job):
        with pytest.raises(ConfigError, match="1 of these documents is in .* from `trocr-pipeline detect`"):
            attempt([str(tmp_path / "a.png")], output, config, mode="recognize")
    assert run_job([str(tmp_path / "a.png")], output, config, mode="detect").documents_skipped == 1


def test_a_run_by_another_model_into_an_output_is_refused_instead_of_skipping_what_the_first_read(ray_local, tmp_path,
                                                                                                 tiny_model):
    """A run with the handwritten model into an output the printed one wrote had skipped every document as done,
    exit 0: the user's new model never read them, and nothing in the output said which model had. Models are the
    same by their weights: a copy elsewhere reads on, a folder trained again in place is refused."""
    text_page(["A letter read by one model"], size=(600, 300)).save(tmp_path / "a.png", dpi=(150, 150))
    model = shutil.copytree(tiny_model, tmp_path / "model")
    output = str(tmp_path / "out")

    def config(folder: Path):
        return load_config(None, ["rasterize.dpi=150", f"recognize.model={folder}", "recognize.max_new_tokens=4"])

    run_job([str(tmp_path / "a.png")], output, config(model))
    first = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    [row] = _read(output, "documents").to_pylist()
    assert (row["model"], row["model_sha256"]) == (str(model.resolve()), first)
    copy = shutil.copytree(model, tmp_path / "copy")
    assert run_job([str(tmp_path / "a.png")], output, config(copy)).documents_skipped == 1
    weights = bytearray((model / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one weight of the last tensor changed: the model trained again, in place
    (model / "model.safetensors").write_bytes(bytes(weights))
    again = hashlib.sha256(weights).hexdigest()
    shutil.copy(tmp_path / "a.png", tmp_path / "copy-of-a.png")  # one document still (it had counted as two)
    for attempt in (dry_run, run_job):
        with pytest.raises(ConfigError, match=(
                f"1 of these documents is in .* read by the model {model.resolve()} \\(weights SHA-256 {first[:16]}\\) "
                f".*, and this run reads with {model.resolve()} \\(weights SHA-256 {again[:16]}\\)")):
            attempt([str(tmp_path / "a.png"), str(tmp_path / "copy-of-a.png")], output, config(model))


def test_a_rerun_and_its_dry_run_warn_only_of_documents_lacking_the_exports_asked_for(ray_local, tmp_path, caplog):
    """Every rerun that asked for exports had warned that the documents already written were not exported again,
    even when they had those very exports: a scheduled job's log warned on every run."""
    text_page(["A letter exported as ALTO"], size=(600, 300)).save(tmp_path / "a.png", dpi=(150, 150))
    (tmp_path / "b.pdf").write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog")  # fails triage: no page to export
    inputs, output = [str(tmp_path / "a.png"), str(tmp_path / "b.pdf")], str(tmp_path / "out")

    def exported(formats: str):
        return load_config(None, ["rasterize.dpi=150", f"output.exports=[{formats}]"])

    run_job(inputs, output, exported("alto"), mode="detect")
    assert sorted((row["status"], row["exports"]) for row in _read(output, "documents").to_pylist()) == [
        ("failed", None), ("ok", ["alto"])]
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert run_job(inputs, output, exported("alto"), mode="detect").documents_skipped == 2
        dry_run(inputs, output, exported("alto"), mode="detect")
        assert "without all the exports" not in caplog.text
        # the dry run says it as the run does (it had said nothing of exports the run would not write)
        for attempt in (dry_run, run_job):
            caplog.clear()
            attempt(inputs, output, exported("alto,txt"), mode="detect")
            assert re.search(r"1 document is already in .* without all the exports this run asks for \(.*a\.png\)",
                             caplog.text), caplog.text


def test_a_file_replaced_under_its_name_is_warned_of_and_a_copy_of_its_old_bytes_is_not_sent_to_it(ray_local, tmp_path,
                                                                                                   caplog, capsys):
    """A nightly job over a folder where a scan was replaced under its name: the new bytes are a new document beside
    the earlier reading, which no run had said (show printed two identical lines). A copy of the old bytes, or of a
    deleted file's, was a duplicate "same bytes as" a file that no longer held them."""
    folder = tmp_path / "in"
    folder.mkdir()
    text_page(["The first letter"], size=(600, 300)).save(folder / "a.png", dpi=(150, 150))
    text_page(["A second letter"], size=(600, 300)).save(folder / "b.png", dpi=(150, 150))
    (folder / "f.png").write_bytes(b"not an image yet")  # failed, then repaired: no earlier reading to warn of
    output, config = str(tmp_path / "out"), load_config(None, ["rasterize.dpi=150"])
    run_job([str(folder)], output, config, mode="detect")
    text_page(["A repaired letter"], size=(600, 300)).save(folder / "f.png", dpi=(150, 150))
    shutil.copy(folder / "a.png", folder / "d.png")
    shutil.move(folder / "b.png", folder / "e.png")
    earlier = (folder / "d.png").stat().st_mtime_ns
    text_page(["A letter written over the first"], size=(600, 300)).save(folder / "a.png", dpi=(150, 150))
    os.utime(folder / "a.png", ns=(earlier - 10**9, earlier - 10**9))  # an older scan put back (cp -p, rsync -t)
    warning = rf"1 file was read into {output} before, from other bytes \({folder / 'a.png'}\): it is read as a new document"
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        report = dry_run([str(folder)], output, config, mode="detect").describe()
        assert re.search(warning, caplog.text), caplog.text
        caplog.clear()
        run_job([str(folder)], output, config, mode="detect")
        assert re.search(warning, caplog.text), caplog.text
    assert (f"d.png (same bytes as the document read earlier from {folder / 'a.png'}, which now holds other bytes)"
            in report), report
    assert f"e.png (same bytes as the document read earlier from {folder / 'b.png'}, which is not found here)" in report
    assert main(["show", output, "--pages", "0"]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if "f.png" not in line]
    assert sorted(shown) == sorted([
        f"duplicate    1 pages  {folder / 'd.png'} (same bytes as {folder / 'a.png'})",
        f"duplicate    1 pages  {folder / 'e.png'} (same bytes as {folder / 'b.png'})",
        f"ok           1 pages  {folder / 'a.png'} (the file has changed since this reading)",
        f"ok           1 pages  {folder / 'a.png'}", f"ok           1 pages  {folder / 'b.png'}",
        "documents: 4 ok, 1 failed, 2 duplicates"]), shown
    (folder / "a.png").unlink()  # gone: the readings are told apart as far as they can be
    assert main(["show", output, "--pages", "0"]) == 0
    assert capsys.readouterr().out.count("(one of 2 readings of this file, of different bytes)") == 2


def test_a_file_that_could_not_be_read_is_replaced_by_its_reading_when_a_rerun_can_read_it(ray_local, tmp_path):
    """A file whose bytes a run could not read (here a FIFO; an object store's network fault in the field) is read
    by the next run that can, and its failed row goes: it had stayed beside the reading, two rows for one source."""
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "b.png")
    output = str(tmp_path / "out")
    config = load_config(None, ["rasterize.dpi=150"])
    assert run_job([str(folder)], output, config, mode="detect").written.documents_failed == 1
    (folder / "b.png").unlink()
    text_page(["The letter itself"], size=(600, 300)).save(folder / "b.png", dpi=(150, 150))
    assert "1 failed document to take out and read again" in dry_run([str(folder)], output, config,
                                                                     mode="detect").describe()
    again = run_job([str(folder)], output, config, mode="detect")
    assert (again.retried, again.written.documents_ok) == (1, 1), again.describe()
    assert [row["status"] for row in _read(output, "documents").to_pylist()] == ["ok"]


def test_a_file_renamed_while_a_run_read_it_is_read_by_the_next_run(ray_local, tmp_path):
    """A hot folder: a.png renamed to b.png (or its folder renamed) while a run rendered it fails as source_changed
    under its bytes' doc_id. The next run had made b.png a duplicate of that failed row, its pages never read, with
    exit 0 (and --retry-failed could not help, a.png being gone); now it takes the row out and reads b.png."""
    folder = tmp_path / "in"
    folder.mkdir()
    text_page(["The letter itself"], size=(600, 300)).save(folder / "b.png", dpi=(150, 150))
    output, config = str(tmp_path / "out"), load_config(None, ["rasterize.dpi=150"])
    sink = ParquetSink(output, rows_per_file=100)
    moved = hashlib.sha256((folder / "b.png").read_bytes()).hexdigest()
    sink.expect(DocumentRecord(moved, str(folder / "a.png"), "ok", None, None, 1))  # as the run that read it
    sink.add_page(PageWork(moved, str(folder / "a.png"), 1, 150).fail(
        "source_changed", f"{folder / 'a.png'} was deleted or moved while the job read it"))
    sink.close()
    assert f"ok           1 pages  {folder / 'b.png'}\n" in dry_run([str(folder)], output, config, mode="detect").describe()
    again = run_job([str(folder)], output, config, mode="detect")
    assert (again.retried, again.written.documents_ok, again.written.documents_duplicate) == (1, 1, 0)
    assert [(row["source"], row["status"]) for row in _read(output, "documents").to_pylist()] == [
        (str(folder / "b.png"), "ok")]


def test_a_rerun_says_which_documents_it_skips_failed_and_exits_4(ray_local, tmp_path, capsys):
    """A rerun after a stop (or any rerun) had exited 0 with "N already done" while the output held failed
    documents of its inputs: only the run that was stopped had told of them."""
    folder = tmp_path / "in"
    folder.mkdir()
    text_page(["A letter"], size=(600, 300)).save(folder / "a.png", dpi=(150, 150))
    (folder / "b.png").write_bytes(b"not an image")
    output, config = str(tmp_path / "out"), load_config(None, ["rasterize.dpi=150"])
    assert run_job([str(folder)], output, config, mode="detect").written.documents_failed == 1
    again = run_job([str(folder)], output, config, mode="detect")
    assert (again.documents_skipped, again.failed_earlier, again.written.documents_failed) == (2, 1, 0)
    # a command to copy (`show --failed` alone had not been one)
    assert f"2 already done (1 of them failed: `trocr-pipeline show {output} --failed` names them)" in again.describe()
    assert main(["detect", str(folder), "--output", output, "--set", "rasterize.dpi=150", "--dry-run"]) == 4
    shown = capsys.readouterr().out
    assert f"2 already done (1 of them failed: `trocr-pipeline show {output} --failed`" in shown
    assert not re.search("^done", shown, re.MULTILINE), shown  # counted, not listed (new files had been lost among them)
    assert run_job([str(folder / "a.png")], output, config, mode="detect").failed_earlier == 0  # not an input


def test_retry_failed_reads_a_repaired_file_again_in_place_of_its_failed_row(ray_local, tmp_path):
    """With --retry-failed a failed document's row is replaced by the new outcome of its source (without it,
    a repaired file is a second row beside the failed one), the dry run says so first, and the good document
    in the same part stays untouched."""
    folder = tmp_path / "in"
    folder.mkdir()
    text_page(["The original letter"], size=(600, 300)).save(folder / "a.png", dpi=(150, 150))
    (folder / "b.png").write_bytes(b"not an image yet")
    output = str(tmp_path / "out")
    plain, retry = (load_config(None, ["rasterize.dpi=150", *extra]) for extra in ([], ["output.retry_failed=true"]))
    assert run_job([str(folder)], output, plain, mode="detect").written.documents_failed == 1
    same = run_job([str(folder)], output, retry, mode="detect")  # the same bytes: tried and failed again, once
    assert (same.retried, same.written.documents_failed, _read(output, "documents").num_rows) == (1, 1, 2)
    (failed_id,) = [row["doc_id"] for row in _read(output, "documents").to_pylist() if row["status"] == "failed"]
    text_page(["The repaired letter"], size=(600, 300)).save(folder / "b.png", dpi=(150, 150))
    assert failed_id in dry_run([str(folder)], output, plain, mode="detect").done
    retried = dry_run([str(folder)], output, retry, mode="detect")
    assert failed_id not in retried.done
    # the dry run says what the run will take out (it had not)
    assert "1 already done, 1 failed document to take out and read again" in retried.describe()
    again = run_job([str(folder)], output, retry, mode="detect")
    assert (again.retried, again.documents_skipped, again.written.documents_ok, again.written.pages) == (1, 1, 1, 1)
    assert ("1 ok, 0 failed, 0 duplicates, 1 already done, 1 failed document taken out and read again"
            in again.describe())
    rows = {os.path.basename(row["source"]): row["status"] for row in _read(output, "documents").to_pylist()}
    assert rows == {"a.png": "ok", "b.png": "ok"} and _read(output, "documents").num_rows == 2
    assert sorted(os.path.basename(source) for source in _read(output, "pages").column("source").to_pylist()) == [
        "a.png", "b.png"]
    # a failed file and its copy: the failed document is counted, not the copy's row resting on it (had been 2)
    (folder / "d.png").write_bytes(b"not an image either")
    shutil.copy(folder / "d.png", folder / "e.png")
    assert run_job([str(folder)], output, plain, mode="detect").written.documents_failed == 2
    assert run_job([str(folder)], output, retry, mode="detect").retried == 1


def test_bundled_handwritten_model_reads_a_synthetic_handwritten_page(ray_local, tmp_path):
    """recognize.model=handwritten, the short name of the second bundled model, through the whole job on
    a page in handwriting fonts it never saw these lines of (3.9% CER when written)."""
    from pipeline.synth.docs import write_document_set

    (document,) = write_document_set(tmp_path / "docs", count=1, seed=11, dpi=150, formats=("pdf",),
                                     pages_per_document=(1, 1), two_column_share=0.0, font_kind="handwritten")
    output = str(tmp_path / "out")
    summary = run_job([str(document)], output, load_config(None, ["recognize.model=handwritten"]))
    assert summary.written.documents_ok == 1
    (page,) = _read(output, "pages").to_pylist()
    lines = sorted(load_ground_truth(document)["pages"][0]["lines"], key=lambda line: (line["block"], line["order"]))
    assert jiwer.cer("\n".join(line["text"] for line in lines), page["text"]) < 0.1


def _run_python(script: str, *args: str, exit_code: int = 0) -> str:
    """``script`` in a process of its own, with a Ray instance of its own (this one's may be shared by the tests)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == exit_code, done.stderr
    return done.stdout


def test_the_command_leaves_what_it_loaded_out_of_the_collections_at_its_exit(tmp_path):
    """The interpreter's garbage collections at exit had taken 1.2 s after a job, with torch loaded: the command's
    process freezes (``gc.freeze``) every object then alive before it exits, the way it ended."""
    script = ("import atexit, gc, sys\n"
              "atexit.register(lambda: print(gc.get_freeze_count()))\n"
              "from pipeline.cli import entry\n"
              "sys.argv = ['trocr-pipeline', 'run', sys.argv[1], '--output', sys.argv[2]]\n"
              "entry()\n")
    frozen = _run_python(script, str(tmp_path / "missing.pdf"), str(tmp_path / "out"), exit_code=ExitCode.input_file)
    assert int(frozen) > 10_000


def test_the_driver_collects_no_garbage_while_it_loads_and_never_again_over_what_it_loaded(tmp_path, tiny_model):
    """Garbage collections over torch's, transformers' and Ray's million objects: while the driver loaded them (each
    collection a pass over all loaded so far), during Ray Data's start (0.5 s), and a full one before Ray's shutdown
    (0.6 s at every job's end; bench/RESULTS.md, thirty-seventh session). None runs while they load, they are frozen
    (``gc.freeze``) once loaded, and thawed when the job is done, so that a process that goes on collects them."""
    text_page(["A note on a single sheet of paper."]).save(tmp_path / "note.png", dpi=(150, 150))
    script = ("import gc, sys\n"
              "from pipeline.config import load_config\nfrom pipeline.job import run_job\n"
              "full = []\n"
              "def heard(phase, info):\n"
              "    if phase == 'start' and info['generation'] == 2:\n"
              "        full.append(gc.get_freeze_count())\n"
              "config = load_config(None, ['rasterize.dpi=150', f'recognize.model={sys.argv[3]}', "
              "'recognize.max_new_tokens=4'])\n"
              "gc.callbacks.append(heard)\n"
              "run_job([sys.argv[1]], sys.argv[2], config)\n"
              "gc.callbacks.remove(heard)\n"
              "print(gc.get_freeze_count(), gc.isenabled(), *full)\n")
    printed = _run_python(script, str(tmp_path / "note.png"), str(tmp_path / "out"), str(tiny_model))
    frozen_after, enabled_after, *frozen_at_each = printed.split()
    assert frozen_at_each and all(int(frozen) > 100_000 for frozen in frozen_at_each), frozen_at_each
    assert (frozen_after, enabled_after) == ("0", "True")


def test_a_recognizer_collects_no_garbage_while_it_loads_and_never_again_over_what_it_loaded(tiny_model):
    """The same in the recognizer actor, whose start (importing torch and transformers, loading the model) is on the
    job's critical path: 14-31% of its import time had gone to collections."""
    script = ("import gc, sys\n"
              "from pipeline.config import load_config\nfrom pipeline.job import _RecognizeBatch\n"
              "full = []\n"
              "gc.callbacks.append(lambda phase, info: phase == 'start' and info['generation'] == 2 and "
              "full.append(gc.get_freeze_count()))\n"
              "_RecognizeBatch(load_config(None, [f'recognize.model={sys.argv[1]}']))\n"
              "print(gc.get_freeze_count(), gc.isenabled(), len(full))\n")
    frozen, enabled, collections = _run_python(script, str(tiny_model)).split()
    assert int(frozen) > 100_000 and enabled == "True" and collections == "0"


def test_rays_autoscaler_monitor_is_stopped_before_the_gcs_it_would_wait_on():
    """Ray stops a local instance's autoscaler monitor after its GCS, and the monitor's SIGTERM handler then waits on
    the gone GCS until Ray kills it a second later: 1 s at the end of every local job. The job stops it first."""
    script = ("import os, threading, time, ray\n"
              "from ray._private import ray_constants as kinds\n"
              "from pipeline.config import load_config\nfrom pipeline.job import ray_session\n"
              "def running(pid):\n"
              "    try:\n"
              "        with open(f'/proc/{pid}/stat') as stat:\n"
              "            return stat.read().rsplit(')', 1)[1].split()[0] != 'Z'\n"
              "    except FileNotFoundError:\n"
              "        return False\n"
              "ended = []\n"
              "with ray_session(load_config(None, [])):\n"
              "    node = ray._private.worker._global_node\n"
              "    pids = {kind: node.all_processes[kind][0].process.pid for kind in (kinds.PROCESS_TYPE_MONITOR, "
              "kinds.PROCESS_TYPE_GCS_SERVER)}\n"
              "    def watch():\n"
              "        while len(ended) < len(pids):\n"
              "            ended.extend(kind for kind, pid in pids.items() if kind not in ended and not running(pid))\n"
              "            time.sleep(0.002)\n"
              "    watcher = threading.Thread(target=watch, daemon=True)\n"
              "    watcher.start()\n"
              "watcher.join(30)\n"
              "print(' '.join(ended))\n")
    assert _run_python(script).split() == ["monitor", "gcs_server"]
