"""The filter between a job's file descriptor 2 and the console, run as a child process.

Ray's core worker writes C++ log lines straight to file descriptor 2 (an error line about actor
restarts on every run with an actor pool), so no logging setting reaches them; this drops them and
passes everything else unchanged. It runs in a process of its own because Ray can end the driver
with ``_Exit`` right after a line saying why (for example when a thread touches the core worker
during ``ray.shutdown()``): a filter thread in the driver would die with that line still unread,
a filter process reads the pipe to its end. Started by path with ``python -I -S``: it imports only
the standard library, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys

#: A Ray C++ log line, its level in group 1: ``[2026-01-01 10:00:00,123 E 4242 4242] core_worker.cc:2465: ...``
#: (or from a header: ``rpc_client.h:153``).
#: Searched anywhere in a line: on a terminal it can follow a progress line redrawn in place.
#: As Ray forwards one from another process, it is named first, in colour on a terminal or in a log:
#: ``\x1b[33m(raylet)\x1b[0m [2026-... E 3672 3686] (raylet) file_system_monitor.cc:116: ...``.
RAY_CORE_LOG_LINE = re.compile(rb"(?:(?:\x1b\[[\d;]*m)?\([^)\n]*\)(?:\x1b\[0m)? )?"
                               rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([DIWEF]) \d+ \d+\] (?:\([^)\n]*\) )?\S+\.(?:cc|h):\d+:")
#: What Ray forwards from the raylet as a stopped job kills its actor pool (``ray.kill``): that the actor's tasks
#: "will be retried", which they will not be, glued to the live progress line.
RAY_KILLED_ACTOR_NOTICE = re.compile(rb"(?:\x1b\[[\d;]*m)?\(raylet\)(?:\x1b\[0m)? Task .* failed\. There are \S+ "
                                     rb"retries remaining, so the task will be retried\. Error: The actor is dead "
                                     rb"because it was killed by `ray\.kill`")
#: What Ray says when it ends the process right after (a fatal line passes too): the only word of
#: why a run ended with exit status 1 and nothing else. "The program will terminate": the GCS gone for 60 s (the
#: local instance stopped under the job by `ray stop`), which had ended a run with exit status 1 and no word.
RAY_EXIT_NOTICE = re.compile(rb"process will exit|not initialized yet or already|program will terminate")
#: Where a Ray log line may be starting in an unfinished line: a ``[`` before a digit or at the end so far, not the
#: ``[`` of a terminal control sequence (the progress line's ``\x1b[K``), which would hold the line back.
MAYBE_RAY_LINE = re.compile(rb"(?<!\x1b)\[(?=\d|$)|\x1b\[[\d;]*m\(|\x1b\[?[\d;]*$")


def ray_line_start(line: bytes) -> int | None:
    """Where a Ray log line to drop starts in ``line`` (0: the whole line is one), or None: none to
    drop, or Ray says there that it ends the process."""
    if (killed := RAY_KILLED_ACTOR_NOTICE.search(line)) is not None:
        return killed.start()
    found = RAY_CORE_LOG_LINE.search(line)
    if found is None or found.group(1) == b"F" or RAY_EXIT_NOTICE.search(line, found.end()):
        return None
    return found.start()


def _judged(line: bytes) -> bytes:
    """A whole line as it goes out: with its newline, or only what came before a Ray line in it."""
    cut = ray_line_start(line)
    return line + b"\n" if cut is None else line[:cut]


def forward(source: int, console: int) -> None:
    """Copy ``source`` to ``console`` until end of file, without Ray's log lines. Whole lines are
    judged; of an unfinished line, what comes before a possible Ray line goes out at once (a progress line
    redrawn in place with a carriage return never ends with a newline). If the console cannot be
    written any more, the rest is read and dropped, so the job never writes into a dead pipe."""
    pending = b""
    while chunk := os.read(source, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        out = b"".join(_judged(line) for line in lines)
        maybe = MAYBE_RAY_LINE.search(pending)
        out, pending = (out + pending, b"") if maybe is None else (out + pending[:maybe.start()], pending[maybe.start():])
        console = _write_all(console, out)
    cut = ray_line_start(pending)
    _write_all(console, pending if cut is None else pending[:cut])


def _write_all(console: int, data: bytes) -> int:
    """``console``, or -1 once it cannot be written (closed, broken pipe): the rest is dropped."""
    while data and console >= 0:
        try:
            data = data[os.write(console, data):]
        except BlockingIOError:
            select.select([], [console], [])
        except OSError:
            return -1
    return console


if __name__ == "__main__":
    # Ctrl-C and `ray job stop` are the job's to handle; this process ends when the job's end of the
    # pipe closes, after carrying its last words
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    forward(sys.stdin.fileno(), sys.stdout.fileno())
