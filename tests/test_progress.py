"""Progress bars (felix/progress.py): drawn on a terminal, nothing otherwise."""

from __future__ import annotations

import io

from felix.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_on_a_terminal_only() -> None:
    terminal = _Terminal()
    with progress("replaying dead letters", 3, stream=terminal) as bar:
        for _ in range(3):
            bar.advance()
    drawn = terminal.getvalue()
    assert "replaying dead letters" in drawn and "3/3" in drawn
    piped = io.StringIO()
    with progress("replaying dead letters", 3, stream=piped) as bar:
        bar.advance(3)
    assert piped.getvalue() == ""


def test_without_a_total_it_counts() -> None:
    terminal = _Terminal()
    with progress("benchmark runs", stream=terminal) as bar:
        bar.advance(7)
    assert "7 done" in terminal.getvalue()
