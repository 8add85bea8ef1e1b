"""What every benchmark shares: the peak memory reading and the tail that records, writes and prints."""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from pathlib import Path


def peak_rss_bytes() -> int:
    """High-water resident set size of this process's address space so far.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``ru_maxrss``: after ``exec`` that starts at the
    parent's peak (the kernel carries the old address space's peak over), so a child started from a
    large parent would see no rise at all. Elsewhere ``ru_maxrss`` (macOS reports bytes).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def finish(
    result: dict, prog: str, argv: list[str] | None, out: str | None, render: Callable[[dict], str]
) -> int:
    """Record the command, write the JSON when asked, print the table: the tail every benchmark shares."""
    result["command"] = f"python -m {prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    print(render(result))
    return 0
