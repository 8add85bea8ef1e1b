"""Progress bars: on by default, off with ``PREDGATE_NO_PROGRESS=1`` (CI sets it) or a flag."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

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
