"""Progress in a redirected log: one line per bar every few percent, not every carriage-return redraw."""

from __future__ import annotations

import io

from tqdm import tqdm

from models.progress import LineProgress


def test_a_bar_becomes_a_few_lines_and_other_text_passes_through() -> None:
    out = io.StringIO()
    stream = LineProgress(out, step=10)
    stream.write("[predgate build] features ...\n")
    for _ in tqdm(range(500), desc="features fit", file=stream, mininterval=0, miniters=1):
        pass
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "[predgate build] features ..."
    bars = lines[1:]
    assert 10 <= len(bars) <= 13  # 0%, 10%, ..., 100% and the closing state
    assert bars[-1].startswith("features fit: 100%") and "500/500" in bars[-1]


def test_a_second_bar_with_the_same_description_starts_again() -> None:
    out = io.StringIO()
    stream = LineProgress(out, step=50)
    for _ in range(2):
        for _ in tqdm(range(10), desc="epoch", file=stream, mininterval=0, miniters=1):
            pass
    assert sum(line.startswith("epoch:   0%") for line in out.getvalue().splitlines()) == 2


def test_nested_bars_leave_no_cursor_escapes_in_the_log() -> None:
    out = io.StringIO()
    stream = LineProgress(out, step=50)
    for _ in tqdm(range(2), desc="outer", file=stream, mininterval=0, miniters=1):
        for _ in tqdm(
            range(4), desc="inner", file=stream, position=1, leave=False, mininterval=0, miniters=1
        ):
            pass
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert any(line.startswith("inner:") for line in text.splitlines())
    assert any(line.startswith("outer: 100%") for line in text.splitlines())
