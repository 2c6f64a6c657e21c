"""What a job shows while it runs: one live line on a terminal, a summary line every half minute in a
log (also while nothing finishes: Ray starting, triage hashing a large archive, a long first batch),
``--log-json`` records for schedulers, and Ray's own chatter kept out of the way.

Ray Data prints its operator progress dumps every few seconds when stdout is not a terminal, and
the driver's core worker writes C++ log lines straight to file descriptor 2 (for example an error
line about actor restarts on every run with an actor pool; :mod:`pipeline.stderr_filter`). Both are
hidden unless ``--verbose``; Ray keeps them in its session logs either way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

from operators.errors import ConfigError
from operators.records import DocumentRecord, PageWork
from operators.storage import writing
from operators.text import printable_text
from pipeline import stderr_filter

if TYPE_CHECKING:  # the write stage's module is not loaded for it: eval and train show progress without it
    from operators.write import HeldPage, PagesRead

STDERR_FILTER = stderr_filter.__file__

#: Seconds between two summary lines in a non-interactive run, and between two redraws of the live line.
LOG_INTERVAL_S = 30.0
REDRAW_INTERVAL_S = 0.5
#: Pages done within so many seconds of the first are one batch, where the rates start.
FIRST_PAGES_S = 1.0
#: How many failed documents are named on the console, each with its error, as they fail.
NAMED_FAILURES = 10


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars and dumps, and its execution-plan lines, off unless ``verbose``; its
    warnings stay on the console only when verbose, its errors always (the session log keeps all)."""
    import ray.data  # here, not at the top: eval --lines and train take PeriodicProgress, without_ray_core_logs

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    shared = logging.getLogger().handlers  # pytest's capture, say, hung on every logger that does not propagate
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and handler not in shared:
            handler.setLevel(logging.INFO if verbose else logging.ERROR)


@contextmanager
def without_ray_core_logs() -> Iterator[None]:
    """File descriptor 2 through :mod:`pipeline.stderr_filter`, a child process that drops Ray's C++
    log lines (the core worker writes them below Python, so no logging setting reaches them) and
    passes every other byte unchanged. Not with RAY_LOG_TO_STDERR=1: Ray's own processes would then
    hold the pipe, and whoever set it wants Ray's lines."""
    if os.environ.get("RAY_LOG_TO_STDERR") == "1":
        yield
        return
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        # a session of its own: a terminal's Ctrl-C goes to the job, which still has things to say
        filter_process = subprocess.Popen([sys.executable, "-I", "-S", STDERR_FILTER], stdin=read_end,
                                          stdout=original, start_new_session=True)
    except OSError:
        os.close(original)
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    left = threading.Event()
    restoring = threading.Lock()

    def console_back_if_the_filter_dies() -> None:
        """A filter killed meanwhile (the OOM killer, a stray ``kill``) had ended the job at its next line to the
        console (BrokenPipeError), the documents it had finished unpublished: the console is fd 2 again."""
        filter_process.wait()
        with restoring:
            if not left.is_set():  # its usual end comes after the command's, once every holder of the pipe closed it
                os.dup2(original, 2)

    threading.Thread(target=console_back_if_the_filter_dies, name="stderr-filter-watch", daemon=True).start()
    try:
        yield
    finally:
        with suppress(OSError):  # what the filter, killed, never read
            sys.stderr.flush()
        with restoring:
            left.set()
            os.dup2(original, 2)  # closes the pipe's last write end: the filter reads to the end and stops
            os.close(original)
        try:
            filter_process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a process started meanwhile still holds the pipe: it ends with it
            pass


