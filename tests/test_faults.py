"""Faults on a real local Ray instance: a run stopped by SIGTERM, its rerun killed with SIGKILL, a second run on one
output while the next rerun holds it, a recognizer actor killed mid-batch, a disk that fills up, an output that
cannot be written. Every document and page ends up in the output exactly once."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from operators.errors import ExitCode
from operators.write import LOCK_FILE
from pipeline.cli import main
from pipeline.synth.docs import load_ground_truth, write_document_set

RECOGNIZER_TITLE = "MapBatches(_RecognizeBatch)"


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("fault-docs")
    return write_document_set(folder, count=8, seed=23, dpi=100, formats=("pdf", "tiff"), pages_per_document=(1, 2))


def _job_arguments(documents: list[Path], output: Path, model: Path, line_batch_size: int = 1) -> list[str]:
    """The CLI job: one page per actor call so results stream in steadily, and by default one line per
    model call so each actor call lasts long enough to be caught (and killed) inside."""
    return ["run", str(documents[0].parent), "--output", str(output),
            "--set", "rasterize.dpi=100", "--set", f"recognize.model={model}", "--set", "ray.num_cpus=2",
            "--set", "recognize.max_new_tokens=16", "--set", "output.parquet_rows_per_file=1",
            "--set", "recognize.pages_per_batch=1", "--set", f"recognize.line_batch_size={line_batch_size}"]


def _job(arguments: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """The CLI job in its own process group, with the Ray instance it starts (unless ``env`` names one to join)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def _published(output: Path) -> int:
    """Documents rows published so far (each part is whole once it has its name)."""
    folder = output / "documents"
    return sum(pq.read_metadata(part).num_rows for part in folder.glob("*.parquet")) if folder.exists() else 0


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _check_exactly_once(output: Path, documents: list[Path]) -> list[dict]:
    rows = ds.dataset(output / "documents", format="parquet").to_table().to_pylist()
    assert Counter(Path(row["source"]).name for row in rows) == Counter(p.name for p in documents)
    assert all(row["status"] == "ok" for row in rows)
    pages = ds.dataset(output / "pages", format="parquet").to_table().to_pylist()
    expected = Counter((p.name, page["page"]) for p in documents for page in load_ground_truth(p)["pages"])
    assert Counter((Path(page["source"]).name, page["page"]) for page in pages) == expected
    assert list((output / "_staging").iterdir()) == []
    return pages


def _lock_held(output: Path) -> bool:
    """Whether a process holds the output's run lock (``operators.write.output_lock``). Read from
    /proc/locks: taking the lock to test it could make the run itself find it taken."""
    try:
        inode = (output / LOCK_FILE).stat().st_ino
    except FileNotFoundError:
        return False
    held = [line.split() for line in Path("/proc/locks").read_text().splitlines() if "->" not in line]
    return any(fields[1] == "FLOCK" and fields[5].endswith(f":{inode}") for fields in held)


