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
import signal
import sys

#: A Ray C++ log line: ``[2026-01-01 10:00:00,123 E 4242 4242] core_worker.cc:2465: ...``.
RAY_CORE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+\.cc:\d+:")
#: Ray lines that always pass: a fatal line, or one saying that Ray ends the process now. They are
#: the only word of why a run ended with exit status 1 and nothing else.
RAY_EXIT_NOTICE = re.compile(rb"^\[[^\]]* F \d+ \d+\]|process will exit|not initialized yet or already")


def kept(line: bytes) -> bool:
    return not RAY_CORE_LOG_LINE.match(line) or bool(RAY_EXIT_NOTICE.search(line))


def forward(source: int, console: int) -> None:
    """Copy ``source`` to ``console`` until end of file, without Ray's log lines. Whole lines are
    judged; an unfinished line that cannot be a Ray log line goes out at once (a progress line
    redrawn in place with a carriage return never ends with a newline)."""
    pending = b""
    while chunk := os.read(source, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        out = b"".join(line + b"\n" for line in lines if kept(line))
        if pending and not pending.startswith(b"["):
            out, pending = out + pending, b""
        _write_all(console, out)
    if kept(pending):
        _write_all(console, pending)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the job's to handle; this carries its last words
    forward(sys.stdin.fileno(), sys.stdout.fileno())
