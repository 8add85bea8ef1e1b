"""Progress bars: on by default, off with ``PREDGATE_NO_PROGRESS=1`` (CI sets it) or a flag; redrawn
in place on a terminal, one line every few percent in a redirected log (:class:`LineProgress`)."""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

NO_PROGRESS_ENV = "PREDGATE_NO_PROGRESS"


def progress_wanted(no_progress_flag: bool = False) -> bool:
    """Progress bars unless the flag or ``PREDGATE_NO_PROGRESS`` turns them off."""
    return not no_progress_flag and os.environ.get(NO_PROGRESS_ENV, "") not in ("1", "true", "yes")


def maybe_tqdm(items: Iterable[Any], progress: bool, desc: str, *, leave: bool = True) -> Any:
    """``items`` wrapped in a progress bar when ``progress`` (``leave=False``: a transient one)."""
    if not progress:
        return items
    return tqdm(items, desc=desc, leave=leave)


_PERCENT = re.compile(r"^\s*(?P<desc>.*?):?\s*(?P<pct>\d{1,3})%\|")
# tqdm moves the cursor (ESC[A, ESC[2K ...) to redraw nested bars; in a log file those are noise
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LineProgress(io.TextIOBase):
    """A text stream for a log file: progress bars, which redraw one line with carriage returns,
    become one line per bar every ``step`` percent (and at 100%); everything else passes through.

    tqdm writes ``\\r`` + the bar for each redraw; here each redraw is parsed for its description
    and percentage and written as a plain line only when it moved ``step`` points since the last one
    of that description, so a log holds a few lines per stage instead of every redraw."""

    def __init__(self, target: TextIO, step: int = 10) -> None:
        super().__init__()
        self.target = target
        self.step = step
        self._last: dict[str, int] = {}
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = _ANSI_ESCAPE.sub("", self._pending + text)
        parts = re.split(r"(\r|\n)", data)
        self._pending = parts.pop() if parts else ""
        line = ""
        for part in parts:
            if part in ("\r", "\n"):
                self._emit(line, part)
                line = ""
            else:
                line += part
        return len(text)

    def _emit(self, line: str, end: str) -> None:
        match = _PERCENT.match(line)
        if match is None:
            if line.strip() or end == "\n":
                self.target.write(line + ("\n" if line.strip() or end == "\n" else ""))
            return
        desc, pct = match.group("desc").strip(), int(match.group("pct"))
        last = self._last.get(desc)
        if pct < (last if last is not None else -1):  # a new bar with the same description
            last = None
        if last is None or pct >= last + self.step or end == "\n":  # a closing bar ends with "\n"
            self._last[desc] = pct
            self.target.write(line.strip() + "\n")

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.target.fileno()


def install_line_progress(step: int = 10) -> None:
    """Route stderr through :class:`LineProgress` when it is not a terminal (a redirected log)."""
    if not sys.stderr.isatty() and not isinstance(sys.stderr, LineProgress):
        sys.stderr = LineProgress(sys.stderr, step)