def _clock(seconds: float) -> str:
    """``0:07``, ``12:30``, ``1:02:03``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def check_log_json(path: Path) -> None:
    """What opening the ``--log-json`` file finds, found without writing (the dry run)."""
    if path.is_dir():
        why = "it is a folder"
    elif not path.parent.is_dir():
        why = f"there is no folder {path.parent}"
    elif not os.access(path if path.exists() else path.parent, os.W_OK):
        why = "permission denied"
    else:
        return
    raise ConfigError(f"cannot write the --log-json file {path}: {why}")


@dataclass
class PeriodicProgress:
    """Called with how many of how many are done (first when the work starts: the ETA's rate counts from there, so a
    resumed count's earlier part does not speed it up), it prints a ``progress:`` line at most every ``interval_s``,
    the first after one interval from its making: a long count (``eval --lines`` over thousands of lines, minutes on
    a CPU, had said nothing until its report) says how far it is, a short one says nothing."""

    what: str
    stream: IO[str] = field(default_factory=lambda: sys.stderr)
    interval_s: float = LOG_INTERVAL_S
    _began: float = field(default_factory=time.monotonic)
    _shown: float = field(default_factory=time.monotonic)
    _start: tuple[float, int] | None = None

    def __call__(self, done: int, total: int, detail: str = "") -> None:
        """``detail``: what else the line says, after how far the work is (``step 40/100, loss 1.2``)."""
        now = time.monotonic()
        if self._start is None:
            self._start = (now, done)
        started, done_at_start = self._start
        if done == done_at_start or now - self._shown < self.interval_s:
            return
        self._shown = now
        self.stream.write(f"progress: {self.what} {done / total:.0%} done, {detail + ', ' if detail else ''}"
                          f"{_clock(now - self._began)} elapsed, "
                          f"ETA {_clock((now - started) / (done - done_at_start) * (total - done))}\n")
        self.stream.flush()


@dataclass
class JobProgress:
    """Counts files triaged, then pages and documents as they finish; see the module docstring for what it
    prints. From :meth:`begin` to :meth:`close` a thread shows the status at least every interval, so a job
    that is busy but finishes nothing still says so, with the time it has run.

    ``interactive``: redraw one line in place (a terminal) instead of printing a summary line every
    ``interval_s``. ``log_json``: a file that gets one JSON object per finished document. ``loads_model``: the
    start names the model it waits for (a ``detect`` job has none)."""

    stream: IO[str] = field(default_factory=lambda: sys.stderr)
    interactive: bool = False
    interval_s: float = LOG_INTERVAL_S
    log_json: Path | None = None
    loads_model: bool = True
    files: int = 0
    files_triaged: int = 0
    documents: int = 0
    pages: int = 0
    documents_done: int = 0
    documents_failed: int = 0
    documents_published: int = 0
    pages_done: int = 0
    lines_done: int = 0
    _phase: str = "starting"
    _began: float = field(default_factory=time.monotonic)
    _started: float = field(default_factory=time.monotonic)
    _finished: float | None = None  # when the last page was done
    _first_pages: tuple[float, int, int] | None = None  # when the first pages were done, how many, with how many lines
    _terminal: int | None = None  # the terminal drawn on, kept: the stderr filter's pipe takes its place as fd 2
    _shown: float = 0.0
    _drawn: bool = False
    _log: IO[str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closing: threading.Event = field(default_factory=threading.Event)
    _heartbeat: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.interactive:
            with suppress(AttributeError, OSError, ValueError):  # a stream without a file (a test's)
                self._terminal = os.dup(self.stream.fileno())
        # opened before the job starts, so a path that cannot be written fails at once
        if self.log_json is not None:
            try:
                self._log = self.log_json.open("a", encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot write the --log-json file {self.log_json}: {exc.strerror}") from exc

    def begin(self) -> None:
        """The job has begun (Ray and the model are starting): the heartbeat starts, and on a terminal each log
        record written to the same stream clears the live line first (the heartbeat draws it again below)."""
        self._began = self._shown = time.monotonic()
        if self.interactive:
            for handler in logging.getLogger().handlers:
                if getattr(handler, "stream", None) is self.stream:
                    handler.addFilter(self._clear_live_line)
        self._heartbeat = threading.Thread(target=self._beat, name="progress-heartbeat", daemon=True)
        self._heartbeat.start()
        self._show(force=True)  # a log's first line at once, not after the first interval

    def triage_started(self, files: int) -> None:
        self._phase, self.files = "triage", files

    def file_triaged(self) -> None:
        self.files_triaged += 1
        self._show()

    def start(self, documents: int, pages: int) -> None:
        """The work ahead, known once triage is done; rates and the ETA count from here."""
        self._phase, self.documents, self.pages = "reading", documents, pages
        self._started = time.monotonic()
        self._show(force=True)  # the work ahead, in a log at once

    def page_done(self, work: PageWork) -> None:
        self.pages_done += 1
        self.lines_done += len(work.lines)
        now = time.monotonic()
        if self._first_pages is None or now - self._first_pages[0] < FIRST_PAGES_S:  # the first batch, one event
            self._first_pages = (self._first_pages or (now,))[0], self.pages_done, self.lines_done
        if self.pages_done == self.pages:  # the rate stands from here (it had kept falling while the job ended)
            self._finished = time.monotonic()
        self._show()

    def document_done(self, record: DocumentRecord, pages: list[HeldPage]) -> None:
        """The write stage's listener: one document and its pages, complete. The first failed documents are named
        with their error (the console had only counted them); the rest are in the output's tables."""
        self.documents_done += 1
        if record.status == "failed":
            self.documents_failed += 1
            if self.documents_failed <= NAMED_FAILURES:
                self._say(printable_text(f"failed: {record.source} ({record.error_code}: {record.error_message})"))
            if self.documents_failed == NAMED_FAILURES:
                self._say("further failed documents are not named here: `trocr-pipeline show DIR --failed` lists them all")
        self._show()

    def _say(self, line: str) -> None:
        """A line of its own, above the live line on a terminal (drawn again at the next beat); in a log, the next
        ``progress:`` line still comes at its interval."""
        with self._lock:
            self.stream.write(("\r\x1b[K" if self.interactive and self._drawn else "") + line + "\n")
            self.stream.flush()
            if self.interactive:
                self._shown = 0.0

    def document_published(self, record: DocumentRecord, read: PagesRead) -> None:
        """The write stage's listener once a document's row is in the output: its ``--log-json`` record
        (so a run killed before publishing, and run again, logs the document once)."""
        self.documents_published += 1
        if self._log is not None:
            entry = {"source": record.source, "doc_id": record.doc_id, "status": record.status,
                     "pages": read.pages, "lines": read.lines,
                     "seconds": round(read.seconds, 3) + 0.0,  # a float without pages too
                     "error": {"code": record.error_code, "message": record.error_message}
                     if record.error_code else None,
                     # a duplicate's record had not said which document holds its text
                     "duplicate_of": record.duplicate_of}
            with writing(f"the --log-json file {self.log_json}"):
                self._log.write(json.dumps(entry, ensure_ascii=False) + "\n")
                self._log.flush()

    def close(self) -> None:
        self._closing.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._clear_live_line)
        if self.interactive and (self.documents or self._drawn):
            self._show(force=True)
            self.stream.write("\n")
            self.stream.flush()
        if self._terminal is not None:
            os.close(self._terminal)
            self._terminal = None
        if self._log is not None:
            log, self._log = self._log, None
            try:
                log.close()
            except OSError:  # what it held could not be flushed: that write failed already, and said so
                pass

    def status(self, width: int | None = None) -> str:
        """``documents 3/5 (1 failed), pages 9/12, 14.2 lines/s, 1:40 elapsed, ETA 0:12``; before that,
        ``triage: files 120/4000, 0:52 elapsed`` or ``starting (Ray, the model), 0:04 elapsed``.

        ``width``: at most so many characters (a terminal's line), the rate and then the time elapsed left out
        first: a line wider than the terminal wraps, and each redraw in place had left its first row behind."""
        parts = self._status_parts()
        for leave_out in (None, "lines/s", "elapsed"):
            parts = [part for part in parts if leave_out is None or not part.endswith(leave_out)]
            line = ", ".join(parts)
            if width is None or len(line) <= width:
                return line
        return line[:width]

    def _status_parts(self) -> list[str]:
        now = time.monotonic()
        elapsed = f"{_clock(now - self._began)} elapsed"
        if self._phase == "starting":
            return [f"starting (Ray{', the model' if self.loads_model else ''})", elapsed]
        if self._phase == "triage":
            return [f"triage: files {self.files_triaged}/{self.files}", elapsed]
        # from the first pages done on, once more have been: counted from the end of triage, the rates had taken in
        # Ray's and the model's start, and the first ETA of an 8-minute job had said 34 minutes
        first = self._first_pages
        since, pages_then, lines_then = first if first and self.pages_done > first[1] else (self._started, 0, 0)
        reading = (self._finished or now) - since
        rate = (self.lines_done - lines_then) / reading if reading > 0 else 0.0
        if self.pages_done >= self.pages:
            eta = "0:00"
        elif pages_then:
            eta = _clock(reading / (self.pages_done - pages_then) * (self.pages - self.pages_done))
        else:
            eta = "-"
        failed = f" ({self.documents_failed} failed)" if self.documents_failed else ""
        return [f"documents {self.documents_done}/{self.documents}{failed}", f"pages {self.pages_done}/{self.pages}",
                f"{rate:.1f} lines/s", elapsed, f"ETA {eta}"]

    def _columns(self) -> int:
        """The width of the terminal drawn on (stdout's had been taken: 80 columns where it was piped on)."""
        if self._terminal is not None:
            with suppress(OSError):
                return os.get_terminal_size(self._terminal).columns
        return shutil.get_terminal_size().columns

    def _clear_live_line(self, record: logging.LogRecord) -> bool:
        """A logging filter that lets every record through, on a line of its own."""
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = 0.0  # drawn again at the next beat
        return True

    def _period(self) -> float:
        return REDRAW_INTERVAL_S if self.interactive else self.interval_s

    def _beat(self) -> None:
        """A line one period after the last one shown: on a fixed grid, a line shown between two beats had made
        the next beat pass without one, and a log's lines came up to twice the interval apart."""
        while not self._closing.wait(self._until_due()):
            self._show()

    def _until_due(self) -> float:
        with self._lock:
            return max(self._shown + self._period() - time.monotonic(), REDRAW_INTERVAL_S)

    def _show(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._shown < self._period():
                return
            self._shown, self._drawn = now, True
            if self.interactive:
                # one column short of the width: a line that fills the last column wraps on some terminals
                self.stream.write("\r\x1b[K" + self.status(self._columns() - 1))
            else:
                self.stream.write(f"progress: {self.status()}\n")
            self.stream.flush()