def test_a_run_stopped_then_killed_then_run_again_writes_every_document_once(documents, tiny_model, tmp_path,
                                                                             joining_ray_local, capsys):
    """Three runs on one output.
    1. Stopped by SIGTERM (`kill`, systemd, `ray job stop`): Ray's handler had aborted the driver with a C++ stack dump
       (exit 134), and documents finished since the last 2,000-row part were redone. Finished documents are now
       published at least every publish_every_s and at the signal, and the console gets one line.
    2. Its rerun killed outright (SIGKILL), with the Ray instance it started.
    3. The next rerun (on the session's Ray instance) finishes, while a run started beside it (a cron job firing
       twice) stops at once, touches nothing and says why. Every document and page is in the output once."""
    output = tmp_path / "out"
    stopped = _job([*_job_arguments(documents, output, tiny_model), "--set", "output.parquet_rows_per_file=2000",
                    "--set", "output.publish_every_s=0.5", "--export", "txt,pdf,mets", "--pdfa"])  # exports of seconds
    try:
        _wait_for(lambda: (_published(output) >= 1 and any((output / "_staging").glob("exporting-*")))
                  or stopped.poll() is not None, 300, "the first published document, and exports in flight")
        assert stopped.poll() is None, f"the run ended before the signal (a machine too busy to see its exports): " \
            f"{stopped.communicate()[0][-3000:]}"
        os.kill(stopped.pid, signal.SIGTERM)
        log, _ = stopped.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stopped.pid, signal.SIGKILL)
    assert stopped.returncode == ExitCode.ctrl_c, log[-3000:]
    assert "trocr-pipeline: interrupted" in log and "SIGTERM received" not in log, log[-3000:]
    kept = _published(output)
    # what is safe, said (the console had been told only "interrupted")
    assert re.search(rf"^interrupted: {kept} documents? written to {output} by this run; the same command again goes "
                     "on with the others$", log, re.MULTILINE), log[-3000:]
    assert 1 <= kept <= len(documents) - 3, "the signal must land early in the job for this test to mean anything"
    # the exports of the documents it did not publish are taken out as it stops (they had stayed until the next run);
    # the notes naming them stay for the next start, should a cluster's export task still be writing
    published = {row["doc_id"][:16] for row in ds.dataset(output / "documents", format="parquet").to_table().to_pylist()}
    exported = {path.name.split(".")[0].rsplit("-", 1)[1] for path in (output / "exports").iterdir()}
    assert exported == published, (exported, published)
    assert all(path.name.startswith("exporting-") for path in (output / "_staging").iterdir())

    killed = _job(_job_arguments(documents, output, tiny_model))
    try:
        _wait_for(lambda: _published(output) > kept or killed.poll() is not None, 300, "a document published")
        os.killpg(killed.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    killed_at = _published(output)
    assert kept < killed_at < len(documents), "the kill must land mid-job for this test to mean anything"

    rerun = _job(_job_arguments(documents, output, tiny_model, line_batch_size=64), env=joining_ray_local)
    try:
        _wait_for(lambda: _lock_held(output) or rerun.poll() is not None, 300, "the rerun to hold the output")
        second = main(["detect", str(documents[0].parent), "--output", str(output)])
        assert rerun.poll() is None, "the rerun must still be running for the second run to mean anything"
        log, _ = rerun.communicate(timeout=600)
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
    assert second == ExitCode.output_locked
    assert f"another run is writing to {output}" in capsys.readouterr().err
    assert rerun.returncode == 0, log[-3000:]
    assert f"{killed_at} already done" in log
    _check_exactly_once(output, documents)


def _busy_recognizers(root: int) -> list[int]:
    """Recognizer actors under process ``root`` (the driver that started their Ray instance) that are
    inside a call right now."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    return [pid for pid, title in titles.items()
            if title.startswith(f"ray::MapWorker({RECOGNIZER_TITLE}).submit") and descends(pid)]


def test_recognizer_killed_mid_batch_loses_no_line(ray_local, documents, tiny_model, tmp_path, capsys):
    """The command line, in this process on the session's Ray instance; a thread kills the recognizer
    actors that are inside a call once there are any."""
    output = tmp_path / "out"
    killed: list[int] = []
    job_done = threading.Event()

    def kill_busy_recognizers() -> None:
        while not job_done.wait(0.2):
            if victims := _busy_recognizers(os.getpid()):
                for pid in victims:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(victims)
                return

    killer = threading.Thread(target=kill_busy_recognizers, daemon=True)
    killer.start()
    try:
        code = main(_job_arguments(documents, output, tiny_model))
    finally:
        job_done.set()
        killer.join()
    assert killed, "the job ended before a recognizer actor could be killed"
    assert code == 0, capsys.readouterr().err[-3000:]
    assert _published(output) == len(documents)
    pages = _check_exactly_once(output, documents)
    lines = [line for page in pages for line in page["lines"]]
    assert lines and all(line["text"] and line["confidence"] is not None for line in lines)


def test_output_that_cannot_be_written_fails_before_any_work(documents, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["detect", str(documents[0].parent), "--output", str(blocker / "out")]) == ExitCode.bad_args
    assert f"the output {blocker / 'out'} cannot be written" in capsys.readouterr().err


def test_disk_full_stops_with_a_clear_message_and_a_rerun_completes(ray_local, documents, small_disk, capsys):
    """The command line, in this process on the session's Ray instance (the job joins it)."""
    output = small_disk / "out"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024 - FREE_BYTES))  # leaves room for a few documents only
    command = ["detect", str(documents[0].parent), "--output", str(output), "--set", "rasterize.dpi=100",
               "--set", "output.parquet_rows_per_file=1"]
    assert main(command) == ExitCode.write_failed
    assert f"no space left on the device while writing {output}/_staging/" in capsys.readouterr().err
    published = ds.dataset(output / "documents", format="parquet").to_table()
    assert 1 <= published.num_rows < len(documents), "the disk must fill mid-job for this test to mean anything"
    filler.unlink()
    assert main(command) == 0
    assert f"{published.num_rows} already done" in capsys.readouterr().out
    _check_exactly_once(output, documents)


FREE_BYTES = 160 * 1024
